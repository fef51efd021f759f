"""Every command against every kind of bad input (#27): one line naming what is wrong and how to fix it, exit code 2,
no traceback, nothing written.

The commands run in-process through the CLI's entry point (`cli.app.main`), so the walk over all of them stays fast;
an exception other than the CLI's one-line errors escapes `main` and fails the test with its traceback.
"""

import json
import shutil
import struct
import sys

import pytest
from helpers import bpe_tokenizer, char_tokenizer, tiny_model

from ling_surgery.cli.app import main

TINY_PLAN = ["--set", "plan.layer_group_size=2", "--set", "plan.mla.kv_lora_rank=32", "--set",
             "plan.mla.qk_rope_head_dim=8", "--set", "data.seq_len=32", "--set", "eval.tokens=128", "--set",
             "eval.seq_len=32", "--set", "eval.each_stage.tasks=[]"]
TINY_TOKENS = ["--set", "stages.init.calibration_tokens=128", "--set", "stages.attention_transfer.tokens=256",
               "--set", "stages.logit_distill.tokens=256"]
EVAL = ["--tasks", "wikipedia", "--limit", "1", "--contexts", ""]

# Each command once, with {model} where the bad model goes ({good}: a sound tiny model, {student}: its upgrade).
COMMANDS = {
    "convert": ["convert", "{model}", "-o", "{out}", "--set", "data.train={data}", *TINY_PLAN, *TINY_TOKENS],
    "convert --dry-run": ["convert", "{model}", "-o", "{out}", "--dry-run", *TINY_PLAN],
    "align": ["align", "{model}", "-o", "{out}", "--set", "stages.sft.data=[{{source: {sft}, examples: 2}}]",
              "--no-rl", "--set", "data.seq_len=32"],
    "pretrain --teacher": ["pretrain", "{student}", "--teacher", "{model}", "-o", "{out}", "--data", "{data}",
                           "--set", "data.seq_len=32", "--set", "eval.each_stage.tasks=[]", "--set",
                           "stages.pretrain.tokens=256", "--set", "eval.tokens=128", "--set", "eval.seq_len=32"],
    "validate": ["validate", "ci-smoke", "--set", "source.model={model}", *TINY_PLAN],
    "plan": ["plan", "ci-smoke", "--set", "source.model={model}", *TINY_PLAN],
    "run": ["run", "ci-smoke", "--set", "source.model={model}", "--set", "data.train={data}", *TINY_PLAN, *TINY_TOKENS,
            "-o", "{out}"],
    "export": ["export", "{model}", "-o", "{out}.gguf"],
    "eval": ["eval", "{model}", *EVAL, "-o", "{out}"],
    "report (teacher)": ["report", "{model}", "{good}", *EVAL, "-o", "{out}"],
    "report (student)": ["report", "{good}", "{model}", *EVAL, "-o", "{out}"],
    "bench inference": ["bench", "inference", "{good}", "{model}", "--engine", "transformers", "--contexts", "64",
                        "-o", "{out}"],
    "bench train": ["bench", "train", "{model}", "--steps", "1", "--seq-len", "32", "--batch-size", "1", "-o", "{out}",
                    "--set", "plan.layer_group_size=2", "--set", "plan.mla.kv_lora_rank=32",
                    "--set", "plan.mla.qk_rope_head_dim=8"],
    "bench tradeoff": ["bench", "tradeoff", "{good}", "a={model}", "-o", "{out}", "--engine", "transformers",
                       "--contexts", "64", "--recall-lengths", "300", "--limit", "1"],
}
# Commands that load no weights: a model whose files are sound but do not fit its config passes them.
LIGHT = {"convert --dry-run", "validate", "plan"}

# Bad models: what each one is, and what its error line says. The first group is found from the files' headers, so
# every command finds it; the second only when the weights load.
FILE_PROBLEMS = {
    "truncated-safetensors": "is a truncated safetensors file",
    "corrupt-safetensors": "is not a safetensors file",
    "missing-shard": "model-00002-of-00002.safetensors' is missing (model.safetensors.index.json lists it)",
    "truncated-gguf": "is a truncated GGUF file",
    "corrupt-gguf": "is a truncated or corrupt GGUF file",
    "no-tokenizer": "no tokenizer files; copy tokenizer.json",
}
LOAD_PROBLEMS = {
    "wrong-model-type": "do not fit its config (model_type 'llama'): the file has tensors the config's model lacks",
    "wrong-sizes": "tensors have another shape in the file (model.embed_tokens.weight: [320, 64] in the file, [320, 128]",
}


def save_good(folder, model_type="llama", tokenizer=None, **overrides):
    tok = tokenizer or bpe_tokenizer()
    tiny_model(model_type, vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2,
               **{"max_position_embeddings": 512, **overrides}).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_gguf(path, cut: int = 0):
    """A small llama GGUF (header and one tensor), `cut` bytes short of its end."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(4)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_tensor("token_embd.weight", np.zeros((128, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - cut])
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    good = save_good(root / "good")
    data = root / "data.txt"
    data.write_text("".join(f"Paragraph {i}: the model reads text and learns.\n\n" for i in range(300)))
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}+1?"},
                                                    {"role": "assistant", "content": f"{i + 1}"}]}) + "\n"
                           for i in range(4)))
    bad = {}
    weights = (good / "model.safetensors").read_bytes()
    for name in FILE_PROBLEMS:
        if name.endswith("safetensors") or name in ("missing-shard", "no-tokenizer"):
            bad[name] = shutil.copytree(good, root / name)
    (bad["truncated-safetensors"] / "model.safetensors").write_bytes(weights[: len(weights) - 100])
    (bad["corrupt-safetensors"] / "model.safetensors").write_bytes(struct.pack("<Q", 40) + b"{not json" + b"\0" * 64)
    (bad["missing-shard"] / "model.safetensors").rename(bad["missing-shard"] / "model-00001-of-00002.safetensors")
    (bad["missing-shard"] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bad["no-tokenizer"] / name).unlink()
    bad["truncated-gguf"] = write_gguf(root / "truncated.gguf", cut=1000)
    bad["corrupt-gguf"] = root / "corrupt.gguf"
    bad["corrupt-gguf"].write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 5) + b"\x07")
    # Qwen3 weights (per-head q/k norms) under a Llama config; a config that doubles the hidden size.
    bad["wrong-model-type"] = save_good(root / "wrong-model-type", "qwen3")
    config = json.loads((bad["wrong-model-type"] / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (bad["wrong-model-type"] / "config.json").write_text(json.dumps(config))
    bad["wrong-sizes"] = shutil.copytree(good, root / "wrong-sizes")
    config = json.loads((good / "config.json").read_text())
    (bad["wrong-sizes"] / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    return {"good": good, "student": upgraded(good, root / "student"), "data": data, "sft": sft, "bad": bad,
            "root": root}


def upgraded(teacher_folder, folder):
    """The tiny teacher's hybrid upgrade (init only), saved with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ling_surgery.surgery.architectures import get_arch
    from ling_surgery.surgery.config import Recipe
    from ling_surgery.surgery.init_maps import build_student, init_student_state
    from ling_surgery.surgery.targets import layer_plan, target_config

    teacher = AutoModelForCausalLM.from_pretrained(teacher_folder)
    recipe = Recipe.model_validate({"plan": {"layer_group_size": 2, "mla": {"kv_lora_rank": 32, "qk_rope_head_dim": 8}}})
    config = target_config(teacher.config, layer_plan(recipe, 4), recipe)
    state = init_student_state(teacher.state_dict(), get_arch("llama"), teacher.config, config, None, recipe.stages[0])
    build_student(state, config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher_folder).save_pretrained(folder)
    return folder


def call(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    """`ling-surgery ARGS` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["ling-surgery", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


def assert_one_line_exit_2(monkeypatch, capsys, args, message, out):
    code, err = call(monkeypatch, capsys, args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], err[-2000:]
    assert "Traceback" not in err
    assert not out.exists() and not out.with_name(out.name + ".gguf").exists(), "something was written"


CASES = [(command, problem) for command in COMMANDS for problem in FILE_PROBLEMS]
CASES += [(command, problem) for command in COMMANDS if command not in LIGHT for problem in LOAD_PROBLEMS]


@pytest.mark.parametrize("command, problem", CASES, ids=[f"{c}-{p}" for c, p in CASES])
def test_every_command_refuses_a_bad_model_in_one_line(inputs, tmp_path, monkeypatch, capsys, command, problem):
    out = tmp_path / "out"
    args = [a.format(model=inputs["bad"][problem], out=out, **inputs) for a in COMMANDS[command]]
    message = {**FILE_PROBLEMS, **LOAD_PROBLEMS}[problem]
    assert_one_line_exit_2(monkeypatch, capsys, args, message, out)


def test_a_sound_model_passes_the_same_checks(inputs, tmp_path, monkeypatch, capsys):
    """The walk's good inputs are good: the light commands pass on them (so the refusals above are the bad input's)."""
    for command in sorted(LIGHT):
        args = [a.format(model=inputs["good"], out=tmp_path / "out", **inputs) for a in COMMANDS[command]]
        code, err = call(monkeypatch, capsys, args)
        assert code in (0, None), err[-2000:]


RECIPE_COMMANDS = {
    "convert": ["convert", "{good}", "-c", "{recipe}", "-o", "{out}"],
    "align": ["align", "{good}", "-c", "{recipe}", "-o", "{out}"],
    "pretrain": ["pretrain", "{student}", "--teacher", "{good}", "-c", "{recipe}", "-o", "{out}"],
    "validate": ["validate", "{recipe}"],
    "plan": ["plan", "{recipe}"],
    "run": ["run", "{recipe}", "-o", "{out}"],
}
SET_COMMANDS = {**{name: [a if a != "{recipe}" else "ci-smoke" for a in args if a != "-c"]
                   for name, args in RECIPE_COMMANDS.items()},
                "bench train": COMMANDS["bench train"]}
SET_COMMANDS["convert"] = ["convert", "{good}", "-o", "{out}"]
SET_COMMANDS["align"] = ["align", "{good}", "-o", "{out}"]
SET_COMMANDS["pretrain"] = ["pretrain", "{student}", "--teacher", "{good}", "-o", "{out}"]


@pytest.mark.parametrize("command", list(RECIPE_COMMANDS))
def test_a_recipe_that_is_not_utf8_is_one_line(inputs, tmp_path, monkeypatch, capsys, command):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("source:\n  model: smollm2-135m\n# r\xe9sum\xe9\n".encode("latin-1"))
    args = [a.format(recipe=recipe, out=tmp_path / "out", model="", **inputs) for a in RECIPE_COMMANDS[command]]
    assert_one_line_exit_2(monkeypatch, capsys, args, "latin1.yaml' is not UTF-8 text (byte 0xe9 on line 3); save it "
                           "as UTF-8", tmp_path / "out")


@pytest.mark.parametrize("command", list(SET_COMMANDS))
@pytest.mark.parametrize("value, message", [
    ("plan.layer_group_size=[1, 2", "the value is not valid YAML (expected ',' or ']', but got '<stream end>' at line 1"),
    ("data.train={a: 1", "the value is not valid YAML (expected ',' or '}'"),
    ("data.train", "expected key.path=value"),
])
def test_a_set_value_that_is_not_yaml_is_one_line(inputs, tmp_path, monkeypatch, capsys, command, value, message):
    args = [a.format(out=tmp_path / "out", model=inputs["good"], **inputs) for a in SET_COMMANDS[command]]
    assert_one_line_exit_2(monkeypatch, capsys, [*args, "--set", value], message, tmp_path / "out")


def test_a_model_without_a_chat_template_is_one_line_where_chat_is_needed(inputs, tmp_path, monkeypatch, capsys):
    """Decoupled SFT and the chat evaluations need the model's chat template; the character tokenizer has none."""
    plain = save_good(tmp_path / "plain", tokenizer=char_tokenizer())
    out = tmp_path / "out"
    for args, message in [
        (["align", str(plain), "-o", str(out)], "the model has no chat template; pass one with --chat-template"),
        (["eval", str(plain), "--tasks", "gsm8k_chat", "--limit", "1", "--contexts", "", "-o", str(out)],
         "the model has no chat template, so it cannot be asked in chat"),
    ]:
        assert_one_line_exit_2(monkeypatch, capsys, args, message, out)


def test_gguf_checks_read_headers_only_and_pass_whole_files(tmp_path):
    """The header checks pass a whole GGUF and name the byte counts of a cut one (no false alarms on the sound file)."""
    from ling_surgery.surgery.errors import SurgeryError
    from ling_surgery.surgery.sources import check_weight_files, resolve_source

    whole = write_gguf(tmp_path / "whole.gguf")
    check_weight_files(resolve_source(str(whole)))
    size = whole.stat().st_size
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:-1])
    with pytest.raises(SurgeryError, match=f"truncated GGUF file \\({size - 1:,} bytes of the {size:,} its header"):
        check_weight_files(resolve_source(str(cut)))

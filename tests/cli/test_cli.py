"""The CLI end to end on a tiny saved model: convert, run/resume after SIGKILL, validate, plan, recipes, bad inputs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_source_with_text
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TINY_BUDGET = [
    "--set", "plan.layer_group_size=2", "--set", "plan.mla.kv_lora_rank=32", "--set", "plan.mla.qk_rope_head_dim=8",
    "--set", "data.seq_len=32", "--set", "data.heldout_fraction=0.3", "--set", "stages.init.calibration_tokens=128",
    "--set", "stages.attention_transfer.tokens=256", "--set", "stages.attention_transfer.batch_size=2",
    "--set", "stages.logit_distill.tokens=256", "--set", "stages.logit_distill.batch_size=2",
    "--set", "eval.tokens=128", "--set", "eval.seq_len=32", "--set", "eval.each_stage.tasks=[arc_easy]",
]


def cli(*args, cwd=None):
    return [sys.executable, "-m", "ling_surgery", *args], {**os.environ, "HF_HUB_OFFLINE": "1"}


def run_cli(*args, cwd=None):
    command, env = cli(*args)
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny source and its text in a folder whose name has spaces and non-ASCII letters, the model reached through
    a symlink: every CLI test below runs on such paths (#27)."""
    root = tmp_path_factory.mktemp("src") / "mes modèles à tester"
    root.mkdir()
    model, data = tiny_source_with_text(root)
    link = root.parent / "lien vers le modèle"
    link.symlink_to(model, target_is_directory=True)
    return link, data


def _error_line(result):
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert lines, result.stderr
    return lines[-1]


def test_convert_end_to_end(source, tmp_path):
    model, data = source
    out = tmp_path / "modèle mis à jour"
    result = run_cli("convert", str(model), "--target", "hybrid-linear", "--output", str(out), "--set", f"data.train={data}", *TINY_BUDGET)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["export_check"]["bit_exact"] and report["export_check"]["greedy_cache_matches"]
    assert report["quality"]["teacher"]["perplexity"] > 1 and report["quality"]["student"]["perplexity"] > 1
    assert report["stages"]["attention_transfer"]["steps"] == 4
    for name in ("report.md", "distill_losses.png", "config.json", "ling_surgery_manifest.json", "tokenizer.json"):
        assert (out / "model" / name).is_file(), name
    assert (out / "report.md").is_file() and (out / "stages" / "3-logit_distill" / "config.json").is_file()
    hidden = [p for p in [*tmp_path.iterdir(), *out.iterdir(), *(out / "stages").iterdir()] if p.name.startswith(".")]
    assert not hidden  # no temporary folders or leftover training states
    evaluated = run_cli("eval", str(out), "--tasks", "wikipedia", "--limit", "1", "--contexts", "",
                        "--output", str(tmp_path / "évaluation"))
    assert evaluated.returncode == 0 and (tmp_path / "évaluation" / "report.json").is_file(), evaluated.stderr[-3000:]


def test_dry_run_prints_the_plan(source):
    model, _ = source
    result = run_cli("convert", str(model), "--dry-run", "--set", "plan.layer_group_size=2", "--set", "plan.mla.kv_lora_rank=32",
                     "--set", "plan.mla.qk_rope_head_dim=8")
    assert result.returncode == 0, result.stderr
    assert "KV cache / token" in result.stderr and "MLA" in result.stderr and "layer_group_size=2" in result.stderr


def test_sigkill_then_resume_gives_the_same_weights_as_an_unbroken_run(source, tmp_path):
    """SIGKILL in the middle of logit distillation, then `run --resume`: bit-equal final weights (CPU, same seed)."""
    model, data = source
    args = ["run", "ci-smoke", "--set", f"source.model={model}", "--set", f"data.train={data}", *TINY_BUDGET,
            "--set", "stages.logit_distill.tokens=6400", "--set", "runtime.save_every=5", "--set", "export.verify=false"]
    unbroken = run_cli(*args, "--output", str(tmp_path / "unbroken"))
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]

    out = tmp_path / "broken"
    state = kill_once_saved(args, out, ".3-logit_distill.resume.json")
    assert json.loads(state.read_text())["step"] < 100

    refused = run_cli(*args, "--output", str(out))
    assert refused.returncode == 2 and "was interrupted at step" in _error_line(refused)
    resumed = run_cli(*args, "--output", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step" in resumed.stderr
    assert_same_weights(tmp_path / "unbroken", out)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero3"])
def test_two_processes_through_accelerate_launch_end_in_the_weights_of_one(source, tmp_path, engine):
    """`accelerate launch --multi_gpu --num_processes 2 -m ling_surgery run` on CPU (torchrun, gloo), and with the
    shipped FSDP2 and DeepSpeed ZeRO-3 configs and their runtime.engine: the same final weights as one process within
    float tolerance, and one process writes and reports."""
    model, data = source
    args = ["run", "ci-smoke", "--set", f"source.model={model}", "--set", f"data.train={data}", *TINY_BUDGET,
            "--set", "eval.each_stage.tasks=[]"]
    one = run_cli(*args, "--output", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    from test_distributed import _free_port

    port = _free_port()
    config = ["--multi_gpu"] if engine == "ddp" else ["--config_file", str(ROOT / f"recipes/accelerate/{engine}.yaml")]
    launch = [sys.executable, "-m", "accelerate.commands.launch", *config, "--num_processes", "2",
              "--main_process_port", str(port), "-m", "ling_surgery", *args, "--set", f"runtime.engine={engine}",
              "--set", "runtime.devices=2", "--output", str(tmp_path / "two")]
    if engine != "ddp":  # and the teacher sharded too, stage after stage (the evaluations between use it whole)
        launch[-2:-2] = ["--set", "runtime.teacher=sharded"]
    two = subprocess.run(launch, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    # (on CPU accelerate reports MULTI_CPU whatever the config; on GPUs FSDP and DEEPSPEED)
    layout = {"ddp": "MULTI_CPU, replicated (DDP)", "fsdp2": "MULTI_CPU, sharded (FSDP2)",
              "zero3": "MULTI_CPU, sharded (DeepSpeed ZeRO-3)"}[engine]
    assert f"logit_distill: 2 processes ({layout}), 1 of each micro-batch's 2 windows per process" in two.stderr
    assert two.stderr.count("stage logit_distill: checkpoint") == 1 and two.stderr.count("export check:") == 1
    expected = load_file(tmp_path / "one" / "model" / "model.safetensors")
    actual = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def kill_once_saved(args: list[str], out, state_name: str):
    """Start `args --output out` and SIGKILL it as soon as its in-stage state `stages/state_name` exists (mid-stage);
    returns that state file."""
    command, env = cli(*args, "--output", str(out))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "stages" / state_name
    deadline = time.time() + 300
    while not state.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed mid-stage"
    return state


def assert_same_weights(run_a, run_b):
    """The exported models of two run folders hold the same tensors, bit for bit."""
    expected = load_file(run_a / "model" / "model.safetensors")
    actual = load_file(run_b / "model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_validate_is_light_and_names_the_problem(source, tmp_path):
    model, data = source
    tiny = ["--set", f"source.model={model}", "--set", f"data.train={data}", "--set", "plan.layer_group_size=2",
            "--set", "plan.mla.kv_lora_rank=32", "--set", "plan.mla.qk_rope_head_dim=8"]
    long_recall = run_cli("validate", "ci-smoke", *tiny)  # its passkey after every stage needs 512 positions
    assert long_recall.returncode == 2 and "eval.each_stage.recall_lengths [512] exceed" in _error_line(long_recall)
    ok = run_cli("validate", "ci-smoke", *tiny, "--set", "eval.each_stage.tasks=[arc_easy]")
    assert ok.returncode == 0, ok.stderr
    # The CPU demo measures its placement (no layer group) and trains on 1024-token windows: longer than the tiny
    # model's 256 positions, which validate points out (allowed: RoPE extrapolates).
    demo = ["--set", f"source.model={model}", "--set", f"data.train={data}", "--set", "plan.full_attention_count=1",
            "--set", "plan.mla.kv_lora_rank=32", "--set", "plan.mla.qk_rope_head_dim=8", "--set", "eval.each_stage.tasks=[]"]
    long_windows = run_cli("validate", "smollm2-135m-cpu", *demo)
    assert long_windows.returncode == 0 and "data.seq_len 1024 is longer than" in long_windows.stderr, long_windows.stderr
    ok = run_cli("validate", "smollm2-135m-cpu", *demo, "--set", "data.seq_len=64", "--set", "eval.seq_len=64")
    assert ok.returncode == 0 and ok.stderr.count("ok ") == 1 and "longer than" not in ok.stderr, ok.stderr
    # No weights and no torch: validate reads configs only, which is what keeps it well under 2 s.
    code = ("import sys; from ling_surgery.surgery.config import load_recipe; from ling_surgery.surgery.validate import "
            f"check_recipe; check_recipe(load_recipe('ci-smoke', ['source.model={model}', 'data.train={data}', "
            "'plan.layer_group_size=2', 'plan.mla.kv_lora_rank=32', 'plan.mla.qk_rope_head_dim=8', "
            "'eval.each_stage.tasks=[]'])); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert probe.stdout.split() == ["False", "False"], probe.stderr
    bad = run_cli("validate", "ci-smoke", "--set", f"source.model={model}", "--set", "plan.layer_group_size=3",
                  "--set", "plan.mla.kv_lora_rank=32", "--set", "plan.mla.qk_rope_head_dim=8",
                  "--set", "eval.each_stage.tasks=[]")
    assert bad.returncode == 2 and "does not divide num_hidden_layers 4" in _error_line(bad)
    # Three independent mistakes (a typo, a bad value, a plan that does not fit the source) in one run, one line each.
    recipe = tmp_path / "three-mistakes.yaml"
    recipe.write_text(f"source: {{model: {model}}}\ndata: {{train: {data}, seq_len: 32}}\n"
                      "plan: {layer_group_size: 3, mla: {kv_lora_rnak: 16}}\n"
                      "stages: [{kind: init}, {kind: logit_distill, lr: -1, tokens: 256}]\n")
    three = run_cli("validate", str(recipe))
    assert three.returncode == 2, three.stderr
    lines = [line.strip() for line in three.stderr.splitlines() if line.strip()]
    assert lines == [
        "error: the recipe has 3 problems:",
        "- unknown key 'plan.mla.kv_lora_rnak'; did you mean 'kv_lora_rank'?",
        "- stages.logit_distill.lr: Input should be greater than 0",
        "- plan.layer_group_size 3 does not divide num_hidden_layers 4; use one of [2, 4], list layers in "
        "plan.full_attention_layers, or leave it unset (derived: 4)",
    ], three.stderr
    typo = run_cli("validate", "ci-smoke", "--set", "stages.init.calibraton_tokens=5")
    assert typo.returncode == 2 and "did you mean 'calibration_tokens'" in _error_line(typo)


def test_plan_shows_stage_status_of_a_run_folder(source, tmp_path):
    model, data = source
    base = ["--set", f"source.model={model}", "--set", f"data.train={data}", *TINY_BUDGET, "--set", "export.verify=false"]
    assert run_cli("run", "ci-smoke", *base, "--output", str(tmp_path / "r")).returncode == 0
    shown = run_cli("plan", "ci-smoke", *base, "--set", "stages.logit_distill.lr=1e-4", "--output", str(tmp_path / "r"))
    assert shown.returncode == 0, shown.stderr
    rows = {line.split("│")[2].strip(): line for line in shown.stderr.splitlines() if line.count("│") > 6}
    assert "done" in rows["init"] and "stale" in rows["logit_distill"]


def test_recipes_ls_show_cp(tmp_path):
    listed = run_cli("recipes", "ls")
    assert listed.returncode == 0 and "smollm2-135m-cpu" in listed.stdout and "ci-smoke" in listed.stdout
    shown = run_cli("recipes", "show", "smollm2-135m-all-mla")
    assert shown.returncode == 0 and "target: all-mla" in shown.stdout
    copied = run_cli("recipes", "cp", "ci-smoke", str(tmp_path))
    assert copied.returncode == 0 and (tmp_path / "ci-smoke.yaml").read_text() == run_cli("recipes", "show", "ci-smoke").stdout
    again = run_cli("recipes", "cp", "ci-smoke", str(tmp_path))
    assert again.returncode == 2 and "already exists" in _error_line(again)
    missing = run_cli("recipes", "show", "nope")
    assert missing.returncode == 2 and "not a shipped recipe (ci-smoke" in _error_line(missing)
    config = run_cli("recipes", "cp", "accelerate/fsdp2", str(tmp_path))  # the engine config the GPU recipes launch with
    assert config.returncode == 0 and "fsdp_version: 2" in (tmp_path / "fsdp2.yaml").read_text()
    unknown = run_cli("recipes", "cp", "accelerate/zero2", str(tmp_path))
    assert unknown.returncode == 2 and "not a shipped accelerate config (accelerate/fsdp2, accelerate/zero3)" in \
        _error_line(unknown)


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "./missing-model", "--output", "o"], "not found"),
        (["convert", "{model}", "--output", "o", "--set", "plan.layer_group_size=3"], "does not divide"),
        (["convert", "{model}", "--output", "o", "--set", "plan.layr_group_size=2"], "did you mean 'layer_group_size'"),
        (["run", "missing-recipe", "--output", "o"], "not a shipped recipe"),
        (["run", "ci-smoke", "--set", "source.model={model}", "--set", "plan.mla.kv_lora_rank=32",
          "--set", "plan.mla.qk_rope_head_dim=8", "--set", "plan.layer_group_size=2", "--set", "eval.each_stage.tasks=[]",
          "--output", "{blocked}"], "is a file"),
        (["convert", "{model}", "--output", "{exists}"], "already exists"),
        (["convert", "{model}", "--output", "{blocked}/sub"], "cannot create"),
        (["export", "{model}", "--format", "gguf", "--output", "{blocked}"], "already exists"),
        (["export", "{model}", "--format", "gguf", "--dtype", "q4_k", "--output", "o.gguf"], "supported: f32, f16, q8_0, q4_0"),
        (["export", "{model}", "--format", "onnx", "--output", "o.gguf"], "supported: gguf"),
        (["export", "./missing-model", "--format", "gguf", "--output", "o.gguf"], "not found"),
        (["bench", "inference", "{model}", "{model}", "--engine", "vllm"], "not supported"),
        # Bad data is found before anything is written or the teacher loads.
        (["convert", "{model}", "--output", "o", "--set", "data.train={bad_jsonl}"], "bad.jsonl:2: not valid JSON"),
        (["convert", "{model}", "--output", "o", "--set", "data.train={latin1}"], "latin1.txt:1: not UTF-8 text"),
        (["convert", "{model}", "--output", "o", "--set", "data.train={tiny}", "--set", "data.seq_len=64",
          "--set", "eval.tokens=0"], "training text of"),
        (["convert", "{model}", "--output", "o", "--set", "data.train={data}", "--set", "data.seq_len=32"],
         "runs out after"),
        (["convert", "{model}", "--output", "o", "--set", "stages.init.calibration_tokens=100"],
         "calibration_tokens 100 is less than one data.seq_len window (1024)"),
        # The memory plan: a stage that cannot fit the devices the recipe names is refused before anything loads.
        (["convert", "{model}", "--output", "o", "--set", "runtime.device_memory_gib=0.01"],
         "runtime.device_memory_gib is 0.01 on 1 device(s)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(source, tmp_path, args, message):
    model, data = source
    (tmp_path / "exists").mkdir()
    (tmp_path / "blocked").write_text("a file, not a folder")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "tiny.txt").write_text("too short to fill a window")
    args = [a.format(model=model, data=data, exists=tmp_path / "exists", blocked=tmp_path / "blocked", bad_jsonl=tmp_path / "bad.jsonl",
                     latin1=tmp_path / "latin1.txt", tiny=tmp_path / "tiny.txt") for a in args]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in _error_line(result)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.gguf").exists()


def test_moe_sources_the_conversion_cannot_take_exit_2(tmp_path):
    """An MoE family without a supported router, a DeepSeek source with query LoRA and dense layers the engines cannot
    load: one line each, exit code 2, nothing written."""
    from helpers import MOE_TINY, TINY, tiny_moe_model
    from transformers import GraniteMoeConfig

    GraniteMoeConfig(**{**TINY, "intermediate_size": 32, "num_local_experts": 8, "num_experts_per_tok": 2}
                     ).save_pretrained(tmp_path / "granite")
    tiny_moe_model("deepseek_v3").config.__class__(**{**TINY, **MOE_TINY["deepseek_v3"], "q_lora_rank": 16}
                                                   ).save_pretrained(tmp_path / "qlora")
    tiny_moe_model("qwen2_moe", mlp_only_layers=[2]).config.save_pretrained(tmp_path / "interleaved")
    expected = {"granite": "model_type 'granitemoe' is not supported; supported: deepseek_v3",
                "qlora": "q_lora_rank 16 (DeepSeek-V3/R1, Kimi-K2) are not supported",
                "interleaved": "dense MLP layers [2] are not all leading"}
    for name, message in expected.items():
        result = run_cli("convert", str(tmp_path / name), "--output", str(tmp_path / f"{name}-out"), "--dry-run")
        assert result.returncode == 2 and message in _error_line(result), (name, result.stderr[-500:])
        assert "Traceback" not in result.stderr and not (tmp_path / f"{name}-out").exists()


def test_unsupported_architecture_exit_2(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    result = run_cli("convert", str(tmp_path / "gpt2"), "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "supported: deepseek_v3, dots1, glm4_moe, llama, mistral, mixtral, olmoe, qwen2, qwen2_moe, qwen3" in _error_line(result)
    result = run_cli("export", str(tmp_path / "gpt2"), "--format", "gguf", "--output", str(tmp_path / "o.gguf"))
    assert result.returncode == 2 and "supported model types: bailing_hybrid, llama, mistral" in _error_line(result)
    assert not (tmp_path / "o.gguf").exists()


def test_align_runs_sft_then_rl_and_each_can_be_switched_off(tmp_path):
    from helpers import bpe_tokenizer, tiny_model

    chat_model = tmp_path / "chat-model"
    tok = bpe_tokenizer()
    tiny_model("llama", vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(chat_model)
    tok.save_pretrained(chat_model)
    for flags, kinds in (([], ["sft", "rl"]), (["--no-rl"], ["sft"]), (["--no-sft"], ["rl"])):
        result = run_cli("align", str(chat_model), *flags, "--dry-run")
        assert result.returncode == 0, result.stderr[-2000:]
        rows = [line.split("│")[1:3] for line in result.stderr.splitlines() if line.startswith("│ ") and "│" in line[2:]]
        assert [kind.strip() for name, kind in rows if name.strip()] == kinds, result.stderr


def test_align_through_accelerate_launch(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m ling_surgery align` on CPU: TRL's trainers take the launch
    (SFT's batch of 2 conversations is one per process, RL's completions likewise) and one process writes."""
    from helpers import bpe_tokenizer, tiny_model

    chat_model = tmp_path / "chat-model"
    tok = bpe_tokenizer()
    tiny_model("llama", vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(chat_model)
    tok.save_pretrained(chat_model)
    from test_distributed import _free_port

    port = _free_port()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(port), "-m", "ling_surgery", "align", str(chat_model), "--config",
              "ci-smoke-align", "--set", "eval.tasks=[]", "--set", "eval.tokens=0", "--output", str(tmp_path / "out")]
    result = subprocess.run(launch, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "model" / "report.json").read_text())
    assert report["stages"]["sft"]["steps"] >= 1 and report["stages"]["rl"]["steps"] >= 1
    assert result.stderr.count("stage sft: checkpoint") == 1 and result.stderr.count("stage rl: checkpoint") == 1


def test_align_bad_input_is_one_line_exit_2_and_writes_nothing(source, tmp_path):
    """A model without a chat template, an unknown data source, a data file without the conversation field."""
    from helpers import bpe_tokenizer, tiny_model

    char_model, _ = source  # the character tokenizer has no chat template
    chat_model = tmp_path / "chat-model"
    tok = bpe_tokenizer()
    tiny_model("llama", vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(chat_model)
    tok.save_pretrained(chat_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversation": [{"role": "user", "content": "hi"}]}) + "\n")
    cases = [
        ([str(char_model)], "the model has no chat template; pass one with --chat-template"),
        ([str(chat_model), "--set", "stages.sft.data=[{source: nope, examples: 2}]"], "unknown SFT data source 'nope'"),
        ([str(chat_model), "--set", f"stages.sft.data=[{{source: {bad}, examples: 1}}]"],
         "a row has no 'messages' field (found: conversation)"),
        ([str(chat_model), "--set", "stages.sft.data=[{source: chitchat, examples: 2}]"],
         "chitchat has no reasoning to put in think mode"),
        ([str(chat_model), "--chat-template", str(tmp_path / "missing.jinja")], "missing.jinja' not found"),
        ([str(chat_model), "--no-sft", "--set", "stages.rl.rewards=[{name: corectness}]"],
         "stages.rl.rewards: 'corectness' is not a reward; use correctness, length, length_by_accuracy, format"),
        ([str(chat_model), "--set", "stages.rl.rewards=[{name: 'nomodule:f'}]"], "cannot import 'nomodule'"),
        ([str(chat_model), "--set", "stages.rl.loss_type=cispo"], "loss_type cispo cannot take the sentence-level ratio"),
        ([str(chat_model), "--no-sft", "--no-rl"], "switching off sft and rl leaves the recipe no stage to run"),
        ([str(chat_model), "--no-sft", "--set", "stages.rl.generation=vllm", "--set", "runtime.device=cpu"],
         "stages.rl.generation vllm needs a CUDA device"),
    ]
    for args, message in cases:
        result = run_cli("align", *args, "--output", str(tmp_path / "o"))
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in _error_line(result) and "Traceback" not in result.stderr
        assert not (tmp_path / "o").exists()


PRETRAIN_BUDGET = ["--set", "data.seq_len=32", "--set", "data.heldout_fraction=0.3", "--set", "stages.pretrain.batch_size=2",
                   "--set", "eval.tokens=128", "--set", "eval.seq_len=32", "--set", "runtime.save_every=5"]


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """200 short documents (a .jsonl), for runs that read some and a later run that must not read them again."""
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"Note {i}: the model reads text and learns. " * 2}) + "\n"
                            for i in range(200)))
    return path


@pytest.fixture(scope="module")
def upgraded(source, documents, tmp_path_factory):
    """The tiny source converted (no per-stage evals) on `documents`: a folder whose manifest names its teacher and
    what it read."""
    model, _ = source
    data = documents
    out = tmp_path_factory.mktemp("upgraded") / "run"
    budget = TINY_BUDGET[:-2]  # all but the per-stage evals
    assert "each_stage" in TINY_BUDGET[-1]
    result = run_cli("convert", str(model), "--output", str(out), "--set", f"data.train={data}", *budget,
                     "--set", "export.verify=false")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_pretrain_continues_an_upgraded_model_with_the_teacher_it_was_converted_from(source, documents, upgraded,
                                                                                      tmp_path):
    model, _ = source
    out = tmp_path / "pretrained"
    result = run_cli("pretrain", str(upgraded), "--data", str(documents), "--output", str(out), *PRETRAIN_BUDGET,
                     "--set", "stages.pretrain.tokens=640", "--set", "stages.pretrain.ce_weight=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    # The conversion's documents are not read again: this run starts after them, and says so.
    converted = json.loads((upgraded / "model" / "ling_surgery_manifest.json").read_text())["ling_surgery"]["data_read"]
    before = converted["sources"][str(documents)]["documents"]
    assert before > 0 and f"{before:,} documents" in result.stderr.split("skipping what the source model")[1]
    manifest = json.loads((out / "stages" / "1-pretrain" / "ling_surgery_manifest.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["steps"] == 10 and metrics["perplexity_before"]["perplexity"] > 1
    report = json.loads((out / "report.json").read_text())
    assert report["export_check"]["bit_exact"]
    exported = json.loads((out / "model" / "ling_surgery_manifest.json").read_text())
    assert exported["ling_surgery"]["roles"] == ["teacher", "upgraded"]
    assert exported["ling_surgery"]["data_read"]["sources"][str(documents)]["documents"] > before  # cumulative
    assert exported["recipe"]["source"]["teacher"] is None and exported["recipe"]["source"]["model"] == str(upgraded)
    # The pretrained model names the teacher in turn (its source's), so it can be pretrained again without --teacher.
    dry = run_cli("pretrain", str(out), "--dry-run")
    recorded = "".join(str(Path(model).resolve()).split())  # (the symlink resolved; the table wraps and spaces)
    assert dry.returncode == 0 and f"teacher{recorded}" in "".join(dry.stderr.split()), dry.stderr[-2000:]


def test_pretrain_sigkill_then_resume_gives_the_same_weights(source, upgraded, tmp_path):
    _, data = source  # one long document, read from its start (data.reread: the conversion read other text anyway)
    args = ["pretrain", str(upgraded), "--data", str(data), *PRETRAIN_BUDGET, "--set", "data.reread=true",
            "--set", "stages.pretrain.tokens=12800", "--set", "stages.pretrain.grad_accumulation=2",
            "--set", "export.verify=false", "--set", "eval.tokens=0"]
    unbroken = run_cli(*args, "--output", str(tmp_path / "unbroken"))
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    out = tmp_path / "broken"
    kill_once_saved(args, out, ".1-pretrain.resume.json")
    resumed = run_cli(*args, "--output", str(out), "--resume")
    assert resumed.returncode == 0 and "resuming at step" in resumed.stderr, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "unbroken", out)


def test_pretrain_bad_input_is_one_line_exit_2(source, upgraded, tmp_path):
    from helpers import bpe_tokenizer, tiny_model

    model, _ = source
    other = tmp_path / "other-teacher"  # another tokenizer
    tok = bpe_tokenizer()
    tiny_model("llama", vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(other)
    tok.save_pretrained(other)
    bare = tmp_path / "no-manifest"  # an upgraded model that does not say what it was converted from
    shutil.copytree(upgraded / "model", bare, ignore=shutil.ignore_patterns("ling_surgery_manifest.json"))
    cases = [
        ([str(model)], "pretrain trains an upgraded model (bailing_hybrid or deepseek_v3)"),
        ([str(upgraded), "--teacher", str(other)], "tokenize differently"),
        ([str(bare)], "records none"),
        ([str(upgraded), "--set", "stages.pretrain.kl_weight=0"], "kl_weight and ce_weight are both 0"),
        ([str(upgraded), "--teacher", str(tmp_path / "missing")], "not found"),
    ]
    for args, message in cases:
        result = run_cli("pretrain", *args, "--output", str(tmp_path / "o"))
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_bench_train_prints_a_table_and_writes_json(source, tmp_path):
    model, _ = source
    result = run_cli("bench", "train", str(model), "--stages", "logit_distill", "--seq-len", "32", "--steps", "1",
                     "--set", "plan.layer_group_size=2", "--set", "plan.mla.kv_lora_rank=32", "--set",
                     "plan.mla.qk_rope_head_dim=8", "--output", str(tmp_path / "bench"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MFU" in result.stderr and "matmul peak" in result.stderr
    report = json.loads((tmp_path / "bench" / "bench_train.json").read_text())
    assert [row["stage"] for row in report["stages"]] == ["logit_distill"] and report["stages"][0]["mfu"] > 0
    bad = run_cli("bench", "train", str(model), "--stages", "distill")
    assert bad.returncode == 2 and "--stages distill: choose from attention_transfer, logit_distill, pretrain" in _error_line(bad)


def test_a_bug_in_one_of_several_processes_ends_in_its_traceback_and_one_line(monkeypatch, capsys):
    """Not bad input but an unexpected exception in process 1 of 2: its traceback, then one line naming the process
    (the launcher stops the others), exit code 1; in one process the exception propagates as it is."""
    import importlib

    cli_app = importlib.import_module("ling_surgery.cli.app")  # the module (the package exports its Typer `app`)

    def broken():
        raise RuntimeError("index 7 is out of bounds")

    monkeypatch.setattr(cli_app, "app", broken)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exited:
        cli_app.main()
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and 'raise RuntimeError("index 7 is out of bounds")' in err
    assert "process 1 of 2 failed with RuntimeError: index 7 is out of bounds (traceback above" in " ".join(err.split())
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="out of bounds"):
        cli_app.main()

"""Fault injection (#27): every guarantee of a run under a fault, one test each, each able to fail.

- SIGKILL at random points of every stage kind, then `--resume`: the weights of an unbroken run, bit for bit.
- A full disk while writing an in-stage checkpoint or a model folder (simulated in-process: the writers fail or come
  out short as they do on a full device): one line, the previous checkpoint intact, no temporary files left.
- Leftovers of killed writes (`.partial-*`, `*.tmp`, a folder moved aside) put right by the next run.
- NaN/Inf in the weights or in a batch's outputs, and a gradient that overflows: the stage stops naming where, the
  last in-stage checkpoint kept.
- A read-only run folder, and a run folder that disappears mid-run: one line, nothing half-written.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import bpe_tokenizer, tiny_model
from safetensors.torch import load_file

from ling_surgery.surgery.errors import SurgeryError

KINDS = ["init", "attention_transfer", "logit_distill", "pretrain", "sft", "rl"]


def every_kind_recipe(root: Path) -> Path:
    """A recipe of one stage of every kind on a tiny Llama with a chat template (about a minute on 2 cores)."""
    tok = bpe_tokenizer()
    tiny_model("llama", vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2,
               max_position_embeddings=512).save_pretrained(root / "source")
    tok.save_pretrained(root / "source")
    (root / "text.txt").write_text("".join(f"Paragraph {i}: the model reads text and learns. The quick brown fox "
                                           "jumps over the lazy dog.\n\n" for i in range(400)))
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i}+1?"}, {"role": "assistant", "content": f"It is {i + 1}."}]}) + "\n"
        for i in range(8)))
    recipe = root / "every-kind.yaml"
    recipe.write_text(f"""
source: {{model: {json.dumps(str(root / 'source'))}}}
plan: {{layer_group_size: 2, mla: {{kv_lora_rank: 32, qk_rope_head_dim: 8}}}}
data: {{train: {json.dumps(str(root / 'text.txt'))}, seq_len: 32, heldout_fraction: 0.2}}
stages:
  - {{kind: init, calibration_tokens: 128}}
  - {{kind: attention_transfer, tokens: 1024, batch_size: 2}}
  - {{kind: logit_distill, tokens: 1024, batch_size: 2}}
  - {{kind: pretrain, tokens: 1024, batch_size: 2}}
  - kind: sft
    data: [{{source: {json.dumps(str(root / 'chat.jsonl'))}, examples: 8}}]
    epochs: 1
    batch_size: 2
    max_length: 256
  - kind: rl
    data: [{{tasks: [chain_sum], config: {{min_terms: 2, max_terms: 3, min_digits: 1, max_digits: 1}}, problems: 2}}]
    num_generations: 2
    prompts_per_rollout: 2
    max_completion_length: 8
eval: {{tokens: 128, seq_len: 32, each_stage: {{tasks: []}}}}
export: {{verify: false}}
runtime: {{save_every: 2}}
""")
    return recipe


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "ling_surgery", *args]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def run_killed_in(recipe: Path, out: Path, kind_index: int, delay: float) -> tuple[int, str]:
    """`run RECIPE --resume`, SIGKILLed `delay` seconds after it starts stage `kind_index` (or left to finish if
    it never reaches it); returns its exit code and what it printed."""
    process = subprocess.Popen(cli("run", str(recipe), "--output", str(out), "--resume"), env=ENV, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines, reached = [], threading.Event()
    marker = f"stage {kind_index + 1}/{len(KINDS)}:"

    def drain():  # the pipe must keep flowing, or the run blocks on a full buffer
        for line in process.stderr:
            lines.append(line)
            if marker in line:
                reached.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    while not reached.wait(0.05):
        if process.poll() is not None:
            break
    if reached.is_set():
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
    code = process.wait(timeout=600)
    reader.join(timeout=10)
    return code, "".join(lines)


def test_sigkill_at_random_points_of_every_stage_kind_then_resume_gives_the_weights_of_an_unbroken_run(tmp_path):
    recipe = every_kind_recipe(tmp_path)
    unbroken = subprocess.run(cli("run", str(recipe), "--output", str(tmp_path / "unbroken")), env=ENV,
                              capture_output=True, text=True, timeout=900)
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]

    # How long each stage trained unbroken (its manifest's seconds; init: a moment): a kill lands at a random moment
    # inside it, never past its end (a kill past it would finish the next stage in the same launch, unkilled).
    seconds = [json.loads((tmp_path / "unbroken" / "stages" / f"{i + 1}-{kind}" / "ling_surgery_manifest.json"
                           ).read_text())["metrics"].get("seconds", 0.2) for i, kind in enumerate(KINDS)]
    out, rng, kills = tmp_path / "broken", random.Random(27), []
    for index, kind in enumerate(KINDS):  # one kill in each stage kind, at a random moment of it
        code, log = run_killed_in(recipe, out, index, rng.uniform(0.0, 0.8 * seconds[index]))
        assert code == -signal.SIGKILL and "Traceback" not in log, (kind, code, log[-3000:])
        started = [line.split(":")[0].strip("─ ") for line in log.splitlines() if " stage " in f" {line}" and "/6:" in line]
        kills.append((kind, started[-1] if started else "?"))
    finished = subprocess.run(cli("run", str(recipe), "--output", str(out), "--resume"), env=ENV, capture_output=True,
                              text=True, timeout=900)
    assert finished.returncode == 0, (kills, finished.stderr[-3000:])

    expected = load_file(tmp_path / "unbroken" / "model" / "model.safetensors")
    actual = load_file(out / "model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    leftovers = [p.name for p in out.rglob("*") if ".partial-" in p.name or p.name.endswith(".tmp") or ".old-" in p.name]
    assert not leftovers, leftovers


# In-process faults: the library's `run` on the tiny ci-smoke recipe, with the fault injected where it would strike.

from helpers import tiny_overrides, tiny_source_with_text  # noqa: E402
from rich.console import Console  # noqa: E402

from ling_surgery.surgery.config import load_recipe  # noqa: E402
from ling_surgery.surgery.run import run  # noqa: E402
from ling_surgery.surgery.stages import STAGES  # noqa: E402

LONGER = ["stages.logit_distill.tokens=512", "runtime.save_every=2", "export.verify=false"]  # 8 steps, a state every 2


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_source_with_text(tmp_path_factory.mktemp("src"))


def _run(source, out, *extra, **kwargs):
    recipe = load_recipe("ci-smoke", tiny_overrides(*source) + [*LONGER, *extra], output=str(out))
    return run(recipe, Console(quiet=True), **kwargs)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".partial-" in p.name or p.name.endswith(".tmp")
                  or ".old-" in p.name)


def saved_state(out: Path, stage: str = "3-logit_distill") -> dict:
    path = out / "stages" / f".{stage}.resume.pt"
    return torch.load(path, weights_only=False)


def strike_stage(monkeypatch, kind: str, before) -> None:
    """Run `before(model, ctx)` as stage `kind` starts (to set a fault up inside it)."""
    stage_fn = STAGES[kind]

    def wrapped(model, stage, ctx):
        before(model, ctx)
        return stage_fn(model, stage, ctx)

    monkeypatch.setitem(STAGES, kind, wrapped)


def final_weights(out: Path) -> dict:
    return load_file(out / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def unbroken(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("unbroken") / "run"
    _run(source, out)
    return final_weights(out)


def assert_same(weights: dict, expected: dict) -> None:
    assert weights.keys() == expected.keys()
    for name in expected:
        assert torch.equal(weights[name], expected[name]), name


def test_disk_full_while_saving_an_in_stage_checkpoint_keeps_the_previous_one(source, unbroken, tmp_path, monkeypatch):
    """torch.save on a full disk writes part of the file, then raises RuntimeError (not OSError): one line, the
    previous state intact, no temporary file; `--resume` then ends in the unbroken run's weights."""
    real_save, saves = torch.save, []

    def full_disk_on_the_second_state(obj, f, *args, **kwargs):
        if str(f).endswith("3-logit_distill.resume.pt.tmp"):
            saves.append(f)
            if len(saves) == 2:
                real_save(obj, f, *args, **kwargs)
                Path(f).write_bytes(Path(f).read_bytes()[:1000])  # what fitted
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 918")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_on_the_second_state)
    out = tmp_path / "run"
    with pytest.raises(SurgeryError, match=r"saving the training state to .*3-logit_distill.resume.pt' failed: "
                                           r"\[enforce fail .* GiB free there\); the previous state is kept"):
        _run(source, out)
    assert saved_state(out)["step"] == 2 and leftovers(out) == []
    monkeypatch.undo()
    _run(source, out, resume=True)
    assert_same(final_weights(out), unbroken)


def test_disk_full_while_saving_a_model_folder_leaves_nothing_half_written(source, unbroken, tmp_path, monkeypatch):
    """safetensors' writer returned normally on a full device with a short file: the folder is not committed (one
    line naming the file), the stages before stay, nothing temporary is left; `--resume` completes the run."""
    import transformers.modeling_utils as modeling_utils

    real_save, calls = modeling_utils.safe_save_file, []

    def short_on_the_second_folder(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        calls.append(filename)
        if len(calls) == 2:  # the attention_transfer checkpoint: cut as a full device left it
            Path(filename).write_bytes(Path(filename).read_bytes()[:-4096])

    monkeypatch.setattr(modeling_utils, "safe_save_file", short_on_the_second_folder)
    out = tmp_path / "run"
    with pytest.raises(SurgeryError, match=r"writing '.*2-attention_transfer' failed: the disk is full \(model"
                                           r".safetensors came out short, a truncated safetensors file .*; nothing was "
                                           "written there"):
        _run(source, out)
    assert (out / "stages" / "1-init" / "model.safetensors").is_file()
    assert not (out / "stages" / "2-attention_transfer").exists() and leftovers(out) == []
    monkeypatch.undo()
    _run(source, out, resume=True)  # from the stage's last in-stage state, kept
    assert_same(final_weights(out), unbroken)


def test_leftovers_of_killed_writes_are_put_right_by_the_next_run(source, tmp_path):
    """A kill mid-write leaves a `.partial-*` folder, a `*.tmp` state and, between the two renames of a replacement,
    the old folder moved aside: the next run removes the first two and puts the old folder back."""
    out = tmp_path / "run"
    _run(source, out)
    (out / "stages" / ".3-logit_distill.partial-x1y2").mkdir()
    (out / "stages" / ".3-logit_distill.partial-x1y2" / "model.safetensors").write_bytes(b"half")
    (out / "stages" / ".3-logit_distill.resume.pt.tmp").write_bytes(b"half")
    (out / ".model.partial-z9").mkdir()
    os.replace(out / "model", out / ".model.old-z8")
    report = _run(source, out)  # up to date once the model folder is back: nothing reruns
    assert leftovers(out) == [] and (out / "model" / "model.safetensors").is_file()
    assert report["stages"]["logit_distill"]["steps"] == 8


def test_nan_in_the_source_weights_is_refused_before_anything_is_written(source, tmp_path):
    import shutil

    from safetensors.torch import save_file

    model, data = source
    broken = tmp_path / "broken source"
    shutil.copytree(model, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    with pytest.raises(SurgeryError, match=r"are not finite: model.layers.1.mlp.down_proj.weight holds nan; the file "
                                           "is damaged"):
        _run((broken, data), out)
    assert not out.exists()


def test_a_batch_whose_outputs_overflow_stops_the_stage_naming_the_step_and_windows(source, tmp_path, monkeypatch):
    """The teacher's logits turn infinite on the 4th batch of logit distillation: the stage stops at step 3 naming the
    windows, and the state saved at step 2 is the one kept (finite)."""
    def overflow_on_the_fourth_batch(model, ctx):
        calls = []

        def hook(module, args, output):
            calls.append(1)
            return output * float("inf") if len(calls) == 4 else output

        ctx.teacher.lm_head.register_forward_hook(hook)

    strike_stage(monkeypatch, "logit_distill", overflow_on_the_fourth_batch)
    out = tmp_path / "run"
    with pytest.raises(SurgeryError, match=r"stage logit_distill: loss became (nan|inf) at step 3 \(the weights are "
                                           r"finite, so the outputs overflow on windows \d+–\d+ of the training text; "
                                           r"lower stages.logit_distill.lr.*\); the last in-stage checkpoint is kept"):
        _run(source, out)
    state = saved_state(out)
    assert state["step"] == 2 and all(torch.isfinite(p).all() for p in state["params"].values())


def test_a_gradient_that_overflows_stops_before_the_update_naming_the_weight(source, tmp_path, monkeypatch):
    """An infinite gradient (clipping would have turned every weight to NaN) at step 3: stopped before the optimizer
    step, naming the weight; the state at step 2 is kept and finite."""
    def inf_gradient_at_step_three(model, ctx):
        calls = []
        param = model.model.layers[0].mlp.down_proj.weight

        def hook(grad):
            calls.append(1)
            return grad * float("inf") if len(calls) == 4 else grad

        param.requires_grad_(True).register_hook(hook)  # (logit_distill trains the MLPs: it stays trainable)

    strike_stage(monkeypatch, "logit_distill", inf_gradient_at_step_three)
    out = tmp_path / "run"
    with pytest.raises(SurgeryError, match=r"stage logit_distill: the gradient norm became (nan|inf) at step 3, first in "
                                           r".*model.layers.0.mlp.down_proj.weight; the weights were not updated"):
        _run(source, out)
    state = saved_state(out)
    assert state["step"] == 2 and all(torch.isfinite(p).all() for p in state["params"].values())


def test_a_read_only_run_folder_is_one_line_and_left_as_it_was(source, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run(source, out)
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    read_only = {out, out / "stages"}
    for path in read_only:
        path.chmod(0o555)
    if os.geteuid() == 0:  # root writes through permission bits; a read-only mount stops it: answer as one would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: not (mode & os.W_OK and Path(path) in read_only)
                            and real_access(path, mode, **kw))
    try:
        with pytest.raises(SurgeryError, match=r"run folder '.*run' is not writable; make it writable"):
            _run(source, out, "stages.logit_distill.lr=1e-4")
    finally:
        for path in read_only:
            path.chmod(0o755)
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_a_run_folder_that_disappears_mid_run_is_one_line_and_not_recreated(source, tmp_path, monkeypatch):
    """The run folder is deleted (or its disk unmounted) while attention transfer trains: its first in-stage save
    says so in one line, and nothing recreates a half run folder."""
    import shutil

    out = tmp_path / "run"
    strike_stage(monkeypatch, "attention_transfer", lambda model, ctx: shutil.rmtree(out))
    with pytest.raises(SurgeryError, match=r"saving the training state to .* failed: '.*run/stages' no longer exists "
                                           r"\(deleted, moved or unmounted during the run\?\)"):
        _run(source, out, "stages.attention_transfer.tokens=512")
    assert not out.exists()

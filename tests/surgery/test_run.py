"""`run`: stage checkpoints with manifests, skipping what matches, rerunning what changed, --from, refusals."""

import json

import pytest
import torch
from helpers import tiny_overrides, tiny_source_with_text
from rich.console import Console

from ling_surgery.surgery.config import load_recipe
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.export import MANIFEST
from ling_surgery.surgery.run import run

STAGE_DIRS = ["1-init", "2-attention_transfer", "3-logit_distill"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_source_with_text(tmp_path_factory.mktemp("src"))


def _run(source, out, *extra, **kwargs):
    recipe = load_recipe("ci-smoke", tiny_overrides(*source) + ["export.verify=false", *extra], output=str(out))
    return run(recipe, Console(quiet=True), **kwargs)


def _manifests(out):
    return {d: json.loads((out / "stages" / d / MANIFEST).read_text()) for d in STAGE_DIRS}


def test_each_stage_writes_a_loadable_checkpoint_with_a_manifest(source, tmp_path):
    out = tmp_path / "run"
    report = _run(source, out)
    manifests = _manifests(out)
    assert [m["stage"] for m in manifests.values()] == ["init", "attention_transfer", "logit_distill"]
    assert manifests["2-attention_transfer"]["parent"]["fingerprint"] == manifests["1-init"]["fingerprint"]
    assert manifests["3-logit_distill"]["config"]["lr"] == 3e-4 and manifests["3-logit_distill"]["versions"]["torch"]
    assert manifests["3-logit_distill"]["metrics"]["steps"] == 4
    assert report["quality"]["student"]["perplexity"] > 1
    from transformers import AutoModelForCausalLM

    for folder in [out / "stages" / d for d in STAGE_DIRS] + [out / "model"]:
        assert AutoModelForCausalLM.from_pretrained(folder).config.model_type == "bailing_hybrid", folder
    assert (out / "recipe.yaml").is_file() and (out / "report.md").is_file() and (out / "distill_losses.png").is_file()


def test_rerun_skips_matching_stages_and_reruns_from_the_changed_one(source, tmp_path):
    out = tmp_path / "run"
    _run(source, out)
    first = _manifests(out)
    _run(source, out)  # unchanged: up to date, nothing rewritten
    assert _manifests(out) == first
    _run(source, out, "runtime.save_every=3", "runtime.kda_chunk_size=16")  # how, not what: still up to date
    assert _manifests(out) == first
    _run(source, out, "stages.attention_transfer.lr=1e-3")
    second = _manifests(out)
    assert second["1-init"] == first["1-init"]
    assert second["2-attention_transfer"]["fingerprint"] != first["2-attention_transfer"]["fingerprint"]
    assert second["3-logit_distill"]["fingerprint"] != first["3-logit_distill"]["fingerprint"]


def test_a_stage_trains_on_its_own_window_length_after_the_text_of_the_stages_before(source, tmp_path):
    from ling_surgery.surgery.checkpoint import stage_fingerprints
    from ling_surgery.surgery.run import stage_offsets

    short = load_recipe("ci-smoke", tiny_overrides(*source))
    longer = load_recipe("ci-smoke", tiny_overrides(*source) + ["stages.logit_distill.seq_len=64"])
    # Offsets are tokens: calibration 128, attention transfer 256 (windows of 32), then windows of 64 from token 384.
    assert stage_offsets(short) == [0, 128, 384, 640] and stage_offsets(longer) == [0, 128, 384, 640]
    assert stage_fingerprints(longer)[:2] == stage_fingerprints(short)[:2]
    assert stage_fingerprints(longer)[2] != stage_fingerprints(short)[2]
    out = tmp_path / "run"
    _run(source, out, "stages.logit_distill.seq_len=64")
    manifests = _manifests(out)
    assert manifests["3-logit_distill"]["config"]["seq_len"] == 64
    assert manifests["3-logit_distill"]["metrics"]["steps"] == 2  # 256 tokens in batches of 2 windows of 64
    assert manifests["2-attention_transfer"]["metrics"]["steps"] == 4  # 256 tokens in batches of 2 windows of 32


def test_from_reruns_the_named_stage_and_later_ones(source, tmp_path):
    out = tmp_path / "run"
    _run(source, out)
    first = _manifests(out)
    _run(source, out, from_stage="logit_distill")
    second = _manifests(out)
    assert second["1-init"] == first["1-init"] and second["2-attention_transfer"] == first["2-attention_transfer"]
    assert second["3-logit_distill"]["finished"] >= first["3-logit_distill"]["finished"]
    assert second["3-logit_distill"]["fingerprint"] == first["3-logit_distill"]["fingerprint"]
    with pytest.raises(SurgeryError, match="--from 'distill': no such stage; stages: init, attention_transfer"):
        _run(source, out, from_stage="distill")


def test_from_cannot_skip_a_stage_that_is_not_done(source, tmp_path):
    out = tmp_path / "run"
    _run(source, out)
    with pytest.raises(SurgeryError, match="stage 'attention_transfer' before it has no up-to-date checkpoint"):
        _run(source, out, "stages.attention_transfer.lr=1e-3", from_stage="logit_distill")


def test_an_interrupted_stage_needs_resume_or_from(source, tmp_path):
    from ling_surgery.surgery.checkpoint import stage_fingerprints

    out = tmp_path / "run"
    _run(source, out)
    recipe = load_recipe("ci-smoke", tiny_overrides(*source) + ["stages.logit_distill.tokens=512"])
    from ling_surgery.surgery.run import RunFolder

    state = RunFolder(out).training_state(2, recipe.stages[2], stage_fingerprints(recipe)[2])
    state.save({"step": 3}, 3, 8)  # what a killed stage leaves behind
    with pytest.raises(SurgeryError, match=r"stage 'logit_distill' was interrupted at step 3/8; pass --resume .* or --from logit_distill"):
        _run(source, out, "stages.logit_distill.tokens=512")
    _run(source, out, "stages.logit_distill.tokens=512", from_stage="logit_distill")  # start over: the state is dropped
    assert not state.path.exists()


def test_output_that_is_not_a_run_folder_is_refused(source, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SurgeryError, match="exists and is not a ling-surgery run folder"):
        _run(source, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_all_mla_target_runs_end_to_end(source, tmp_path):
    out = tmp_path / "mla"
    recipe = load_recipe("ci-smoke", tiny_overrides(*source) + ["target=all-mla", "plan.layer_group_size=null"], output=str(out))
    report = run(recipe, Console(quiet=True))
    assert report["export_check"]["bit_exact"] and report["export_check"]["greedy_cache_matches"]
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    assert report["costs"]["student"]["state_bytes_per_sequence"] == 0
    # The init is close to lossless for all-MLA: it starts far better than a KDA hybrid would.
    assert report["quality"]["student_after_init"]["perplexity"] < 10 * report["quality"]["teacher"]["perplexity"]
    assert torch.isfinite(torch.tensor(report["quality"]["student"]["perplexity"]))


def test_recipe_benchmarks_run_after_export(source, tmp_path):
    out = tmp_path / "run"
    report = _run(source, out, "eval.tasks=[wikipedia]", "eval.limit=1")
    benchmarks = json.loads((out / "eval" / "report.json").read_text())
    assert benchmarks["tasks"]["wikipedia"]["teacher"]["n"] == 1 and "ratio" in benchmarks["tasks"]["wikipedia"]
    assert report["benchmarks"]["models"]["student"]["ref"] == str(out / "model")
    assert not benchmarks["inference"]  # eval.inference is off by default


def test_every_stage_runs_under_bf16(source, tmp_path):
    """runtime.dtype=bfloat16 on CPU: bf16 teacher, every training step under bf16 autocast (the CUDA path)."""
    import math

    report = _run(source, tmp_path / "run", "runtime.dtype=bfloat16")
    manifests = _manifests(tmp_path / "run")
    for name in ("2-attention_transfer", "3-logit_distill"):
        losses = manifests[name]["metrics"]["losses"]
        assert losses and all(math.isfinite(x) for x in losses), name
    assert math.isfinite(report["quality"]["student"]["perplexity"])


def test_each_stage_evals_make_a_trajectory(source, tmp_path):
    """eval.each_stage: every stage's model is scored (the teacher once); the report shows where quality moves."""
    from ling_surgery.evals.suite import run_eval
    from ling_surgery.evals.trajectory import read_trajectory

    out = tmp_path / "run"
    report = _run(source, out, "eval.each_stage.tasks=[arc_easy]", "eval.each_stage.limit=2")
    manifests = _manifests(out)
    teacher_scores = set()
    for name, manifest in manifests.items():
        pair = manifest["metrics"]["evals"]["arc_easy"]
        assert pair["student"]["n"] == 2 and pair["student"]["primary"] == "acc_norm" and "gen_acc" in pair["student"]
        teacher_scores.add(json.dumps(pair["teacher"], sort_keys=True))
    assert len(teacher_scores) == 1  # the teacher is scored once and the same numbers go into every stage
    assert list(report["trajectory"]) == ["init", "attention_transfer", "logit_distill"]
    assert read_trajectory(out) == read_trajectory(out / "model") == report["trajectory"]
    assert (out / "trajectory.png").is_file() and "## After every stage" in (out / "report.md").read_text()
    evaluated = run_eval({"teacher": str(source[0]), "student": str(out)}, ["arc_easy"], limit=1, contexts=(),
                         console=Console(quiet=True))
    assert evaluated["trajectory"] == report["trajectory"]


def test_an_moe_source_runs_every_stage_with_routing_and_load_in_the_manifests(tmp_path):
    """A tiny Qwen3-MoE through the smoke recipe: routing fidelity and the router-only swap after init, expert load in
    the training stages, the export reloaded bit-exactly in a fresh process."""
    out = tmp_path / "run"
    source = tiny_source_with_text(tmp_path / "src", "qwen3_moe")
    report = _run(source, out, "export.verify=true", "stages.logit_distill.trainable=[all]")
    manifests = _manifests(out)
    init = manifests["1-init"]["metrics"]
    assert {f["topk_agreement"] for f in init["moe_routing"].values()} == {1.0}
    assert init["moe_router_swap"]["kl"] < 1e-3
    load = manifests["3-logit_distill"]["metrics"]["expert_load"]
    assert list(load) == ["0", "1", "2", "3"] and all(layer["routed"] == 256 * 2 for layer in load.values())
    assert report["export_check"]["bit_exact"]
    assert report["costs"]["teacher"]["active_params"] < report["costs"]["teacher"]["params"]


def test_an_export_that_does_not_reload_exactly_fails_the_run_and_writes_nothing(source, tmp_path, monkeypatch):
    """The fresh-process check is a gate: a mismatch (simulated) stops the run naming its size, before the model folder
    is committed; the stage checkpoints stay, and a rerun with a good export writes it."""
    from ling_surgery.surgery import export

    real = export.verify_export

    def off_by_a_bit(folder, model, input_ids):
        return {**real(folder, model, input_ids), "max_abs_diff": 0.25, "bit_exact": False}

    monkeypatch.setattr(export, "verify_export", off_by_a_bit)
    out = tmp_path / "run"
    with pytest.raises(SurgeryError, match=r"export check failed: .* max \|Δlogit\| = 0.25 \(expected 0\)"):
        _run(source, out, "export.verify=true")
    assert not (out / "model").exists() and not list(out.glob("model*"))
    assert all((out / "stages" / d / MANIFEST).is_file() for d in STAGE_DIRS)
    monkeypatch.undo()
    assert _run(source, out, "export.verify=true")["export_check"]["bit_exact"]
    assert (out / "model" / "config.json").is_file()

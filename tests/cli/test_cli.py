"""The CLI end to end on a tiny saved model: success, dry-run, and bad inputs exiting 2 with one line."""

import json
import os
import subprocess
import sys

import pytest
from helpers import save_tiny_source, text_file

TINY_BUDGET = [
    "--set", "plan.layer_group_size=2", "--set", "mla.kv_lora_rank=32", "--set", "mla.qk_rope_head_dim=8",
    "--set", "data.seq_len=32", "--set", "data.heldout_fraction=0.3", "--set", "calibration.tokens=128",
    "--set", "attention_transfer.tokens=256", "--set", "attention_transfer.batch_size=2",
    "--set", "logit_distill.tokens=256", "--set", "logit_distill.batch_size=2",
    "--set", "eval.tokens=128", "--set", "eval.seq_len=32",
]


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ling_surgery", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    save_tiny_source(root / "model")
    data = root / "data.txt"
    data.write_text("".join(f"Paragraph {i}: " + "the model reads text and learns. " * 3 + "\n\n" for i in range(200)))
    return root / "model", data


def _error_line(result):
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert lines, result.stderr
    return lines[-1]


def test_convert_end_to_end(source, tmp_path):
    model, data = source
    out = tmp_path / "upgraded"
    result = run_cli("convert", str(model), "--target", "hybrid-linear", "--output", str(out), "--set", f"data.train={data}", *TINY_BUDGET)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["export_check"]["bit_exact"] and report["export_check"]["greedy_cache_matches"]
    assert report["quality"]["teacher"]["perplexity"] > 1 and report["quality"]["student"]["perplexity"] > 1
    assert report["stages"]["attention_transfer"]["steps"] == 4
    for name in ("report.md", "distill_losses.png", "config.json", "ling_surgery_manifest.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_dry_run_prints_the_plan(source):
    model, _ = source
    result = run_cli("convert", str(model), "--dry-run", "--set", "plan.layer_group_size=2", "--set", "mla.kv_lora_rank=32",
                     "--set", "mla.qk_rope_head_dim=8")
    assert result.returncode == 0, result.stderr
    assert "KV cache / token" in result.stderr and "MLA" in result.stderr and "layer_group_size=2" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "./missing-model", "--output", "o"], "not found"),
        (["convert", "{model}", "--output", "o", "--set", "plan.layer_group_size=3"], "does not divide"),
        (["convert", "{model}", "--output", "o", "--set", "plan.layr_group_size=2"], "did you mean 'layer_group_size'"),
        (["convert", "{model}", "--output", "{exists}"], "already exists"),
        (["convert", "{model}", "--output", "{blocked}/sub"], "cannot create"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(source, tmp_path, args, message):
    model, _ = source
    (tmp_path / "exists").mkdir()
    (tmp_path / "blocked").write_text("a file, not a folder")
    args = [a.format(model=model, exists=tmp_path / "exists", blocked=tmp_path / "blocked") for a in args]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in _error_line(result)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_exit_2(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    result = run_cli("convert", str(tmp_path / "gpt2"), "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "supported: llama, mistral, qwen2, qwen3" in _error_line(result)

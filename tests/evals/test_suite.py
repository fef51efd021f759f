"""`eval` / `report` end to end on a tiny teacher and its upgraded model: every task kind, cost, files, bad input."""

import json
import os
import subprocess
import sys

import pytest
from helpers import tiny_overrides, tiny_source_with_text
from rich.console import Console

from ling_surgery.evals.suite import run_eval
from ling_surgery.surgery.config import load_recipe
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.run import run


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(teacher folder, run folder of its upgrade, user data files for every task kind)."""
    root = tmp_path_factory.mktemp("eval")
    model, text = tiny_source_with_text(root)
    recipe = load_recipe("ci-smoke", tiny_overrides(model, text) + ["export.verify=false"], output=str(root / "run"))
    run(recipe, Console(quiet=True))
    data = {
        "lambada": [{"context": f"Paragraph {i}: the model reads text and", "continuation": " learns"} for i in range(6)],
        "arc_easy": [{"context": "Question: What does the model do?\nAnswer:", "choices": [" reads text", " flies"], "gold": 0}] * 4,
        "gsm8k": [{"question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(2)],
    }
    files = {}
    for name, rows in data.items():
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, root / "run", files


def test_report_compares_teacher_and_student_on_every_task_kind(pair, tmp_path):
    teacher, student, files = pair
    out = tmp_path / "report"
    report = run_eval({"teacher": str(teacher), "student": str(student)}, ["wikipedia", "lambada", "arc_easy", "gsm8k"],
                      limit=2, output=out, contexts=(16, 48), data={k: str(v) for k, v in files.items()},
                      console=Console(quiet=True))
    # The student is a run folder whose recipe scored every stage (eval.each_stage): its trajectory comes along.
    assert set(report) == {"kind", "models", "tasks", "inference", "settings", "seconds", "trajectory",
                           "trajectory_roles"}
    assert list(report["trajectory"]) == ["init", "attention_transfer", "logit_distill"]
    assert report["trajectory_roles"] == ["teacher", "upgraded"]  # a conversion's run (an align run's: before/aligned)
    assert report["models"]["student"]["model_type"] == "bailing_hybrid" and report["models"]["teacher"]["model_type"] == "llama"
    for name, by_role in report["tasks"].items():
        for role in ("teacher", "student"):
            result = by_role[role]
            assert {"kind", "n", "primary", "value", "stderr", "seconds"} <= set(result), name
        teacher_value = by_role["teacher"]["value"]
        expected = by_role["student"]["value"] / teacher_value if teacher_value else None
        assert by_role["ratio"] == pytest.approx(expected) if expected is not None else by_role["ratio"] is None
    assert report["tasks"]["wikipedia"]["teacher"]["n"] == 2  # the limit counts 512-token windows
    assert report["tasks"]["arc_easy"]["teacher"]["n"] == 2 and report["tasks"]["lambada"]["teacher"]["n"] == 2
    gsm = report["tasks"]["gsm8k"]["student"]
    assert gsm["output_tokens_total"] > 0 and gsm["correct_per_1k_tokens"] >= 0 and len(gsm["samples"]) == 2
    for role in ("teacher", "student"):
        cost = report["inference"][role]
        for row in cost["contexts"]:
            # Memory measured from the cache objects agrees with the analytic formula.
            assert row["cache_bytes_measured"] == pytest.approx(row["cache_bytes_computed"], rel=0.10), (role, row)
            assert row["decode_ms_per_token"] > 0 and row["prefill_tokens_per_second"] > 0
    teacher_rows = report["inference"]["teacher"]["contexts"]
    assert teacher_rows[1]["cache_bytes_measured"] == 3 * teacher_rows[0]["cache_bytes_measured"]  # KV grows linearly
    for name in ("report.json", "report.md", "quality.png", "inference.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["kind"] == "ling-surgery-eval"
    assert "| arc_easy (acc_norm) | 2 |" in (out / "report.md").read_text()
    # An earlier report folder is replaced; any other existing folder is refused.
    run_eval({"model": str(teacher)}, ["arc_easy"], limit=1, output=out, contexts=(), data={"arc_easy": str(files["arc_easy"])},
             console=Console(quiet=True))
    assert set(json.loads((out / "report.json").read_text())["models"]) == {"model"}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(SurgeryError, match="is not an earlier eval report"):
        run_eval({"model": str(teacher)}, ["arc_easy"], output=tmp_path / "mine", contexts=(), console=Console(quiet=True))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ling_surgery", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_bad_eval_inputs_are_one_line_errors(pair, tmp_path):
    from transformers import BertConfig

    teacher, _, files = pair
    BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32,
               architectures=["BertModel"]).save_pretrained(tmp_path / "bert")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["eval", str(tmp_path / "bert"), "--tasks", "arc_easy"], "is not a causal language model"),
        (["eval", str(teacher), "--tasks", "arc_easy,nope"], "unknown task 'nope'"),
        (["eval", str(teacher), "--tasks", "arc_easy", "--data", f"arc_easy={empty}"], "no documents"),
        (["eval", str(teacher), "--tasks", "arc_easy", "--data", f"lambada={files['lambada']}"], "not among the tasks"),
        (["eval", str(teacher), "--contexts", "1k"], "expected comma-separated token counts"),
        (["eval", str(tmp_path / "nothing")], "not found"),
    ]
    for args, message in cases:
        result = _cli(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and message in lines[-1], (args, result.stderr[-1500:])
        assert "Traceback" not in result.stderr


def test_tradeoff_plots_recall_against_speed_and_cache_for_each_layout(pair, tmp_path):
    """Real inference numbers for three models; the recall results are set by hand (the character tokenizer's passkey
    prompt does not fit the tiny models' 256 positions), so which point is where can be checked."""
    from ling_surgery.evals.tradeoff import bench_tradeoff, tradeoff_plot, tradeoff_points, tradeoff_table

    teacher, student, _ = pair
    report = run_eval({"teacher": str(teacher), "run": str(student), "model": str(student / "model")}, [],
                      contexts=(16, 48), console=Console(quiet=True))
    report["tasks"]["passkey"] = {
        role: {"value": value, "variants": {"passkey": {"by_length": {"512": value, "2048": value / 2}}}}
        for role, value in (("teacher", 1.0), ("run", 0.5), ("model", 0.25))
    }
    points = tradeoff_points(report)
    assert [p["model"] for p in points] == ["teacher", "run", "model"]
    assert [p["recall"] for p in points] == [1.0, 0.5, 0.25] and points[2]["recall_by_length"] == {"512": 0.25, "2048": 0.125}
    for p in points:
        row = report["inference"][p["model"]]["contexts"][-1]
        assert p["context"] == 48 and p["decode_ms_per_token"] == row["decode_ms_per_token"]
        assert p["cache_bytes"] == row["cache_bytes_computed"]
    assert points[0]["speedup"] == 1.0
    assert points[1]["speedup"] == pytest.approx(points[0]["decode_ms_per_token"] / points[1]["decode_ms_per_token"])
    assert points[1]["cache_bytes"] == points[2]["cache_bytes"] != points[0]["cache_bytes"]
    tradeoff_plot(points, tmp_path / "tradeoff.png")
    assert (tmp_path / "tradeoff.png").stat().st_size > 0 and tradeoff_table(points).row_count == 3
    with pytest.raises(SurgeryError, match="no 'niah' results"):
        tradeoff_points(report, "niah")
    with pytest.raises(SurgeryError, match="teacher"):
        bench_tradeoff(str(teacher), {"teacher": str(student)}, tmp_path / "x", (16,))

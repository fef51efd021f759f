"""Stage summaries keep what a trajectory is read by: the primary metric and, for recall, every grid cell."""

from ling_surgery.evals.recall import RecallItem, recall_result
from ling_surgery.evals.trajectory import summary


def test_recall_summary_keeps_each_length_and_depth_cell():
    cells = [(512, 0.0, True), (512, 1.0, False), (2048, 0.0, True), (2048, 0.0, False), (2048, 1.0, True)]
    items = [RecallItem([1, 2], [3], "3", length, depth, "passkey") for length, depth, _ in cells]
    kept = summary(recall_result(items, [ok for *_, ok in cells], samples=[], skipped=[]))
    assert kept["value"] == 3 / 5 and kept["n"] == 5
    assert kept["by_length"] == {"passkey": {"512": 0.5, "2048": 2 / 3}}
    assert kept["grid"] == {"passkey": {"512": {"0": 1.0, "1": 0.0}, "2048": {"0": 0.5, "1": 1.0}}}
    assert "samples" not in kept  # decoded samples stay in the full result, not in every stage manifest


def test_a_run_folder_names_what_its_trajectory_compares(tmp_path):
    import json

    from ling_surgery.evals.trajectory import run_roles, trajectory_markdown

    (tmp_path / "stages").mkdir()
    (tmp_path / "model").mkdir()
    assert run_roles(tmp_path / "model") == ("teacher", "upgraded")  # no report yet: a conversion's names
    (tmp_path / "report.json").write_text(json.dumps({"meta": {"roles": ["before", "aligned"]}}))
    assert run_roles(tmp_path / "model") == run_roles(tmp_path) == ("before", "aligned")
    assert "| stage: task (metric) | before | aligned | ratio |" in trajectory_markdown({}, run_roles(tmp_path))

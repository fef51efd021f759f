"""The report's cost table."""

from ling_surgery.evals.report import cost_rows, rl_plot, trailing_mean
from ling_surgery.surgery.plan import Costs


def test_cost_rows_give_each_models_own_recurrent_state():
    # An align run compares an upgraded model with itself: "before" has a recurrent state too.
    before, after = Costs(100, 960, 4 << 20), Costs(100, 960, 4 << 20)
    rows = {name: (a, b) for name, a, b, _ in cost_rows(before, after)}
    assert rows["recurrent state / sequence"] == ("4.0 MiB", "4.0 MiB")
    dense = {name: (a, b) for name, a, b, _ in cost_rows(Costs(100, 9600, 0), after)}
    assert dense["recurrent state / sequence"] == ("0 B", "4.0 MiB")


def test_rl_curves_draw_a_trailing_mean_per_mode(tmp_path):
    assert trailing_mean([1.0, 3.0, 5.0, 7.0, 9.0], window=2) == [1.0, 2.0, 4.0, 6.0, 8.0]
    history = [{"step": s, "fast/reward": 0.1 * s, "fast/correct": 0.0, "fast/completion_length": 3.0,
                "think/reward": -0.1, "think/correct": 0.5, "think/completion_length": 40.0 - s} for s in (1, 3, 5)]
    history.insert(1, {"step": 2, "drift": 0.0})  # the second update of a rollout logs no rewards
    assert rl_plot({"rl": {"history": history}}, tmp_path / "rl.png").stat().st_size > 0
    assert rl_plot({"sft": {"loss_first": 1.0}}, tmp_path / "none.png") is None

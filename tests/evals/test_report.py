"""The report's cost table."""

from ling_surgery.evals.report import cost_rows
from ling_surgery.surgery.plan import Costs


def test_cost_rows_give_each_models_own_recurrent_state():
    # An align run compares an upgraded model with itself: "before" has a recurrent state too.
    before, after = Costs(100, 960, 4 << 20), Costs(100, 960, 4 << 20)
    rows = {name: (a, b) for name, a, b, _ in cost_rows(before, after)}
    assert rows["recurrent state / sequence"] == ("4.0 MiB", "4.0 MiB")
    dense = {name: (a, b) for name, a, b, _ in cost_rows(Costs(100, 9600, 0), after)}
    assert dense["recurrent state / sequence"] == ("0 B", "4.0 MiB")

"""Progress bars in logs (no live display): a plain line per 10%, and a total that can shrink."""

import io

from rich.console import Console

from ling_surgery.surgery.progress import training_progress


def _log_lines(total: int, steps: list[int], shrink_after: int | None = None, shrink_by: int = 0) -> list[str]:
    out = io.StringIO()
    with training_progress("bench", total, Console(file=out, force_terminal=False, width=120)) as bar:
        for i, step in enumerate(steps):
            bar.advance(step)
            if i == shrink_after:
                bar.shrink(shrink_by)
    return [line for line in out.getvalue().splitlines() if line.startswith("bench: ")]


def test_a_step_across_several_tenths_logs_one_line_and_small_steps_after_it_none():
    # 512-token prefill chunks cross two 10% marks at once; the 4-token decode steps after them must not each print
    lines = _log_lines(2176, [512] * 4 + [4] * 32)
    assert [line.split()[1] for line in lines] == ["512/2176", "1024/2176", "1536/2176", "2048/2176", "2176/2176"]


def test_work_dropped_from_the_total_finishes_the_bar():
    # a benchmark setting stops early after the second step; the other settings go on to the end
    lines = _log_lines(1000, [300, 300, 100], shrink_after=1, shrink_by=300)
    assert lines[-1].split()[1] == "700/700"

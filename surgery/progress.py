"""Rich progress bars for long work: amount done, rate (tokens/s, or documents/s), metrics and ETA."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


class _Rate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.{0 if self.unit == 'tok' else 2}f} {self.unit}/s" if speed else f"– {self.unit}/s", style="cyan")


class _Bar:
    def __init__(self, progress: Progress, task, name: str, unit: str):
        self._progress, self._task, self._name, self._unit = progress, task, name, unit
        self._next_log = self._next_tenth(progress.tasks[0])

    @staticmethod
    def _next_tenth(task) -> float:
        """The next 10% mark above the work done (one log line when a step crosses several)."""
        return (int(10 * task.completed / task.total) + 1) / 10 if task.total else 0.1

    def advance(self, tokens: int, **fields) -> None:
        text = "  ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4g}" for k, v in fields.items())
        self._progress.update(self._task, advance=tokens, metrics=text)
        task = self._progress.tasks[0]
        if not self._progress.console.is_terminal and task.completed >= self._next_log * task.total:
            # Logs and CI have no live display: print a plain line every 10%.
            self._next_log = self._next_tenth(task)
            unit = "tokens" if self._unit == "tok" else self._unit
            speed = f"{task.speed:,.{0 if self._unit == 'tok' else 2}f} {self._unit}/s" if task.speed else ""
            eta = f"ETA {task.time_remaining:.0f} s" if task.time_remaining else ""
            self._progress.console.print(f"{self._name}: {task.completed:.0f}/{task.total:.0f} {unit}  {speed}  {text}  {eta}")

    def shrink(self, units: int) -> None:
        """Work that will not be done after all (e.g. a benchmark setting stopped early) leaves the total."""
        task = self._progress.tasks[0]
        self._progress.update(self._task, total=max(task.completed, task.total - units))


@contextmanager
def training_progress(name: str, total: int, console: Console | None = None, completed: int = 0, unit: str = "tok"):
    """A bar over `total` units (tokens by default; e.g. unit="docs" for generation)."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(unit),
        TextColumn("{task.fields[metrics]}"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=False,
    )
    with progress:
        task = progress.add_task(name, total=total, completed=completed, metrics="")
        yield _Bar(progress, task, name, unit)

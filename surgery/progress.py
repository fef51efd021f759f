"""Rich progress bars for long work: tokens done, tokens/s, loss and ETA."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tok/s" if speed else "– tok/s", style="cyan")


class _Bar:
    def __init__(self, progress: Progress, task, name: str):
        self._progress, self._task, self._name = progress, task, name
        task_state = progress.tasks[0]
        self._next_log = (int(10 * task_state.completed / task_state.total) + 1) / 10 if task_state.total else 0.1

    def advance(self, tokens: int, **fields) -> None:
        text = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
        self._progress.update(self._task, advance=tokens, metrics=text)
        task = self._progress.tasks[0]
        if not self._progress.console.is_terminal and task.completed >= self._next_log * task.total:
            # Logs and CI have no live display: print a plain line every 10%.
            self._next_log += 0.1
            speed = f"{task.speed:,.0f} tok/s" if task.speed else ""
            eta = f"ETA {task.time_remaining:.0f} s" if task.time_remaining else ""
            self._progress.console.print(f"{self._name}: {task.completed:.0f}/{task.total:.0f} tokens  {speed}  {text}  {eta}")


@contextmanager
def training_progress(name: str, total_tokens: int, console: Console | None = None, completed: int = 0):
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _TokensPerSecond(),
        TextColumn("{task.fields[metrics]}"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=False,
    )
    with progress:
        task = progress.add_task(name, total=total_tokens, completed=completed, metrics="")
        yield _Bar(progress, task, name)

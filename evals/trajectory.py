"""Quality after every stage: `eval.each_stage` tasks on each stage's model (the teacher once per run), kept in the
stage manifests and shown as a trajectory, so a stage that loses recall or generation quality is seen where it does.

A run folder's trajectory is `{stage name: {task: {"teacher": summary, "student": summary}}}` in stage order; a
summary keeps the primary metric, its standard error and n, plus `gen_acc` (multiple choice answered by generating
the letter) and, for recall tasks, accuracy per length and per (length, depth) cell, so a stage's recall can be read
against the teacher's cell by cell.
"""

from __future__ import annotations

import json
from pathlib import Path

from ling_surgery.evals.report import DEFAULT_ROLES, report_roles
from ling_surgery.surgery.export import MANIFEST


class StageEvaluator:
    """Runs the recipe's `eval.each_stage` tasks on a stage's model; the teacher's scores are computed once."""

    def __init__(self, config, teacher, tokenizer, device, chunk_size: int, seed: int, heldout_fraction: float, console):
        from ling_surgery.evals.tasks import load_task

        self.tasks = [load_task(name, config.limit, seed, None, heldout_fraction, tuple(config.recall_lengths),
                                tuple(config.recall_depths)) for name in config.tasks]
        self.teacher, self.tokenizer, self.device, self.chunk_size = teacher, tokenizer, device, chunk_size
        self.console = console
        self._teacher_results: dict | None = None

    def __call__(self, model, stage_name: str) -> dict:
        from ling_surgery.evals.evaluate import evaluate
        from ling_surgery.evals.scoring import LoadedModel

        if self._teacher_results is None:
            teacher = LoadedModel("teacher", self.teacher, self.tokenizer, self.device, self.chunk_size)
            self._teacher_results = evaluate(teacher, self.tasks, self.console)
        student = evaluate(LoadedModel(f"after {stage_name}", model, self.tokenizer, self.device, self.chunk_size),
                           self.tasks, self.console)
        return {name: {"teacher": summary(self._teacher_results[name]), "student": summary(result)}
                for name, result in student.items()}


def summary(result: dict) -> dict:
    keep = {k: result[k] for k in ("primary", "value", "stderr", "n", "gen_acc") if k in result}
    if result.get("kind") == "recall":
        keep["by_length"] = {variant: v["by_length"] for variant, v in result["variants"].items()}
        keep["grid"] = {variant: v["grid"] for variant, v in result["variants"].items()}
    return keep


def run_root(run_folder: str | Path) -> Path:
    """The run folder itself, given it or the model/ folder inside it."""
    root = Path(run_folder)
    return root.parent if root.name == "model" and (root.parent / "stages").is_dir() else root


def run_roles(run_folder: str | Path) -> tuple[str, str]:
    """What a run's trajectory compares (its report's column names: teacher/upgraded, or before/aligned)."""
    try:
        return report_roles(json.loads((run_root(run_folder) / "report.json").read_text()))
    except (OSError, ValueError):
        return DEFAULT_ROLES


def read_trajectory(run_folder: str | Path) -> dict | None:
    """The stage-by-stage scores of a run folder (or of the model/ folder inside one); None if it has none."""
    root = run_root(run_folder)
    stages = sorted((root / "stages").glob("*/" + MANIFEST), key=lambda p: int(p.parent.name.split("-", 1)[0])) \
        if (root / "stages").is_dir() else []
    trajectory = {}
    for path in stages:
        try:
            manifest = json.loads(path.read_text())
        except ValueError:
            continue
        evals = (manifest.get("metrics") or {}).get("evals")
        if evals:
            trajectory[manifest.get("stage", path.parent.name)] = evals
    return trajectory or None


def trajectory_rows(trajectory: dict) -> list[list[str]]:
    """One row per stage and task: the upgraded model's score after the stage, the teacher's, and their ratio."""
    rows = []
    for stage, evals in trajectory.items():
        for task, pair in evals.items():
            s, t = pair["student"], pair["teacher"]
            cell = f"{s['value']:.3f}" + (f" (generated {s['gen_acc']:.3f})" if "gen_acc" in s else "")
            ref = f"{t['value']:.3f}" + (f" (generated {t['gen_acc']:.3f})" if "gen_acc" in t else "")
            ratio = f"{s['value'] / t['value']:.2f}×" if t["value"] else "—"
            rows.append([f"after {stage}: {task} ({s['primary']})", ref, cell, ratio])
    return rows


def trajectory_table(trajectory: dict, roles: tuple[str, str] = DEFAULT_ROLES):
    from rich.table import Table

    table = Table(title="after every stage (eval.each_stage of the run)")
    for col in ("stage: task (metric)", *roles, "ratio"):
        table.add_column(col, justify="left" if col.startswith("stage") else "right")
    for row in trajectory_rows(trajectory):
        table.add_row(*row)
    return table


def trajectory_markdown(trajectory: dict, roles: tuple[str, str] = DEFAULT_ROLES) -> list[str]:
    lines = ["", "## After every stage (eval.each_stage)", "", f"| stage: task (metric) | {roles[0]} | {roles[1]} | ratio |",
             "|---|---:|---:|---:|"]
    return lines + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in trajectory_rows(trajectory)]


def trajectory_plot(trajectory: dict, path: Path, roles: tuple[str, str] = DEFAULT_ROLES) -> None:
    """Each task's score after every stage (solid), the reference model's (dashed: the teacher, or the model before
    alignment)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(trajectory)
    tasks = list(dict.fromkeys(t for evals in trajectory.values() for t in evals))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(stages)), 3.8))
    for task in tasks:
        points = [(i, trajectory[s][task]["student"]["value"]) for i, s in enumerate(stages) if task in trajectory[s]]
        line = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=task)
        teacher = next(trajectory[s][task]["teacher"]["value"] for s in stages if task in trajectory[s])
        ax.axhline(teacher, color=line[0].get_color(), linestyle="--", alpha=0.6)
    ax.set_xticks(range(len(stages)), stages, rotation=20, ha="right")
    ax.set(ylabel="primary metric", title=f"after every stage (dashed: {roles[0]})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

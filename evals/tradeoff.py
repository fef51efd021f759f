"""`ling-surgery bench tradeoff`: recall against decode speed and cache size for several layouts of one source.

Each layout (a run folder, model folder or GGUF) is evaluated with the teacher in one `run_eval`: the recall tasks on
the same grid and the inference benchmark in the same engine, interleaved. The result is a table and `tradeoff.png`:
recall (y) against decode speed relative to the teacher (x, left) and against cache size (x, right), one point per
model, so a layout is chosen by numbers.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ling_surgery.surgery.errors import SurgeryError


def tradeoff_points(report: dict, task: str = "passkey") -> list[dict]:
    """Per model of an eval report: recall (overall and per length), decode ms/token and cache bytes at the longest
    context every model reached, and decode speed relative to the teacher's (the first model)."""
    inference = report.get("inference") or {}
    results = report["tasks"].get(task) or {}
    roles = [r for r in report["models"] if r in inference and r in results]
    if not roles:
        raise SurgeryError(f"the report has no {task!r} results with inference numbers to trade off")
    reached = [{row["context"] for row in inference[r]["contexts"]} for r in roles]
    context = max(set.intersection(*reached))
    points = []
    for role in roles:
        row = next(row for row in inference[role]["contexts"] if row["context"] == context)
        by_length = {}
        for variant in (results[role].get("variants") or {}).values():
            for length, acc in variant["by_length"].items():
                by_length.setdefault(length, []).append(acc)
        points.append({
            "model": role,
            "recall": results[role]["value"],
            "recall_by_length": {k: sum(v) / len(v) for k, v in by_length.items()},
            "context": context,
            "decode_ms_per_token": row["decode_ms_per_token"],
            "cache_bytes": row["cache_bytes_computed"],
        })
    base = points[0]["decode_ms_per_token"]
    for point in points:
        point["speedup"] = base / point["decode_ms_per_token"] if point["decode_ms_per_token"] else float("nan")
    return points


def tradeoff_table(points: list[dict], task: str = "passkey") -> Table:
    from ling_surgery.surgery.plan import human_bytes

    lengths = sorted({int(k) for p in points for k in p["recall_by_length"]})
    context = points[0]["context"]
    table = Table(title=f"{task} recall against decode speed and cache at {context} tokens")
    for col in ["model", f"{task} (all)", *[f"@{n}" for n in lengths], "decode ms/tok", "speed vs teacher", "cache"]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for p in points:
        table.add_row(p["model"], f"{p['recall']:.2f}",
                      *[f"{p['recall_by_length'].get(str(n), float('nan')):.2f}" for n in lengths],
                      f"{p['decode_ms_per_token']:.1f}", f"{p['speedup']:.2f}×", human_bytes(p["cache_bytes"]))
    return table


def tradeoff_plot(points: list[dict], path: Path, task: str = "passkey") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for p in points:
        for ax, x in ((left, p["speedup"]), (right, p["cache_bytes"] / 2**20)):
            ax.scatter([x], [p["recall"]], s=60, marker="s" if p is points[0] else "o")
            ax.annotate(p["model"], (x, p["recall"]), textcoords="offset points", xytext=(6, 4), fontsize=9)
    context = points[0]["context"]
    left.set(xlabel=f"decode speed at {context} tokens (× the teacher's)", ylabel=f"{task} accuracy",
             title="recall against decode speed")
    right.set(xscale="log", xlabel=f"cache at {context} tokens (MiB, one sequence)", ylabel=f"{task} accuracy",
              title="recall against cache size")
    for ax in (left, right):
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_tradeoff(teacher: str, layouts: dict[str, str], output: str | Path, contexts: tuple[int, ...],
                   tasks: tuple[str, ...] = ("passkey",), engine: str = "llamacpp", console=None, **eval_kwargs) -> list[dict]:
    """Evaluate the teacher and each layout ({name: model}) on the recall `tasks` and the inference benchmark in one
    run; writes the eval report plus tradeoff.json/.png into `output`; returns the points of the first task."""
    import json

    from ling_surgery.evals.suite import run_eval

    if not layouts:
        raise SurgeryError("bench tradeoff: pass at least one upgraded model besides the teacher")
    if "teacher" in layouts:
        raise SurgeryError("bench tradeoff: 'teacher' names the original model; give the layouts other names")
    report = run_eval({"teacher": teacher, **layouts}, list(tasks), output=output, contexts=contexts, console=console,
                      engine=engine, **eval_kwargs)
    points = tradeoff_points(report, tasks[0])
    out = Path(output)
    (out / "tradeoff.json").write_text(json.dumps(points, indent=2) + "\n")
    tradeoff_plot(points, out / "tradeoff.png", tasks[0])
    if console is not None:
        console.print(tradeoff_table(points, tasks[0]))
        console.print(f"tradeoff plot: {out / 'tradeoff.png'}")
    return points

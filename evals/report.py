"""The conversion report: a rich table in the terminal, JSON + Markdown on disk, and a PNG of the distillation losses."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from ling_surgery.surgery.plan import Costs, human_bytes

CONTEXTS = (8192, 32768)
DEFAULT_ROLES = ("teacher", "upgraded")  # the report's columns for a conversion (meta.roles says otherwise)


def cost_rows(teacher: Costs, student: Costs) -> list[tuple[str, str, str, str]]:
    rows = [("parameters", f"{teacher.params / 1e6:.1f} M", f"{student.params / 1e6:.1f} M", f"{student.params / teacher.params:.2f}×")]
    if teacher.active_params is not None or student.active_params is not None:  # MoE: what one token computes with
        rows.append(("active parameters / token", f"{teacher.active / 1e6:.1f} M", f"{student.active / 1e6:.1f} M",
                     f"{student.active / teacher.active:.2f}×"))
    rows.append(
        ("KV cache / token (bf16)", human_bytes(teacher.kv_bytes_per_token), human_bytes(student.kv_bytes_per_token),
         f"{student.kv_bytes_per_token / teacher.kv_bytes_per_token:.3f}×")
    )
    rows.append(("recurrent state / sequence", human_bytes(teacher.state_bytes_per_sequence),
                 human_bytes(student.state_bytes_per_sequence), "—"))  # an align run's "before" has one too
    for ctx in CONTEXTS:
        t, s = teacher.cache_bytes(ctx), student.cache_bytes(ctx)
        rows.append((f"cache at {ctx // 1024}k context", human_bytes(t), human_bytes(s), f"{s / t:.3f}×"))
    return rows


def build_report(teacher_costs: Costs, student_costs: Costs, quality: dict, stages: dict, timings: dict, meta: dict) -> dict:
    costs = {
        name: {
            "params": c.params,
            "active_params": c.active,
            "kv_bytes_per_token": c.kv_bytes_per_token,
            "state_bytes_per_sequence": c.state_bytes_per_sequence,
            **{f"cache_bytes_at_{ctx}": c.cache_bytes(ctx) for ctx in CONTEXTS},
        }
        for name, c in (("teacher", teacher_costs), ("student", student_costs))
    }
    return {"meta": meta, "quality": quality, "costs": costs, "stages": stages, "timings_seconds": timings}


def report_costs(report: dict) -> tuple[Costs, Costs]:
    fields = ("params", "kv_bytes_per_token", "state_bytes_per_sequence")
    costs = []
    for who in ("teacher", "student"):
        saved = report["costs"][who]
        active = saved.get("active_params")  # reports written before MoE sources have none: every parameter active
        costs.append(Costs(*(saved[f] for f in fields), None if active in (None, saved["params"]) else active))
    return tuple(costs)


def report_roles(report: dict) -> tuple[str, str]:
    """Column names: (reference, result) — teacher/upgraded for a conversion, before/aligned for an align-only run."""
    return tuple((report.get("meta") or {}).get("roles") or DEFAULT_ROLES)


def report_table(report: dict) -> Table:
    teacher_costs, student_costs = report_costs(report)
    reference, result = report_roles(report)
    table = Table(title=f"{reference} vs. {result}", show_lines=False)
    for col in ("metric", reference, result, "ratio"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    q = report["quality"]
    if "teacher" in q and "student" in q:
        t, s = q["teacher"]["perplexity"], q["student"]["perplexity"]
        table.add_row(f"held-out perplexity ({q['student']['tokens']} tok)", f"{t:.2f}", f"{s:.2f}", f"{s / t:.2f}×")
    if "student_after_init" in q:
        table.add_row("  … straight after init", "", f"{q['student_after_init']['perplexity']:.4g}", "")
    for row in cost_rows(teacher_costs, student_costs):
        table.add_row(*row)
    for name, stage in report["stages"].items():
        if "history" in stage:
            for mode, reward, length in rl_rows(stage):
                table.add_row(f"{name} ({mode}): {stage['steps']} steps, {stage['seconds']} s", "",
                              f"reward {reward}, tokens {length}", "")
        elif stage.get("steps"):
            table.add_row(
                f"{name}: {stage['tokens']} tok, {stage['seconds']} s",
                "", f"loss {stage['loss_first']:.4g} → {stage['loss_last']:.4g}", "",
            )
    from ling_surgery.evals.trajectory import trajectory_rows

    for row in trajectory_rows(report.get("trajectory") or {}):
        table.add_row(*row)
    table.add_row("wall time (load, stages, eval)", "", f"{report['timings_seconds'].get('total', 0):.0f} s", "")
    return table


def report_markdown(report: dict) -> str:
    teacher_costs, student_costs = report_costs(report)
    meta = report["meta"]
    lines = [f"# ling-surgery conversion report: {meta.get('source')}", "", f"target `{meta.get('target')}`, plan {meta.get('plan')}", ""]
    reference, result = report_roles(report)
    lines += [f"| metric | {reference} | {result} | ratio |", "|---|---:|---:|---:|"]
    q = report["quality"]
    if "teacher" in q and "student" in q:
        t, s = q["teacher"]["perplexity"], q["student"]["perplexity"]
        lines.append(f"| held-out perplexity ({q['student']['tokens']} tokens) | {t:.2f} | {s:.2f} | {s / t:.2f}× |")
    if "student_after_init" in q:
        lines.append(f"| perplexity straight after init | | {q['student_after_init']['perplexity']:.4g} | |")
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in cost_rows(teacher_costs, student_costs)]
    lines += ["", "| stage | tokens | steps | seconds | tokens/s | loss first → last |", "|---|---:|---:|---:|---:|---|"]
    for name, st in report["stages"].items():
        if st.get("steps") and "history" not in st:
            lines.append(f"| {name} | {st['tokens']} | {st['steps']} | {st['seconds']} | {st['tokens_per_second']} | "
                         f"{st['loss_first']:.4g} → {st['loss_last']:.4g} |")
    rl_stages = {name: st for name, st in report["stages"].items() if "history" in st}
    if rl_stages:
        lines += ["", "| RL stage | mode | reward first → last | completion tokens first → last | steps | seconds |",
                  "|---|---|---|---|---:|---:|"]
        for name, st in rl_stages.items():
            lines += [f"| {name} | {mode} | {reward} | {length} | {st['steps']} | {st['seconds']} |"
                      for mode, reward, length in rl_rows(st)]
    if report.get("trajectory"):
        from ling_surgery.evals.trajectory import trajectory_markdown

        lines += trajectory_markdown(report["trajectory"], (reference, result))
    lines += ["", "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["timings_seconds"].items()), ""]
    return "\n".join(lines)


def loss_plot(stages: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: v["losses"] for k, v in stages.items() if v.get("losses")}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (name, losses) in zip(axes[0], curves.items()):
        ax.plot(range(1, len(losses) + 1), losses)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel({"attention_transfer": "relative MSE", "sft": "cross-entropy on answers (nats/token)"}
                      .get(name, "KL (nats/token)"))
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rl_rows(stage: dict) -> list[tuple[str, str, str]]:
    """Per mode of an RL stage: (mode, reward first → last, mean completion tokens first → last), each the mean over
    the first and last quarter of its rollouts."""
    rows = []
    for mode in ("fast", "think", "default"):
        if f"{mode}_reward_first" in stage:
            rows.append((mode, f"{stage[f'{mode}_reward_first']:.3g} → {stage[f'{mode}_reward_last']:.3g}",
                         f"{stage[f'{mode}_completion_length_first']:.1f} → {stage[f'{mode}_completion_length_last']:.1f}"))
    return rows


RL_SMOOTHING = 4  # rollouts in the trailing mean drawn over each curve: one rollout holds only a few problems


def trailing_mean(values: list[float], window: int = RL_SMOOTHING) -> list[float]:
    return [sum(values[max(0, i + 1 - window): i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def rl_plot(stages: dict, path: Path) -> Path | None:
    """Reward, share of right answers and mean completion length per mode over each RL stage's optimizer steps: one
    faint point per rollout, and a line through the trailing mean of the last RL_SMOOTHING rollouts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {name: st["history"] for name, st in stages.items() if st.get("history")}
    if not histories:
        return None
    panels = (("reward", "reward (weighted sum)", None), ("correct", "share of right answers", None),
              ("completion_length", "mean completion length", "tokens"))
    fig, axes = plt.subplots(len(histories), len(panels), figsize=(15, 3.5 * len(histories)), squeeze=False)
    for (name, history), row_axes in zip(histories.items(), axes):
        for ax, (metric, title, unit) in zip(row_axes, panels):
            for mode, color in (("fast", "tab:blue"), ("think", "tab:orange"), ("default", "tab:green")):
                points = [(row["step"], row[f"{mode}/{metric}"]) for row in history if f"{mode}/{metric}" in row]
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, "o", markersize=3, alpha=0.35, color=color)
                    ax.plot(steps, trailing_mean(list(values)), color=color,
                            label=f"{mode} (mean of last {RL_SMOOTHING} rollouts)")
            ax.set_title(f"{name}: {title} per mode")
            ax.set_xlabel("optimizer step")
            if unit:
                ax.set_ylabel(unit)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(folder: Path, report: dict) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(report_markdown(report))
    loss_plot(report["stages"], folder / "distill_losses.png")
    rl_plot(report["stages"], folder / "rl_curves.png")
    if report.get("trajectory"):
        from ling_surgery.evals.trajectory import trajectory_plot

        trajectory_plot(report["trajectory"], folder / "trajectory.png", report_roles(report))

"""Rendering of eval reports: a rich table, Markdown, `quality.png` (metric per task, both models, ± 1 standard
error), `recall.png` (recall heat maps, context length × needle depth, models side by side) and `inference.png`
(decode latency and cache memory against context length, both models)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.table import Table

from ling_surgery.surgery.plan import human_bytes


def _roles(report: dict) -> list[str]:
    return list(report["models"])


def _cell(result: dict | None) -> str:
    if not result:
        return ""
    value, error = result["value"], result["stderr"]
    text = f"{value:.2f}" if result["primary"] == "perplexity" else f"{value:.3f}"
    return text + ("" if math.isnan(error) else f" ± {error:.3f}")


def quality_rows(report: dict) -> list[list[str]]:
    rows = []
    for name, by_role in report["tasks"].items():
        first = next(iter(by_role[r] for r in _roles(report) if r in by_role))
        row = [f"{name} ({first['primary']})", str(first["n"])] + [_cell(by_role.get(r)) for r in _roles(report)]
        if "ratio" in by_role:
            row.append(f"{by_role['ratio']:.2f}×" if by_role["ratio"] is not None else "—")
        rows.append(row)
        generated = [by_role[r] for r in _roles(report) if by_role.get(r, {}).get("kind") == "generate"]
        if generated:
            per_correct = [f"{g['tokens_per_correct']:.0f}" if g["tokens_per_correct"] else "— (none correct)" for g in generated]
            rows.append(["  output tokens per correct answer", ""] + per_correct + ([""] if "ratio" in by_role else []))
            rows.append(["  correct per 1k output tokens", ""] + [f"{g['correct_per_1k_tokens']:.2f}" for g in generated]
                        + ([""] if "ratio" in by_role else []))
        if first["kind"] == "choice" and "gen_acc" in first:
            roles = [r for r in _roles(report) if r in by_role]
            tail = [""] if "ratio" in by_role else []
            rows.append(["  answered by generating the letter (acc)", ""]
                        + [f"{by_role[r]['gen_acc']:.3f} ± {by_role[r]['gen_acc_stderr']:.3f}" for r in roles] + tail)
            rows.append([f"  gap: {first['primary']} − generated", ""]
                        + [f"{by_role[r]['value'] - by_role[r]['gen_acc']:+.3f}" for r in roles] + tail)
        if first["kind"] == "recall":
            rows += recall_rows(report, by_role, "ratio" in by_role)
        if first["kind"] == "modes":
            from ling_surgery.evals.modes import modes_rows

            rows += modes_rows(by_role, _roles(report), "ratio" in by_role)
        if first["kind"] == "lambada":
            rows.append(["  passage perplexity", ""] + [f"{by_role[r]['perplexity']:.2f}" for r in _roles(report) if r in by_role]
                        + ([""] if "ratio" in by_role else []))
    return rows


def recall_rows(report: dict, by_role: dict, compare: bool) -> list[list[str]]:
    """Per variant and context length: accuracy over the needle depths (recall.png has every cell)."""
    roles = [r for r in _roles(report) if r in by_role]
    first = by_role[roles[0]]
    rows = []
    for variant, result in first["variants"].items():
        for length in result["by_length"]:
            cells = [f"{by_role[r]['variants'][variant]['by_length'][length]:.2f}"
                     if length in by_role[r]["variants"].get(variant, {}).get("by_length", {}) else "—" for r in roles]
            rows.append([f"  {variant} @ {length} tokens", ""] + cells + ([""] if compare else []))
    skipped = sorted({n for r in roles for n in by_role[r].get("skipped_lengths", [])})
    if skipped:
        rows.append([f"  skipped (beyond a model's context): {', '.join(map(str, skipped))}", ""] + [""] * len(roles)
                    + ([""] if compare else []))
    return rows


def inference_rows(report: dict) -> list[list[str]]:
    """Per context: decode latency, prefill speed, cache bytes measured (computed); then peak memory and long contexts.

    With two models the last column is upgraded ÷ teacher of the measured number.
    """
    inference = report.get("inference") or {}
    roles = [r for r in _roles(report) if r in inference]
    if not roles:
        return []
    rows = []

    def add(label: str, values: dict, cells: list[str]) -> None:
        row = [label, ""] + cells
        if len(roles) == 2:
            a, b = values[roles[0]], values[roles[1]]
            row.append(f"{b / a:.2f}×" if a else "")
        rows.append(row)

    for i, context in enumerate(row["context"] for row in inference[roles[0]]["contexts"]):
        at = {r: inference[r]["contexts"][i] for r in roles}
        decode = {r: at[r]["decode_ms_per_token"] for r in roles}
        add(f"decode ms/token @ {context}", decode,
            [f"{decode[r]:.1f}" + (f" ({at[r]['setting']})" if "setting" in at[r] else "") for r in roles])
        prefill = {r: at[r]["prefill_tokens_per_second"] for r in roles}
        add(f"prefill tokens/s @ {context}", prefill, [f"{prefill[r]:,.0f}" for r in roles])
        cache = {r: at[r]["cache_bytes_measured"] for r in roles}
        add(f"cache @ {context} measured (computed)", cache,
            [f"{human_bytes(cache[r])} ({human_bytes(at[r]['cache_bytes_computed'])})" for r in roles])
    peak = {r: inference[r]["contexts"][-1]["peak_memory_bytes"] for r in roles}
    add("peak memory", peak, [human_bytes(peak[r]) for r in roles])
    for context in ("8192", "32768"):
        computed = {r: inference[r]["computed"][context] for r in roles}
        add(f"cache @ {context} (computed)", computed, [human_bytes(computed[r]) for r in roles])
    return rows


def eval_table(report: dict) -> Table:
    roles = _roles(report)
    compare = len(roles) == 2
    title = "teacher vs. upgraded" if compare else f"evaluation: {report['models'][roles[0]].get('name', report['models'][roles[0]]['ref'])}"
    table = Table(title=title)
    for col in ["task (metric)", "n", *roles] + (["ratio"] if compare else []):
        table.add_column(col, justify="left" if col == "task (metric)" else "right")
    for row in quality_rows(report):
        table.add_row(*row)
    inference = inference_rows(report)
    if inference:
        table.add_section()
        for row in inference:
            table.add_row(*row)
    return table


def eval_markdown(report: dict) -> str:
    roles = _roles(report)
    compare = len(roles) == 2
    models = report["models"]
    lines = ["# ling-surgery evaluation", ""]
    for role in roles:
        m = models[role]
        if "model_type" in m:
            lines.append(f"- **{role}**: `{m['ref']}` ({m['model_type']}, {m['parameters'] / 1e6:.1f} M parameters; "
                         f"scoring kernels: {m['scoring_kernels']})")
        else:
            lines.append(f"- **{role}**: `{m['ref']}`")
    settings = report["settings"]
    quality = quality_rows(report)
    lines += ["", f"Engine {settings.get('engine', 'transformers')}, device {settings['device']}, seed {settings['seed']}, limit {settings['limit'] or 'default'} per task; "
              f"{report['seconds']:.0f} s." + (" Values are ± one standard error; n is the number of documents scored "
                                               "(perplexity: 512-token windows)." if quality else "")]
    header = ["task (metric)", "n", *roles] + (["ratio"] if compare else [])
    if quality:  # an inference-only report (`bench inference`) has no quality table
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in quality]
    inference = inference_rows(report)
    if inference:
        first = report["inference"][next(iter(report["inference"]))]
        lines += ["", f"## Inference cost ({first['device']}, {first['dtype']}, {first['threads']} threads, one sequence)", ""]
        if first.get("method"):
            lines.append(f"- method: {first['method']}")
        for role in roles:
            if role in report["inference"]:
                lines.append(f"- {role} kernels: {report['inference'][role]['kernels']}")
                for label, result in (report["inference"][role].get("settings") or {}).items():
                    if result.get("stopped"):
                        lines.append(f"  - {label}: {result['stopped']}")
        lines += ["", "| " + " | ".join(["measure", "", *[r for r in roles if r in report['inference']]] + (["ratio"] if compare else [])) + " |",
                  "|" + "---|" * (len(header) if compare else 3)]
        lines += ["| " + " | ".join(row) + " |" for row in inference]
    if report.get("trajectory"):
        from ling_surgery.evals.trajectory import trajectory_markdown

        lines += trajectory_markdown(report["trajectory"], report["trajectory_roles"])
    samples = [(name, r, by_role[r]["samples"]) for name, by_role in report["tasks"].items() for r in roles
               if by_role.get(r, {}).get("samples")]
    if samples:
        lines += ["", "## Generation samples", ""]
        for name, role, items in samples:
            for item in items[:2]:
                mark = "✓" if item["correct"] else "✗"
                output = item["output"].replace("\n", " ")
                lines.append(f"- {name} / {role} {mark}: gold {item['gold']}, extracted {item['predicted']}: “{output[:200]}”")
    return "\n".join(lines) + "\n"


def quality_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = _roles(report)
    tasks = report["tasks"]
    accuracy = [t for t in tasks if tasks[t][roles[0]]["primary"] != "perplexity"]
    perplexity = [t for t in tasks if tasks[t][roles[0]]["primary"] == "perplexity"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [max(1, len(accuracy)), max(1, len(perplexity)) + 1]})
    width = 0.8 / len(roles)
    for ax, names, ylabel in ((axes[0], accuracy, "accuracy (primary metric)"), (axes[1], perplexity, "perplexity (lower is better)")):
        for k, role in enumerate(roles):
            values = [tasks[t][role]["value"] for t in names]
            errors = [0 if math.isnan(tasks[t][role]["stderr"]) else tasks[t][role]["stderr"] for t in names]
            ax.bar([i + k * width for i in range(len(names))], values, width, yerr=errors, capsize=3, label=role)
        if names and ylabel.startswith("accuracy"):
            for i, t in enumerate(names):
                chance = tasks[t][roles[0]].get("chance")
                if chance:
                    ax.hlines(chance, i - 0.1, i + width * len(roles) - 0.1 + 0.2, colors="gray", linestyles=":")
        ax.set_xticks([i + width * (len(roles) - 1) / 2 for i in range(len(names))], names, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    axes[0].set_title("quality per task (± 1 s.e.; dotted: chance)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recall_plot(report: dict, path: Path) -> bool:
    """One heat map per recall task variant and model (context length × needle depth), models side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = _roles(report)
    panels = [(task, variant) for task, by_role in report["tasks"].items()
              if by_role[roles[0]]["kind"] == "recall" for variant in by_role[roles[0]]["variants"]]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), len(roles), figsize=(4.2 * len(roles), 3.2 * len(panels)), squeeze=False)
    for row, (task, variant) in enumerate(panels):
        for col, role in enumerate(roles):
            ax = axes[row][col]
            grid = report["tasks"][task].get(role, {}).get("variants", {}).get(variant, {}).get("grid", {})
            lengths = list(grid)
            depths = sorted({d for cells in grid.values() for d in cells}, key=float)
            values = [[grid[n].get(d, float("nan")) for n in lengths] for d in depths]
            ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
            ax.set_xticks(range(len(lengths)), lengths)
            ax.set_yticks(range(len(depths)), depths)
            for y, line in enumerate(values):
                for x, value in enumerate(line):
                    if not math.isnan(value):
                        ax.text(x, y, f"{value:.0%}", ha="center", va="center", fontsize=8)
            acc = report["tasks"][task].get(role, {}).get("variants", {}).get(variant, {}).get("acc")
            ax.set_title(f"{role}: {task}" + (f" ({variant})" if variant != task else "")
                         + (f", {acc:.0%}" if acc is not None else ""), fontsize=10)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth")
    fig.suptitle("recall accuracy (greedy), context length × needle depth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def inference_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inference = report["inference"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for role, result in inference.items():
        contexts = [row["context"] for row in result["contexts"]]
        left.plot(contexts, [row["decode_ms_per_token"] for row in result["contexts"]], marker="o", label=role)
        line = right.plot(contexts, [row["cache_bytes_measured"] / 2**20 for row in result["contexts"]], marker="o",
                          label=f"{role} measured")
        computed = sorted((int(c), b) for c, b in result["computed"].items())
        right.plot([c for c, _ in computed], [b / 2**20 for _, b in computed], linestyle="--", color=line[0].get_color(),
                   label=f"{role} computed")
    left.set(xscale="log", xlabel="context (tokens)", ylabel="decode ms / token", title="decode latency")
    right.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="cache MiB (one sequence)", title="cache memory")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    first = next(iter(inference.values()))
    fastest = any("settings" in result for result in inference.values())
    fig.suptitle(f"{first['device']}, {first['dtype']}, {first['threads']} threads"
                 + (", each model at its fastest llama.cpp setting per context" if fastest else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_eval_report(folder: Path, report: dict) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(eval_markdown(report))
    if report["tasks"]:
        quality_plot(report, folder / "quality.png")
        recall_plot(report, folder / "recall.png")
        from ling_surgery.evals.modes import modes_plot

        modes_plot(report, folder / "modes.png")
    if report.get("inference"):
        inference_plot(report, folder / "inference.png")
    if report.get("trajectory"):
        from ling_surgery.evals.trajectory import trajectory_plot

        trajectory_plot(report["trajectory"], folder / "trajectory.png", report["trajectory_roles"])

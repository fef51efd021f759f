"""`ling-surgery eval` and `ling-surgery report`: quality, inference cost and token efficiency of one model, or of
a teacher and its upgraded model side by side on the same samples, written as JSON, Markdown, a table and plots.

The report's JSON keys are stable: `kind`, `models.<role>`, `tasks.<task>.<role>` (see `evals/evaluate.py`),
`tasks.<task>.ratio`, `inference.<role>` (see `evals/cost.py`), `settings`, `seconds`.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from pathlib import Path

from rich.console import Console

from ling_surgery.surgery import sources
from ling_surgery.surgery.errors import SurgeryError

REPORT_KIND = "ling-surgery-eval"
ENGINES = ("transformers", "llamacpp")


def run_eval(
    models: dict[str, str],
    tasks: list[str] | None = None,
    limit: int | None = None,
    output: str | Path | None = None,
    contexts: tuple[int, ...] | None = None,
    data: dict[str, str] | None = None,
    seed: int = 0,
    device: str = "auto",
    console: Console | None = None,
    engine: str = "transformers",
    gguf_dtype: str = "f32",
    engine_settings: list | None = None,
    recall_lengths: tuple[int, ...] | None = None,
    recall_depths: tuple[float, ...] | None = None,
) -> dict:
    """Evaluate `models` ({role: model}) on the same task samples; write the report into `output` if given.

    `tasks`: task names; None runs every task, an empty list none (inference benchmark only). `limit`: documents per
    task (perplexity: 512-token windows); None uses `tasks.DEFAULT_LIMITS` on CPU and every document on CUDA.
    `contexts`: context lengths for the inference benchmark (empty tuple: skip it). `engine`: "transformers", or
    "llamacpp" (models that are not .gguf files are exported at `gguf_dtype` and kept in the report's gguf/ folder).
    `engine_settings`: llama.cpp `EngineSetting`s (flash attention, cache type) to benchmark each model under; with
    several, each model's fastest decode at each context is the headline and every measurement is kept. All models
    and settings are measured in lockstep (`evals/llamacpp_bench.py`), and a setting stops at the first context where
    it is clearly slower than another setting of its model and growing slower faster (`llamacpp.dominated`).
    `recall_lengths` / `recall_depths`: the grid of the recall tasks (passkey, niah); None: 512–8k tokens on CPU,
    1k–128k on CUDA (each model keeps the lengths it allows); depths 0, 0.5, 1 on CPU, 5 on CUDA.
    """
    import tempfile

    import torch

    from ling_surgery.evals import cost as cost_module
    from ling_surgery.evals import recall
    from ling_surgery.evals.eval_report import eval_table, write_eval_report
    from ling_surgery.evals.evaluate import evaluate
    from ling_surgery.evals.scoring import load_for_eval
    from ling_surgery.evals.tasks import DEFAULT_LIMITS, get_spec, load_task, parse_tasks
    from ling_surgery.surgery.export import write_folder

    console = console or Console(stderr=True)
    if engine not in ENGINES:
        raise SurgeryError(f"--engine {engine!r} is not supported; supported: {', '.join(ENGINES)}")
    if engine_settings and engine != "llamacpp":
        raise SurgeryError("--flash-attn and --cache-type are llama.cpp settings; add --engine llamacpp")
    if engine == "llamacpp" and contexts:
        from ling_surgery.evals.llamacpp import check_contexts

        check_contexts(tuple(contexts))
    names = [] if tasks is not None and not list(tasks) else parse_tasks(",".join(tasks) if tasks else None)
    for task in data or {}:
        if task not in names:
            raise SurgeryError(f"--data {task}=…: {task!r} is not among the tasks being run ({', '.join(names)})")
    out = _check_output(output) if output is not None else None
    cuda = engine == "transformers" and (device == "cuda" or (device == "auto" and torch.cuda.is_available()))
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".ling-surgery-gguf-", dir=out.parent if out else None))
    # The scratch folder holds the exported GGUFs (hundreds of MB): removed however the evaluation ends.
    try:
        refs = dict(models)
        if engine == "llamacpp":
            from ling_surgery.evals.llamacpp import ensure_gguf, require_llama_cpp

            require_llama_cpp()
        for model in models.values():  # a truncated or corrupt file of the last model is found before the first runs
            sources.check_local_files(sources.resolve_source(model))
        if engine == "llamacpp":
            for role, model in models.items():
                console.print(f"{role}: {model} as GGUF ({gguf_dtype}) …")
                refs[role] = str(ensure_gguf(model, work, role, gguf_dtype))
        loaded = []
        lengths = recall_lengths or (recall.GPU_LENGTHS if cuda else recall.CPU_LENGTHS)
        depths = recall_depths or (recall.GPU_DEPTHS if cuda else recall.CPU_DEPTHS)
        for name in names:
            kind_limit = limit if limit is not None else (None if cuda else DEFAULT_LIMITS[get_spec(name).kind])
            loaded.append(load_task(name, kind_limit, seed, (data or {}).get(name), _heldout_fraction(models), lengths,
                                    depths))
        results: dict[str, dict] = {task.spec.name: {} for task in loaded}
        described: dict[str, dict] = {}
        for role, model in models.items():
            if not loaded:
                described[role] = {"ref": model, "engine": engine}
                continue
            console.rule(f"{role}: {model}")
            if engine == "llamacpp":
                from ling_surgery.evals.llamacpp import LlamaCppModel

                lm = LlamaCppModel(refs[role], setting=(engine_settings or [None])[0])  # quality under the first setting
            else:
                lm = load_for_eval(model, device)
            described[role] = {"ref": model, "name": lm.name, "model_type": lm.model_type, "engine": engine,
                               "parameters": lm.parameters(), "scoring_kernels": lm.scoring_kernels}
            for task_name, result in evaluate(lm, loaded, console).items():
                results[task_name][role] = result
            del lm
            gc.collect()
        inference = {}
        if contexts is None:
            contexts = cost_module.default_contexts(engine, cuda)
        if contexts and engine == "llamacpp":
            from ling_surgery.evals.llamacpp_bench import benchmark

            console.print(f"inference benchmark (llama.cpp): {', '.join(models)} interleaved, each setting in a process of "
                          f"its own; contexts {', '.join(map(str, contexts))} …")
            inference = benchmark(refs, tuple(contexts), engine_settings, console=console)
        elif contexts:
            for role in models:
                console.print(f"inference benchmark ({role}, {engine}): contexts {', '.join(map(str, contexts))} in a fresh process …")
                inference[role] = cost_module.measure_in_child(refs[role], tuple(contexts), device=device, console=console,
                                                               role=role)
        report = {
            "kind": REPORT_KIND,
            "models": described,
            "tasks": {name: {**by_role, **_ratios(by_role)} for name, by_role in results.items()},
            "inference": inference,
            "settings": {"limit": limit, "seed": seed, "device": "cuda" if cuda else "cpu", "contexts": list(contexts),
                         "engine": engine, "gguf_dtype": gguf_dtype if engine == "llamacpp" else None,
                         "engine_settings": [s.label for s in engine_settings or []] or None, "versions": _versions()},
            "seconds": round(time.perf_counter() - started, 1),
        }
        from ling_surgery.evals.trajectory import read_trajectory, run_roles, trajectory_table

        for model in models.values():  # a run folder of an upgrade carries its scores after every stage
            trajectory = read_trajectory(model) if Path(model).is_dir() else None
            if trajectory:
                report["trajectory"], report["trajectory_roles"] = trajectory, list(run_roles(model))
                break
        console.print(eval_table(report))
        if report.get("trajectory"):
            console.print(trajectory_table(report["trajectory"], report["trajectory_roles"]))
        if out is not None:
            def fill(tmp: Path) -> None:
                write_eval_report(tmp, report)
                exported = sorted(work.glob("*.gguf"))
                if exported:  # the exact files that were measured travel with the report
                    (tmp / "gguf").mkdir()
                    for path in exported:
                        os.replace(path, tmp / "gguf" / path.name)

            write_folder(out, fill, replace=out.exists())
            recall_png = ", recall.png" if any(t.spec.kind == "recall" for t in loaded) else ""
            recall_png += ", modes.png" if any(t.spec.kind == "modes" for t in loaded) else ""
            console.print(f"report: {out} (report.md, report.json" + (", quality.png" + recall_png if loaded else "")
                          + (", inference.png" if inference else "") + ")")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _ratios(by_role: dict) -> dict:
    """Student ÷ teacher of the primary metric (for perplexity lower is better, so the ratio reads the same way)."""
    if set(by_role) != {"teacher", "student"}:
        return {}
    t, s = by_role["teacher"]["value"], by_role["student"]["value"]
    return {"ratio": s / t if t else None}


def _heldout_fraction(models: dict[str, str]) -> float:
    """The held-out split the upgraded model's run used (so 'held-out' really is), else the default 5%."""
    for model in models.values():
        for manifest in (Path(model) / "model" / "ling_surgery_manifest.json", Path(model) / "ling_surgery_manifest.json"):
            if manifest.is_file():
                recipe = json.loads(manifest.read_text()).get("recipe") or {}
                return recipe.get("data", {}).get("heldout_fraction", 0.05)
    return 0.05


def _check_output(output: str | Path) -> Path:
    """A new folder, or an earlier eval report (replaced atomically); anything else is left alone."""
    from ling_surgery.surgery.export import check_parent_writable

    path = Path(output).expanduser().resolve()
    if path.exists():
        previous = path / "report.json"
        try:
            ours = previous.is_file() and json.loads(previous.read_text()).get("kind") == REPORT_KIND
        except ValueError:
            ours = False
        if not ours:
            raise SurgeryError(f"output {str(path)!r} exists and is not an earlier eval report; pass a new --output")
        return path
    return check_parent_writable(path)


def _versions() -> dict:
    from ling_surgery.surgery.run import versions

    return versions()

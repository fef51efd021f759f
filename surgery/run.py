"""`ling-surgery run`: a recipe's stages in order, each checkpointed atomically with a manifest, then eval + export.

A run folder (``export.output``)::

    runs/NAME/
      recipe.yaml                          the resolved recipe of the latest invocation
      stages/1-init/                       each stage's model (loadable with from_pretrained) + manifest
      stages/2-attention_transfer/
      stages/.3-logit_distill.resume.pt    training state of an interrupted stage (+ .json): what --resume reads
      model/                               the upgraded model, written last and atomically
      report.json, report.md, distill_losses.png

`run` skips every stage whose manifest fingerprint matches the recipe (see `checkpoint.py`), `--resume` continues an
interrupted stage from its training state, and `--from NAME` reruns from a named stage.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from ling_surgery.surgery.checkpoint import TrainingState, export_fingerprint, numerics, stage_fingerprints
from ling_surgery.surgery.config import CONVERT_KINDS, Recipe, TrainingStage, stage_seq_len
from ling_surgery.surgery.errors import RecipeError, SurgeryError
from ling_surgery.surgery.export import MANIFEST, check_output_dir, check_parent_writable, read_manifest


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    def stage_dir(self, index: int, stage) -> Path:
        return self.root / "stages" / f"{index + 1}-{stage.name}"

    def training_state(self, index: int, stage, stage_fingerprint: str) -> TrainingState:
        return TrainingState(self.root / "stages" / f".{index + 1}-{stage.name}.resume.pt", stage_fingerprint)


@dataclass(frozen=True)
class StageStatus:
    index: int
    stage: object
    fingerprint: str
    state: str  # done | interrupted | stale | pending
    detail: str = ""


def open_run_folder(output: str | Path | None, fresh: bool = False) -> RunFolder:
    """The run folder: new, empty, or one that ling-surgery wrote; `fresh` demands that it does not exist yet."""
    if not output:
        raise SurgeryError("no output folder: pass --output DIR (or set export.output in the recipe)")
    path = Path(output).expanduser().resolve()
    if fresh:
        return RunFolder(check_output_dir(path))
    if path.exists():
        if not path.is_dir():
            raise SurgeryError(f"output {str(path)!r} is a file; pass a folder to --output")
        if any(path.iterdir()) and not (path / "stages").is_dir():
            raise SurgeryError(f"output {str(path)!r} exists and is not a ling-surgery run folder; pass a new --output")
        for part in (path, path / "stages"):
            if part.is_dir() and not os.access(part, os.W_OK | os.X_OK):
                raise SurgeryError(f"run folder {str(part)!r} is not writable; make it writable (chmod u+w) or copy "
                                   "the run folder somewhere writable and pass that to --output")
        return RunFolder(path)
    return RunFolder(check_parent_writable(path))


def sweep_run_folder(folder: RunFolder) -> list[str]:
    """A killed run's leftovers in the run folder and its stages/, put right (`export.sweep_interrupted_writes`)."""
    from ling_surgery.surgery.export import sweep_interrupted_writes

    parents = [path for path in (folder.root, folder.root / "stages") if path.is_dir()]
    return [line for parent in parents for line in sweep_interrupted_writes(parent)]


def stage_statuses(recipe: Recipe, folder: RunFolder) -> list[StageStatus]:
    out: list[StageStatus] = []
    upstream_done = True
    for i, (stage, fp) in enumerate(zip(recipe.stages, stage_fingerprints(recipe))):
        manifest = read_manifest(folder.stage_dir(i, stage)) or {}
        if upstream_done and manifest.get("fingerprint") == fp:
            out.append(StageStatus(i, stage, fp, "done"))
            continue
        info = folder.training_state(i, stage, fp).peek() if upstream_done else None
        upstream_done = False
        if info and info.get("fingerprint") == fp:
            out.append(StageStatus(i, stage, fp, "interrupted", f"at step {info['step']}/{info['steps']}"))
        elif manifest:
            out.append(StageStatus(i, stage, fp, "stale", "recipe changed since its checkpoint"))
        else:
            out.append(StageStatus(i, stage, fp, "pending"))
    return out


def start_index(statuses: list[StageStatus], resume: bool, from_stage: str | None) -> int:
    """The first stage to run; refuses to silently drop an interrupted stage's progress."""
    first = next((s.index for s in statuses if s.state != "done"), len(statuses))
    if from_stage is not None:
        names = [s.stage.name for s in statuses]
        if from_stage not in names:
            raise SurgeryError(f"--from {from_stage!r}: no such stage; stages: {', '.join(names)}")
        index = names.index(from_stage)
        if index > first:
            raise SurgeryError(f"--from {from_stage}: stage {names[first]!r} before it has no up-to-date checkpoint; "
                               "run without --from first")
        return index
    if first < len(statuses) and statuses[first].state == "interrupted" and not resume:
        name = statuses[first].stage.name
        raise SurgeryError(f"stage {name!r} was interrupted {statuses[first].detail}; pass --resume to continue it, "
                           f"or --from {name} to start it over")
    return first


def stage_offsets(recipe: Recipe) -> list[int]:
    """Each stage's first training token, and the end of the last: calibration, then every training stage, on
    disjoint text (stages may read windows of different lengths, so offsets are in tokens)."""
    starts, position = [], 0
    for stage in recipe.stages:
        starts.append(position)
        seq_len = stage_seq_len(stage, recipe)
        if stage.kind == "init":
            position += stage.calibration_tokens // seq_len * seq_len
        elif isinstance(stage, TrainingStage):
            step = stage.batch_size * stage.grad_accumulation * seq_len
            position += stage.tokens // step * step
    return starts + [position]


def stages_table(statuses: list[StageStatus], recipe: Recipe, start: int | None = None) -> Table:
    table = Table(title="stages")
    for col in ("#", "stage", "kind", "tokens", "window", "lr", "trainable", "status"):
        table.add_column(col, justify="right" if col in ("#", "tokens", "window", "lr") else "left")
    for s in statuses:
        stage = s.stage
        training = isinstance(stage, TrainingStage)
        tokens = stage.tokens if training else getattr(stage, "calibration_tokens", None)
        if start is None:
            status = f"{s.state} {s.detail}".strip()
        else:
            status = "skip (up to date)" if s.index < start else ("resume " + s.detail if s.state == "interrupted" else "run")
        groups = ", ".join(getattr(stage, "trainable", None) or ["(derived)"])
        if stage.kind == "sft":  # conversations, each at most max_length tokens
            amount, window = f"{sum(d.examples for d in stage.data):,} conv.", f"≤{stage.max_length}"
            trainable = f"LoRA r={stage.lora.r} on {groups}" if stage.lora else groups
        elif stage.kind == "rl":  # problems, each asked in every mode; completions of at most max_completion_length
            amount, window = f"{sum(d.problems for d in stage.data):,} problems", f"≤{stage.max_completion_length}"
            trainable = f"LoRA r={stage.lora.r} on {groups}" if stage.lora else groups
        else:
            amount, window = f"{tokens:,}", str(stage_seq_len(stage, recipe))
            trainable = groups if training else ""
        table.add_row(str(s.index + 1), stage.name, stage.kind, amount, window,
                      f"{stage.lr:g}" if hasattr(stage, "lr") else "", trainable, status)
    return table


def run(recipe: Recipe, console: Console | None = None, resume: bool = False, from_stage: str | None = None,
        fresh: bool = False) -> dict:
    """Run (or continue) a recipe; returns the report. `fresh`: the output folder must not exist yet (`convert`)."""
    from ling_surgery.surgery.align import plan_recipe

    console = console or Console(stderr=True)
    processes = process_state(recipe)
    if not processes.is_main_process:
        console = Console(stderr=True, quiet=True)  # one process speaks (and writes) for all
    folder = open_run_folder(recipe.export.output, fresh=fresh and processes.is_main_process)
    if processes.is_main_process:
        for line in sweep_run_folder(folder):
            console.print(f"{folder.root}: {line} (left by an interrupted run)", highlight=False)
    processes.wait_for_everyone()  # every process reads the stages as the sweep left them
    conversion = plan_recipe(recipe)
    recipe = conversion.recipe  # plan values derived from the source are part of what runs and is fingerprinted
    statuses = stage_statuses(recipe, folder)
    start = start_index(statuses, resume, from_stage)
    final = read_manifest(folder.model) or {}
    if start == len(statuses) and from_stage is None and final.get("fingerprint") == export_fingerprint(recipe):
        report = json.loads((folder.model / "report.json").read_text())
        console.print(f"{folder.root}: up to date (every stage and the export match the recipe); nothing to do")
        _print_report(console, report, folder)
        return report
    if resume and not any(s.state == "interrupted" for s in statuses):
        console.print("--resume: no interrupted stage to continue")
    memory = run_memory_plan(conversion, processes)
    problems = memory.problems() if memory is not None else []
    if recipe.runtime.engine == "zero3" and processes.num_processes > 1:
        from ling_surgery.surgery import zero3

        if not zero3.installed():
            problems.append(zero3.MISSING)
    if problems:
        raise RecipeError(problems)
    console.print(conversion.table(memory))
    console.print(stages_table(statuses, recipe, start))
    if processes.num_processes != recipe.runtime.devices:
        console.print(f"[yellow]note:[/] launched on {processes.num_processes} process(es), runtime.devices is "
                      f"{recipe.runtime.devices}: the memory plan above is for {processes.num_processes}")
    return _execute(recipe, conversion, folder, statuses, start, console, from_stage, processes)


def run_memory_plan(conversion, processes):
    """The memory plan for where this run is: the processes launched, and on CUDA each device's real memory unless
    runtime.device_memory_gib names it (None when no stage trains in the run's own loop)."""
    from ling_surgery.surgery.memory_plan import GIB, Hardware, MemoryPlan

    runtime = conversion.recipe.runtime
    device = processes.device if processes.device.type == "cuda" else resolve_device(runtime.device)
    memory_gib = runtime.device_memory_gib
    if device.type == "cuda" and memory_gib is None:
        import torch

        memory_gib = torch.cuda.get_device_properties(device).total_memory / GIB
    return MemoryPlan.of_run(conversion, Hardware.of_runtime(runtime, device.type, processes.num_processes, memory_gib))


def documents_to_skip(recipe: Recipe, conversion) -> dict[str, int]:
    """Per source, the documents the run that made this recipe's source model read (so pretraining an upgraded model
    does not train again on its conversion's text): only for a recipe that does not convert, with the same seed,
    held-out split and text fields, and not `data.reread`."""
    from ling_surgery.surgery.align import converts
    from ling_surgery.surgery.sources import recorded_data_read

    if converts(recipe) or recipe.data.reread:
        return {}
    read = recorded_data_read(conversion.source)
    if not read or read.get("seed") != recipe.seed or read.get("heldout_fraction") != recipe.data.heldout_fraction:
        return {}
    recorded = read.get("sources", {})
    same = [e for e in recipe.data.train if e.source in recorded
            and (recorded[e.source].get("text_field"), recorded[e.source].get("subset")) == (e.text_field, e.subset)]
    return {e.source: recorded[e.source]["documents"] for e in same}


def data_read(recipe: Recipe, train, offsets: list[int]) -> dict:
    """What this run's stages read of each training source, for the manifest (`documents_to_skip` of a later run)."""
    counts = train.documents_read(offsets[-1])
    return {"seed": recipe.seed, "heldout_fraction": recipe.data.heldout_fraction,
            "sources": {e.source: {"documents": counts.get(e.source, 0), "text_field": e.text_field, "subset": e.subset}
                        for e in recipe.data.train}}


def _text_streams(recipe: Recipe, tokenizer, console: Console, skip: dict[str, int] | None = None):
    """(train, held-out or None, each stage's first training token): the recipe's text as token streams, checked to
    hold a window for every stage and for the evaluation, and to hold every token the stages read (within
    data.epochs passes: text is never silently read again). `skip`: documents per source an earlier run read."""
    from ling_surgery.surgery.data import TokenStream
    from ling_surgery.surgery.token_cache import cache_root, split_tokens

    offsets = stage_offsets(recipe)
    longest = max(stage_seq_len(stage, recipe) for stage in recipe.stages)
    train_tokens = offsets[-1] + 4 * longest
    fraction, entries = recipe.data.heldout_fraction, recipe.data.sources()
    train_sources, heldout_sources, cached = [], [], []
    for entry in entries:
        # Streamed hub data: read enough text for both splits (≈ 8 characters per token is generous for any
        # tokenizer), for this source's share of the tokens.
        max_chars = 8 * max(int(entry.weight * train_tokens / (1 - fraction)), int(entry.weight * recipe.eval.tokens / fraction))
        train_part, heldout_part, from_cache = split_tokens(entry.source, entry.text_field, entry.subset, fraction,
                                                            max_chars, tokenizer, console)
        train_sources.append((entry.source, train_part, entry.weight))
        heldout_sources.append((entry.source, heldout_part, entry.weight))
        cached.append(from_cache)
    name = recipe.data.describe()
    train = TokenStream.from_mixture(train_sources, tokenizer, max_tokens=train_tokens, seed=recipe.seed,
                                     epochs=recipe.data.epochs, needed=offsets[-1], label=f"training text of {name!r}",
                                     skip=skip)
    train.windows(longest)
    heldout = None
    if recipe.eval.tokens:
        heldout = TokenStream.from_mixture(heldout_sources, tokenizer, max_tokens=recipe.eval.tokens, seed=0,
                                           label=f"held-out text of {name!r}")
        heldout.windows(recipe.eval.seq_len)
    counts = ", ".join(f"{len(t):,} train / {len(h):,} held-out documents of {n!r}"
                       for (n, t, _), (_, h, _) in zip(train_sources, heldout_sources))
    mix = "" if len(entries) == 1 else " (" + ", ".join(f"{n} {share:.0%}" for n, share in train.shares().items()) + ")"
    console.print(f"data: {counts}; {len(train):,} train tokens{mix}, "
                  f"{0 if heldout is None else len(heldout):,} held-out tokens")
    for state, names in (("read from", [e.source for e, hit in zip(entries, cached) if hit]),
                         ("tokenised once into", [e.source for e, hit in zip(entries, cached) if not hit])):
        if names:
            console.print(f"data: {', '.join(names)} {state} the token cache {cache_root() / 'tokens'}")
    if skip:
        console.print("data: skipping what the source model's run trained on (data.reread: true reads it again): "
                      + ", ".join(f"{n} {k:,} documents" for n, k in skip.items()))
    return train, heldout, offsets


def _execute(recipe: Recipe, conversion, folder: RunFolder, statuses, start: int, console: Console, from_stage,
             processes) -> dict:
    import torch

    from ling_surgery.surgery import sources
    from ling_surgery.surgery.context import RunContext
    from ling_surgery.surgery.export import save_model
    from ling_surgery.surgery.stages import STAGES

    t = time.perf_counter()
    main = processes.is_main_process
    # Read, tokenise and check the text before anything is written or the teacher loads: bad data costs a line.
    tokenizer = sources.load_tokenizer(conversion.source)
    with processes.main_process_first():  # the main process fills the token cache; the others read it
        train, heldout, offsets = _text_streams(recipe, tokenizer, console, documents_to_skip(recipe, conversion))
    device = processes.device if processes.device.type == "cuda" else resolve_device(recipe.runtime.device)
    torch.manual_seed(recipe.seed)

    console.print(f"loading {conversion.source.name} ({conversion.source.kind}) …")
    # The frozen teacher runs in bf16 on CUDA (dtype=auto); on CPU always fp32 (bf16 is ~400x slower there).
    use_bf16 = numerics(recipe.runtime)["dtype"] == "bfloat16"  # what the stages' fingerprints name
    if use_bf16 and device.type == "cpu":
        console.print("[yellow]warning:[/] bf16 on CPU is typically ~400x slower than fp32")
    teacher_source = getattr(conversion, "teacher", None)  # pretrain on an upgraded model: its own teacher
    teacher = sources.load_weights(teacher_source or conversion.source, torch.bfloat16 if use_bf16 else torch.float32,
                                   str(device))
    eval_windows = heldout.windows(recipe.eval.seq_len)[:] if heldout is not None else None
    teacher_reference = (teacher_source or conversion.source).reference()
    if main:  # only now: weights that do not load (another model_type's, say) leave no run folder behind
        (folder.root / "stages").mkdir(parents=True, exist_ok=True)
        (folder.root / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    timings = {"load": round(time.perf_counter() - t, 1)}
    if conversion.plan is not None and conversion.plan.measured:
        with processes.main_process_first():  # measured and kept by the main process, read by the others
            conversion = measured_placement(recipe, conversion, teacher, tokenizer, train, folder, console)

    stage_eval = None
    if recipe.eval.each_stage.tasks and main:
        from ling_surgery.evals.trajectory import StageEvaluator

        stage_eval = StageEvaluator(recipe.eval.each_stage, teacher, tokenizer, device, recipe.runtime.kda_chunk_size,
                                    recipe.seed, recipe.data.heldout_fraction, console)
    if start == 0:
        # The student trains in fp32 (master weights) whatever precision the teacher runs in.
        model = teacher if teacher_source is None else sources.load_weights(conversion.source, torch.float32, str(device))
    else:
        model = load_checkpoint(folder.stage_dir(start - 1, recipe.stages[start - 1]), device)
        if any(stage.kind not in CONVERT_KINDS for stage in recipe.stages[:start]):
            # An alignment stage gave the tokenizer its thinking-mode template: continue with that one.
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder.stage_dir(start - 1, recipe.stages[start - 1]))
    for status in statuses[start:]:
        i, stage = status.index, status.stage
        state = folder.training_state(i, stage, status.fingerprint)
        if (stage.name == from_stage or not state.matches()) and main:
            state.clear()  # --from starts the stage over; a state from another recipe is useless
        processes.wait_for_everyone()  # every process starts the stage from the same saved state (or none)
        seq_len = stage_seq_len(stage, recipe)
        ctx = RunContext(
            teacher=teacher, arch=conversion.arch, train=train, seq_len=seq_len, device=device,
            chunk_size=recipe.runtime.kda_chunk_size, window_start=-(-offsets[i] // seq_len), console=console,
            state=state if stage.kind != "init" else None, save_every=recipe.runtime.save_every,
            source_config=conversion.source_config, target_config=conversion.target_config, eval_windows=eval_windows,
            bf16_autocast=use_bf16, tokenizer=tokenizer, seed=recipe.seed,
            separate_documents=not recipe.data.attend_across_documents, work_dir=folder.root,
            teacher_name=teacher_reference, engine=recipe.runtime.engine,
            shard_teacher=recipe.runtime.teacher == "sharded",
        )
        console.rule(f"stage {i + 1}/{len(statuses)}: {stage.name} ({stage.kind})")
        t = time.perf_counter()
        model, metrics = STAGES[stage.kind](model, stage, ctx)
        seconds = round(time.perf_counter() - t, 1)
        if stage_eval is not None:
            console.print(f"eval.each_stage after {stage.name}: {', '.join(recipe.eval.each_stage.tasks)}")
            metrics["evals"] = stage_eval(model, stage.name)
        parent = folder.stage_dir(i - 1, recipe.stages[i - 1]) if i else None
        manifest = {
            "fingerprint": status.fingerprint,
            "stage": stage.name,
            "kind": stage.kind,
            "index": i + 1,
            "parent": {"path": str(parent) if parent else conversion.source.name,
                       "fingerprint": statuses[i - 1].fingerprint if i else None},
            "config": stage.model_dump(mode="json"),
            "recipe": recipe.model_dump(mode="json"),
            "metrics": metrics,
            "seconds": seconds,
            "device": str(device),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
        }
        if main:
            save_model(model, tokenizer, folder.stage_dir(i, stage), manifest, replace=True)
            state.clear()
        processes.wait_for_everyone()
        console.print(f"stage {stage.name}: checkpoint {folder.stage_dir(i, stage)} ({seconds:.0f} s)")
    if not main:
        return {}  # the main process evaluates, exports and reports
    return finalize(recipe, conversion, folder, model, teacher, tokenizer, eval_windows, train, device, console, timings,
                    data_read(recipe, train, offsets))


def finalize(recipe, conversion, folder: RunFolder, model, teacher, tokenizer, eval_windows, train, device, console, timings,
             read: dict | None = None) -> dict:
    """Held-out evaluation of teacher and upgraded model, then the model/ folder and the report."""
    from ling_surgery.surgery.sources import recorded_teacher
    from ling_surgery.evals.perplexity import perplexity
    from ling_surgery.evals.report import build_report, write_report
    from ling_surgery.evals.trajectory import read_trajectory
    from ling_surgery.surgery.export import save_model, verify_export
    from ling_surgery.surgery.plan import vllm_refusal

    t = time.perf_counter()
    refusal = vllm_refusal(model.config)
    teacher_source = getattr(conversion, "teacher", None)  # pretrain on an upgraded model: its own teacher
    stages = {s.name: (read_manifest(folder.stage_dir(i, s)) or {}) for i, s in enumerate(recipe.stages)}
    quality: dict = {}
    if eval_windows is not None:
        console.rule("evaluation (held-out text, never trained on)")
        # An align-only run's "teacher" is its source, often an upgraded model: the fast KDA path for it too.
        quality["teacher"] = perplexity(lambda ids: model_logits(teacher, ids, recipe.runtime.kda_chunk_size),
                                        eval_windows, device=device)
        console.print(f"teacher held-out perplexity {quality['teacher']['perplexity']:.2f}")
        after_init = stages[recipe.stages[0].name].get("metrics", {}).get("perplexity_after_init")
        if after_init:
            quality["student_after_init"] = after_init
        quality["student"] = perplexity(lambda ids: model_logits(model, ids, recipe.runtime.kda_chunk_size),
                                        eval_windows, device=device)
        quality["perplexity_ratio"] = quality["student"]["perplexity"] / quality["teacher"]["perplexity"]
    timings["eval"] = round(time.perf_counter() - t, 1)
    for name, manifest in stages.items():
        timings[name] = manifest.get("seconds", 0.0)  # from whichever invocation ran the stage
    timings["total"] = round(sum(timings.values()), 1)
    # The teacher this model answers to, so `pretrain` finds it: the pretrain teacher, the source of a conversion, or
    # (an align-only run) whatever its source answered to.
    teacher_of = teacher_source or (conversion.source if conversion.target else recorded_teacher(conversion.source))
    meta = {
        "source": conversion.source.name,
        "teacher": teacher_of.reference() if teacher_of is not None else None,
        "teacher_revision": teacher_of.revision if teacher_of is not None else None,
        "data_read": read,  # per source, the documents the stages read: a later pretrain starts after them
        "source_kind": conversion.source.kind,
        "target": (f"{conversion.target.model_type} ({conversion.target.architecture})" if conversion.target
                   else f"{model.config.model_type} (as the source: aligned, not converted)"),
        "plan": ({"full_attention_layers": list(conversion.plan.full_attention), "layer_group_size": conversion.plan.group_size,
                  "placement": recipe.plan.placement if conversion.target.linear_attention else None}
                 if conversion.plan is not None else None),
        "vllm": refusal or "serves it",
        # the column names of the report: an align-only run compares the model with itself before alignment
        "roles": ["teacher", "upgraded"] if conversion.target or teacher_source else ["before", "aligned"],
        "device": str(device),
        "seed": recipe.seed,
        "versions": versions(),
    }
    t_costs = model_costs(conversion.teacher_config if teacher_source else conversion.source_config)
    s_costs = model_costs(model.config)
    summaries = {name: m.get("metrics", {}) for name, m in stages.items() if m.get("kind") != "init"}
    model = model.cpu()  # the fresh-process check reloads on CPU in fp32: compare like with like
    probe = train.windows(min(64, recipe.data.seq_len))[:1]
    report: dict = {}

    trajectory = read_trajectory(folder.root)

    def before_commit(tmp: Path) -> None:
        report.update(build_report(t_costs, s_costs, quality, summaries, timings, meta))
        if trajectory:
            report["trajectory"] = trajectory
        if recipe.export.verify:
            check = report["export_check"] = verify_export(tmp, model, probe)
            if not check["bit_exact"]:  # raised before the commit: the folder is not written, the stages are kept
                raise SurgeryError(
                    f"export check failed: reloaded in a fresh process, the model's logits differ from the trained "
                    f"model's by max |Δlogit| = {check['max_abs_diff']:.3g} (expected 0); {folder.model} was not "
                    "written and the stage checkpoints are kept. Please report it; export.verify: false writes the "
                    "model unchecked")
        write_report(tmp, report)

    manifest = {"fingerprint": export_fingerprint(recipe), "kind": "export", "ling_surgery": meta,
                "recipe": recipe.model_dump(mode="json"), "quality": quality,
                "stages": {name: {k: v for k, v in m.items() if k not in ("recipe", "losses")} for name, m in stages.items()}}
    console.rule("export")
    save_model(model, tokenizer, folder.model, manifest, before_commit=before_commit, replace=True)
    write_report(folder.root, report)
    _print_report(console, report, folder)
    if refusal:
        console.print(f"[yellow]warning:[/] {folder.model}: {refusal}", highlight=False)
    if recipe.eval.tasks:
        from ling_surgery.evals.suite import run_eval

        console.rule("benchmarks: teacher vs. upgraded (ling-surgery report)")
        del model
        contexts = None if recipe.eval.inference else ()
        report["benchmarks"] = run_eval(
            {"teacher": teacher_source.name if teacher_source else recipe.source.model, "student": str(folder.model)},
            recipe.eval.tasks, recipe.eval.limit,
            folder.root / "eval", contexts, seed=recipe.seed, device=recipe.runtime.device, console=console,
        )
    return report


def _print_report(console: Console, report: dict, folder: RunFolder) -> None:
    from ling_surgery.evals.report import report_table

    console.print(report_table(report))
    check = report.get("export_check")
    if check:
        console.print(f"export check: reloaded in a fresh process, max |Δlogit| = {check['max_abs_diff']:.3g}, "
                      f"cached greedy = uncached argmax: {check['greedy_cache_matches']}")
    console.print(f"upgraded model: {folder.model}  (AutoModelForCausalLM.from_pretrained({str(folder.model)!r}))")


def measured_placement(recipe: Recipe, conversion, teacher, tokenizer, train, folder: RunFolder, console: Console):
    """`plan.placement: measured`: the teacher's measures (kept in the run folder's placement.json) choose the MLA
    layers before the init stage builds the upgraded model."""
    from ling_surgery.surgery.placement import measure_for, print_measures, resolve_measured

    windows = train.windows(recipe.data.seq_len)[:4] if recipe.plan.measure_by == "kl" else None
    t = time.perf_counter()
    measures = measure_for(conversion, teacher, tokenizer, windows, recipe.runtime.kda_chunk_size,
                           folder.root / "placement.json", recipe.seed)
    conversion = resolve_measured(conversion, measures)
    print_measures(console, measures, conversion)
    console.print(f"placement measured by {recipe.plan.measure_by} ({time.perf_counter() - t:.0f} s): MLA layers "
                  f"{list(conversion.plan.full_attention)}", highlight=False)
    return conversion


def model_costs(config):
    """Parameters and cache of a source family (grouped-query attention) or an upgraded one (MLA latents, KDA state)."""
    from ling_surgery.surgery.architectures import ARCHITECTURES
    from ling_surgery.surgery.plan import student_costs, teacher_costs

    return teacher_costs(config) if config.model_type in ARCHITECTURES else student_costs(config)


def model_logits(model, input_ids, chunk_size: int):
    """Logits of a whole window: the fast KDA path for upgraded models, a plain forward for any other."""
    from ling_surgery.surgery.kda import student_logits

    if model.config.model_type == "bailing_hybrid":
        return student_logits(model, input_ids, chunk_size)
    return model(input_ids=input_ids).logits


def load_checkpoint(path: Path, device):
    """A stage checkpoint back in fp32 (the master weights training continues from)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not (path / MANIFEST).is_file():
        raise SurgeryError(f"checkpoint {str(path)!r} is missing; rerun its stage with --from")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval().requires_grad_(False)


def process_state(recipe: Recipe):
    """The data-parallel processes this run is one of (accelerate's state: one process unless started by
    `accelerate launch` or torchrun), on the recipe's device kind."""
    from accelerate import PartialState

    return PartialState(cpu=resolve_device(recipe.runtime.device).type == "cpu")


def resolve_device(device: str):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SurgeryError("runtime.device is 'cuda' but no CUDA device is available; use runtime.device=auto or cpu")
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))


def versions() -> dict:
    import platform

    import torch
    import transformers

    import ling_surgery

    return {"ling_surgery": ling_surgery.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}

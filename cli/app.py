"""Typer app. Each command parses flags into a recipe and calls the library; nothing else lives here."""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ling_surgery.surgery.errors import SurgeryError

app = typer.Typer(
    name="ling-surgery",
    help="Upgrade a pretrained LLM into a hybrid linear-attention (KDA) + MLA model instead of rebuilding it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipes_app = typer.Typer(help="List, show and copy the recipes shipped with ling-surgery.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
# Logs and CI have no terminal: rich would assume 80 columns and cut stage names short.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

RECIPE = typer.Argument(..., help="recipe YAML file or shipped recipe name (ling-surgery recipes ls)")
SET = typer.Option([], "--set", help="override a recipe key: key.path=value, stages by name (repeatable)")
OUTPUT = typer.Option(None, "--output", "-o", help="run folder (export.output): stages/, model/, report")


@app.callback()
def _root() -> None:
    """ling-surgery command line."""


@app.command()
def convert(
    model: Optional[str] = typer.Argument(None, help="HF folder, hub id, .gguf file or embedded name (default smollm2-135m)"),
    target: Optional[str] = typer.Option(None, "--target", help="hybrid-linear (KDA + gated MLA, the default) or all-mla"),
    output: Optional[Path] = OUTPUT,
    config: Optional[str] = typer.Option(None, "--config", "-c", help="recipe YAML file or shipped recipe name"),
    overrides: list[str] = SET,
    dry_run: bool = typer.Option(False, "--dry-run", help="print the layer plan and costs; load no weights"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted convert into the same --output"),
) -> None:
    """Convert MODEL into a servable checkpoint distilled from the original (`run` of the default recipe)."""
    from ling_surgery.surgery.convert import convert as run_convert
    from ling_surgery.surgery.convert import plan_conversion
    from ling_surgery.surgery.validate import validate_recipe

    recipe, _ = validate_recipe(config, overrides, model=model, target=target, output=str(output) if output else None)
    if dry_run:
        console.print(plan_conversion(recipe).table())
        return
    run_convert(recipe, console, resume=resume)


@app.command()
def align(
    model: Optional[str] = typer.Argument(None, help="model folder (upgraded or stock), run folder, hub id or embedded "
                                          "name (default smollm2-135m)"),
    output: Optional[Path] = OUTPUT,
    config: Optional[str] = typer.Option(None, "--config", "-c", help="recipe YAML file or shipped recipe name"),
    overrides: list[str] = SET,
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", help="a .jinja chat template to build the "
                                                 "modes from (for a model without a usable one): stages.sft.chat_template"),
    sft: bool = typer.Option(True, "--sft/--no-sft", help="run the recipe's sft stages (decoupled SFT)"),
    rl: bool = typer.Option(True, "--rl/--no-rl", help="run the recipe's rl stages (fine-grained RL)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the stages and their data; load no weights"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted align into the same --output"),
) -> None:
    """Teach MODEL a fast and a thinking mode (decoupled SFT), then reward short right answers (fine-grained RL),
    through TRL; `run` of a recipe of sft and rl stages."""
    from ling_surgery.surgery.align import align as run_align
    from ling_surgery.surgery.align import plan_recipe
    from ling_surgery.surgery.config import ALIGN_STAGES
    from ling_surgery.surgery.validate import validate_recipe

    if chat_template is not None:
        if not sft:
            raise SurgeryError("--chat-template builds the modes in the sft stage; drop --no-sft")
        overrides = [*overrides, f"stages.sft.chat_template={chat_template}"]
    skip = tuple(kind for kind, on in (("sft", sft), ("rl", rl)) if not on)
    recipe, _ = validate_recipe(config, overrides, skip_kinds=skip, base={"stages": ALIGN_STAGES}, model=model,
                                output=str(output) if output else None)
    if dry_run:
        console.print(plan_recipe(recipe).table())
        return
    run_align(recipe, console, resume=resume)


def data_sources(specs: list[str]) -> list[dict] | None:
    """`--data SOURCE[:WEIGHT]` flags as data.train entries (None: the recipe's own)."""
    entries = []
    for spec in specs:
        source, _, weight = spec.rpartition(":")
        try:
            entries.append({"source": source, "weight": float(weight)} if source else {"source": spec})
        except ValueError:  # a colon that is part of the name
            entries.append({"source": spec})
    return entries or None


@app.command()
def pretrain(
    model: str = typer.Argument(..., help="upgraded model folder or run folder"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="the model to distill from (default: the one MODEL "
                                          "was converted from, as its manifest says): source.teacher"),
    output: Optional[Path] = OUTPUT,
    data: list[str] = typer.Option([], "--data", help="training text: 'wikipedia', 'chitchat', a file, folder or HF "
                                   "dataset, with :WEIGHT for a mixture (repeatable: --data wikipedia:0.7 --data "
                                   "chitchat:0.3): data.train"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="recipe YAML file or shipped recipe name"),
    overrides: list[str] = SET,
    dry_run: bool = typer.Option(False, "--dry-run", help="print the stage, its teacher and data; load no weights"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted pretrain into the same --output"),
) -> None:
    """Continue training an upgraded MODEL on more text with its teacher in the loop (KL + CE); `run` of a recipe of
    one `kind: pretrain` stage."""
    from ling_surgery.surgery.align import align as run_recipe
    from ling_surgery.surgery.align import plan_recipe
    from ling_surgery.surgery.config import PRETRAIN_STAGES
    from ling_surgery.surgery.validate import validate_recipe

    recipe, _ = validate_recipe(config, overrides, base={"stages": PRETRAIN_STAGES}, model=model, teacher=teacher,
                                data=data_sources(data), output=str(output) if output else None)
    if dry_run:
        console.print(plan_recipe(recipe).table())
        return
    run_recipe(recipe, console, resume=resume)


@app.command()
def validate(
    recipes: list[str] = typer.Argument(..., help="recipe YAML files or shipped recipe names"),
    overrides: list[str] = SET,
) -> None:
    """Check recipes (schema and cross-checks against the source's config) without loading any weights."""
    from ling_surgery.surgery.validate import validate_recipe

    for name in recipes:
        start = time.perf_counter()
        _, notes = validate_recipe(name, overrides)
        console.print(f"[green]ok[/] {name} ({time.perf_counter() - start:.2f} s)", highlight=False)
        for note in notes:
            console.print(f"  [yellow]note:[/] {note}", highlight=False)


@app.command()
def plan(recipe: str = RECIPE, overrides: list[str] = SET, output: Optional[Path] = OUTPUT,
         measure: bool = typer.Option(False, "--measure", help="load the teacher: where it retrieves, per layer "
                                      "(copying heads, KL if made KDA), and the layouts ranked by it")) -> None:
    """Show a recipe's stages (with their status in the run folder), layer plan, parameters and KV-cache costs."""
    from ling_surgery.surgery.align import plan_recipe
    from ling_surgery.surgery.run import RunFolder, stage_statuses, stages_table
    from ling_surgery.surgery.validate import validate_recipe

    conversion = plan_recipe(validate_recipe(recipe, overrides, output=str(output) if output else None)[0])
    if measure and conversion.plan is None:
        raise SurgeryError("--measure ranks layers for a conversion; this recipe only aligns, so its layers stay as they are")
    if measure:
        from ling_surgery.surgery.placement import measure_plan

        _, conversion = measure_plan(conversion, console)
    resolved = conversion.recipe
    console.print(conversion.table())
    folder = RunFolder(Path(resolved.export.output or ".does-not-exist").expanduser().resolve())
    console.print(stages_table(stage_statuses(resolved, folder), resolved))
    console.print(f"run folder: {resolved.export.output or '(none: pass --output)'}", highlight=False)


@app.command()
def run(
    recipe: str = RECIPE,
    overrides: list[str] = SET,
    output: Optional[Path] = OUTPUT,
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted stage from its last in-stage checkpoint"),
    from_stage: Optional[str] = typer.Option(None, "--from", help="rerun from this stage (by name), discarding later results"),
) -> None:
    """Run a recipe stage by stage; finished stages whose recipe part is unchanged are skipped."""
    from ling_surgery.surgery.run import run as run_recipe
    from ling_surgery.surgery.validate import validate_recipe

    resolved, _ = validate_recipe(recipe, overrides, output=str(output) if output else None)
    run_recipe(resolved, console, resume=resume, from_stage=from_stage)


@app.command()
def export(
    model: str = typer.Argument(..., help="run folder, exported model folder, .gguf, hub id or embedded name"),
    format: str = typer.Option("gguf", "--format", help="gguf (llama.cpp, Ollama, llama-cpp-python)"),
    dtype: str = typer.Option("f32", "--dtype", help="f32, f16, q8_0 or q4_0 (norms, biases and KDA conv/decay stay f32)"),
    output: Path = typer.Option(..., "--output", "-o", help="the .gguf file to write (must not exist)"),
) -> None:
    """Export a model for llama.cpp: upgraded models as `bailingmoe3`, Llama-family teachers as `llama`."""
    from ling_surgery.surgery.gguf_export import export_gguf

    if format != "gguf":
        raise SurgeryError(f"--format {format!r} is not supported; supported: gguf")
    summary = export_gguf(model, output, dtype)
    types = ", ".join(f"{n} {t}" for t, n in sorted(summary["types"].items()))
    console.print(f"wrote {summary['path']}: {summary['arch']}, {summary['tensors']} tensors ({types}), "
                  f"{summary['bytes'] / 2**20:.1f} MiB", highlight=False)
    if summary["f16_fallback"]:
        console.print(f"{len(summary['f16_fallback'])} tensors in f16: their rows do not fill whole {dtype} blocks "
                      f"(e.g. {summary['f16_fallback'][0]})", highlight=False)


TASKS = typer.Option(None, "--tasks", help="comma-separated tasks (default: all); see `ling-surgery eval --help`")
LIMIT = typer.Option(None, "--limit", help="documents per task, sampled with a fixed seed (perplexity: 512-token windows)")
CONTEXTS = typer.Option(None, "--contexts", help="context lengths for the inference benchmark, e.g. 512,4096 ('' to skip)")
DATA = typer.Option([], "--data", help="TASK=FILE.jsonl: score a task on your own data (repeatable)")
ENGINE = typer.Option("transformers", "--engine", help="transformers, or llamacpp (needs the llamacpp extra)")
GGUF_DTYPE = typer.Option("f32", "--gguf-dtype", help="with --engine llamacpp: f32, f16, q8_0 or q4_0 for exported models")
FLASH_ATTN = typer.Option("on", "--flash-attn", help="with --engine llamacpp: on (llama.cpp's default), off, or on,off to measure both")
RECALL_LENGTHS = typer.Option(None, "--recall-lengths", help="passkey/niah context lengths, e.g. 512,2048 "
                              "(default: 512-8k on CPU, 1k-128k on CUDA, each model up to its own limit)")
RECALL_DEPTHS = typer.Option(None, "--recall-depths", help="passkey/niah needle depths in [0, 1], e.g. 0,0.25,0.5,0.75,1 (default: 0,0.5,1 on CPU, 5 on CUDA)")
CACHE_TYPE = typer.Option("f16", "--cache-type", help="with --engine llamacpp: K/V cache type f16 (default) or q8_0, or f16,q8_0")
bench_app = typer.Typer(help="Benchmarks: inference (teacher vs. upgraded model in one engine, side by side) and "
                        "training throughput.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _engine_settings(flash_attn: str, cache_type: str):
    """llama.cpp settings from --flash-attn/--cache-type (None: the engine's defaults)."""
    if (flash_attn, cache_type) == ("on", "f16"):
        return None
    from ling_surgery.evals.llamacpp import engine_settings

    return engine_settings(flash_attn, cache_type)


def _eval_args(tasks, contexts, data):
    parsed_data = {}
    for item in data:
        if "=" not in item:
            raise SurgeryError(f"--data {item!r}: expected TASK=FILE.jsonl, e.g. --data arc_easy=my_questions.jsonl")
        task, path = item.split("=", 1)
        parsed_data[task.strip()] = path
    parsed_contexts = None
    if contexts is not None:
        try:
            parsed_contexts = tuple(int(c) for c in contexts.split(",") if c.strip())
        except ValueError:
            raise SurgeryError(f"--contexts {contexts!r}: expected comma-separated token counts, e.g. 512,4096") from None
    return (tasks.split(",") if tasks else None), parsed_contexts, parsed_data


@app.command("eval")
def eval_model(
    model: str = typer.Argument(..., help="run folder, exported model folder, .gguf, hub id or embedded name"),
    tasks: Optional[str] = TASKS,
    limit: Optional[int] = LIMIT,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="folder for report.json/md and plots"),
    contexts: Optional[str] = CONTEXTS,
    data: list[str] = DATA,
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    engine: str = ENGINE,
    gguf_dtype: str = GGUF_DTYPE,
    flash_attn: str = FLASH_ATTN,
    cache_type: str = CACHE_TYPE,
    recall_lengths: Optional[str] = RECALL_LENGTHS,
    recall_depths: Optional[str] = RECALL_DEPTHS,
) -> None:
    """Evaluate one model: held-out perplexity, LAMBADA, zero-shot multiple choice, GSM8K, long-context recall,
    inference cost.

    Tasks: wikipedia, lambada, arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, mmlu, gsm8k, passkey, niah;
    asked for by name: gsm8k_chat, gsm_symbolic_chat, arithmetic_chat (per thinking mode: accuracy, output tokens, obedience).
    """
    from ling_surgery.evals.suite import run_eval

    task_list, context_list, data_map = _eval_args(tasks, contexts, data)
    run_eval({"model": model}, task_list, limit, output, context_list, data_map, seed, device, console, engine, gguf_dtype,
             _engine_settings(flash_attn, cache_type), *_recall_grid(recall_lengths, recall_depths))


@app.command()
def report(
    teacher: str = typer.Argument(..., help="the original model (e.g. smollm2-135m)"),
    student: str = typer.Argument(..., help="the upgraded model: a run folder or its model/ folder"),
    tasks: Optional[str] = TASKS,
    limit: Optional[int] = LIMIT,
    output: Path = typer.Option(..., "--output", "-o", help="folder for report.json/md, quality.png, inference.png"),
    contexts: Optional[str] = CONTEXTS,
    data: list[str] = DATA,
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    engine: str = ENGINE,
    gguf_dtype: str = GGUF_DTYPE,
    flash_attn: str = FLASH_ATTN,
    cache_type: str = CACHE_TYPE,
    recall_lengths: Optional[str] = RECALL_LENGTHS,
    recall_depths: Optional[str] = RECALL_DEPTHS,
) -> None:
    """Teacher vs. upgraded model side by side on the same samples: quality, inference cost, tokens per solved task."""
    from ling_surgery.evals.suite import run_eval

    task_list, context_list, data_map = _eval_args(tasks, contexts, data)
    run_eval({"teacher": teacher, "student": student}, task_list, limit, output, context_list, data_map, seed, device,
             console, engine, gguf_dtype, _engine_settings(flash_attn, cache_type),
             *_recall_grid(recall_lengths, recall_depths))


def _recall_grid(lengths: str | None, depths: str | None):
    """--recall-lengths / --recall-depths as tuples (None: the defaults)."""
    parsed_lengths = parsed_depths = None
    if lengths is not None:
        try:
            parsed_lengths = tuple(int(n) for n in lengths.split(",") if n.strip())
        except ValueError:
            raise SurgeryError(f"--recall-lengths {lengths!r}: expected comma-separated token counts, e.g. 512,2048") from None
        if not parsed_lengths or min(parsed_lengths) < 128:
            raise SurgeryError(f"--recall-lengths {lengths!r}: each length must be at least 128 tokens")
    if depths is not None:
        try:
            parsed_depths = tuple(float(d) for d in depths.split(",") if d.strip())
        except ValueError:
            raise SurgeryError(f"--recall-depths {depths!r}: expected comma-separated fractions, e.g. 0,0.5,1") from None
        if not parsed_depths or not all(0 <= d <= 1 for d in parsed_depths):
            raise SurgeryError(f"--recall-depths {depths!r}: each depth must be between 0 (start) and 1 (end)")
    return parsed_lengths, parsed_depths


@bench_app.command("inference")
def bench_inference(
    teacher: str = typer.Argument(..., help="the original model (e.g. smollm2-135m), or its .gguf"),
    student: str = typer.Argument(..., help="the upgraded model: a run folder, its model/ folder, or its .gguf"),
    engine: str = typer.Option("llamacpp", "--engine", help="llamacpp (needs the llamacpp extra) or transformers"),
    contexts: Optional[str] = CONTEXTS,
    gguf_dtype: str = GGUF_DTYPE,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="folder for report.json/md, inference.png and the GGUFs"),
    device: str = typer.Option("auto", "--device", help="transformers engine: auto, cpu or cuda"),
    flash_attn: str = FLASH_ATTN,
    cache_type: str = CACHE_TYPE,
) -> None:
    """Decode and prefill speed, cache/state and resident memory against context length, both models in one engine.

    With several llama.cpp settings (e.g. --flash-attn on,off --cache-type f16,q8_0) each model is measured under
    every one and compared at its fastest, so neither model is held back by a setting that suits only the other.
    All models and settings are measured interleaved, and a setting stops at the first context where it is already
    1.25x slower than another setting of its model and slowing down faster (long contexts are the expensive part).
    """
    from ling_surgery.evals.suite import run_eval

    _, context_list, _ = _eval_args(None, contexts, [])
    run_eval({"teacher": teacher, "student": student}, [], None, output, context_list, None, 0, device, console,
             engine, gguf_dtype, _engine_settings(flash_attn, cache_type))


@bench_app.command("train")
def bench_train(
    model: str = typer.Argument("smollm2-135m", help="the source model to convert and train (embedded name, folder, hub id)"),
    stages: str = typer.Option(",".join(("attention_transfer", "logit_distill", "pretrain")), "--stages",
                               help="stage kinds to measure, comma-separated"),
    seq_len: int = typer.Option(512, "--seq-len", help="window length (tokens)"),
    batch_size: int = typer.Option(2, "--batch-size", help="windows per step"),
    steps: int = typer.Option(3, "--steps", help="timed steps per stage (after a warm-up and a FLOP-counted step)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    overrides: list[str] = SET,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="folder for bench_train.json"),
) -> None:
    """Training throughput per stage kind: tokens/s, counted FLOPs, MFU against this machine's matmul peak, peak
    memory; a table, and JSON for CI."""
    from ling_surgery.evals.train_bench import bench_train as run_bench

    run_bench(model, tuple(s.strip() for s in stages.split(",") if s.strip()), seq_len, batch_size, steps, device,
              overrides, console, output)


@bench_app.command("tradeoff")
def bench_tradeoff(
    teacher: str = typer.Argument(..., help="the original model (e.g. smollm2-135m), or its .gguf"),
    layouts: list[str] = typer.Argument(..., help="upgraded models of the same source, each NAME=MODEL or MODEL (a run "
                                        "folder, its model/ folder, or a .gguf)"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for report.json/md, tradeoff.json and tradeoff.png"),
    tasks: str = typer.Option("passkey", "--tasks", help="recall tasks, the first one plotted (passkey, niah)"),
    engine: str = typer.Option("llamacpp", "--engine", help="llamacpp (needs the llamacpp extra) or transformers"),
    contexts: Optional[str] = CONTEXTS,
    gguf_dtype: str = GGUF_DTYPE,
    recall_lengths: Optional[str] = RECALL_LENGTHS,
    recall_depths: Optional[str] = RECALL_DEPTHS,
    limit: Optional[int] = LIMIT,
) -> None:
    """Recall against decode speed and cache size for several layouts of one source, one PNG: choose by numbers."""
    from ling_surgery.evals.tradeoff import bench_tradeoff as run_tradeoff

    named = {}
    for item in layouts:
        name, _, model = item.partition("=") if "=" in item else (Path(item.rstrip("/")).name, "", item)
        if name in named:
            raise SurgeryError(f"layout name {name!r} is used twice; name them NAME=MODEL")
        named[name] = model
    task_list, context_list, _ = _eval_args(tasks, contexts, [])
    lengths, depths = _recall_grid(recall_lengths, recall_depths)
    run_tradeoff(teacher, named, output, context_list, tuple(task_list), engine, console, limit=limit,
                 gguf_dtype=gguf_dtype, recall_lengths=lengths, recall_depths=depths)


@recipes_app.command("ls")
def recipes_ls() -> None:
    """The shipped recipes with what they do and how to launch them."""
    from rich.table import Table

    from ling_surgery.surgery.recipes import list_recipes

    table = Table(title="shipped recipes")
    for col in ("name", "what", "launch"):
        table.add_column(col)
    for recipe in list_recipes():
        table.add_row(recipe.name, recipe.summary, recipe.launch)
    Console().print(table)


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="shipped recipe name")) -> None:
    """Print a shipped recipe."""
    from ling_surgery.surgery.recipes import resolve_recipe

    sys.stdout.write(resolve_recipe(name).read_text())


@recipes_app.command("cp")
def recipes_cp(name: str = typer.Argument(..., help="shipped recipe name"),
               dest: Path = typer.Argument(..., help="file or folder to copy it to")) -> None:
    """Copy a shipped recipe to edit it."""
    from ling_surgery.surgery.recipes import copy_recipe

    console.print(f"copied {name} → {copy_recipe(name, dest)}", highlight=False)


def error_line(err: SurgeryError, rank: int, processes: int) -> str | None:
    """What one of N launched processes prints for an error: bad input meets every process alike, so the first says
    it; an error of one process's own (`SurgeryError.process_local`: its shard of a checkpoint, say) is said by that
    process, naming it, since the others only wait for it until the launcher ends them."""
    if getattr(err, "process_local", False) and processes > 1:
        return f"process {rank} of {processes}: {err}"
    return str(err) if rank == 0 else None


def main() -> None:
    """Entry point: bad input ends in one line on stderr and exit code 2."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    # transformers' and datasets' tqdm bars ("Writing model shards" at every TRL checkpoint, SFTTrainer's tokenizing
    # passes) interleave with the rich progress the stages show; both libraries read these when first imported, and a
    # user's own setting wins.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    except SurgeryError as err:
        line = error_line(err, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
        if line is not None:
            console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: finished stages are kept; continue with `ling-surgery run RECIPE --resume`")
        sys.exit(130)
    except Exception as err:  # a bug, not bad input: its traceback, and over several processes one line naming where
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if processes == 1:
            raise
        import traceback

        traceback.print_exc()
        console.print(f"[bold red]error:[/] process {os.environ.get('RANK', '0')} of {processes} failed with "
                      f"{type(err).__name__}: {err} (traceback above; the launcher stops the other processes; finished "
                      "stages are kept, `--resume` continues)", highlight=False, soft_wrap=True)
        sys.exit(1)

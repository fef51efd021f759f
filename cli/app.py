"""Typer app. Each command parses flags into a recipe and calls the library; nothing else lives here."""

from __future__ import annotations

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
    from ling_surgery.surgery.config import load_recipe
    from ling_surgery.surgery.convert import convert as run_convert
    from ling_surgery.surgery.convert import plan_conversion

    recipe = load_recipe(config, overrides, model=model, target=target, output=str(output) if output else None)
    if dry_run:
        console.print(plan_conversion(recipe).table())
        return
    run_convert(recipe, console, resume=resume)


@app.command()
def validate(
    recipes: list[str] = typer.Argument(..., help="recipe YAML files or shipped recipe names"),
    overrides: list[str] = SET,
) -> None:
    """Check recipes (schema and cross-checks against the source's config) without loading any weights."""
    from ling_surgery.surgery.config import load_recipe
    from ling_surgery.surgery.validate import check_recipe

    for name in recipes:
        start = time.perf_counter()
        notes = check_recipe(load_recipe(name, overrides))
        console.print(f"[green]ok[/] {name} ({time.perf_counter() - start:.2f} s)", highlight=False)
        for note in notes:
            console.print(f"  [yellow]note:[/] {note}", highlight=False)


@app.command()
def plan(recipe: str = RECIPE, overrides: list[str] = SET, output: Optional[Path] = OUTPUT) -> None:
    """Show a recipe's stages (with their status in the run folder), layer plan, parameters and KV-cache costs."""
    from ling_surgery.surgery.config import load_recipe
    from ling_surgery.surgery.convert import plan_conversion
    from ling_surgery.surgery.run import RunFolder, stage_statuses, stages_table

    resolved = load_recipe(recipe, overrides, output=str(output) if output else None)
    console.print(plan_conversion(resolved).table())
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
    from ling_surgery.surgery.config import load_recipe
    from ling_surgery.surgery.run import run as run_recipe

    resolved = load_recipe(recipe, overrides, output=str(output) if output else None)
    run_recipe(resolved, console, resume=resume, from_stage=from_stage)


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


def main() -> None:
    """Entry point: bad input ends in one line on stderr and exit code 2."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        app()
    except SurgeryError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: finished stages are kept; continue with `ling-surgery run RECIPE --resume`")
        sys.exit(130)

"""Typer app. Each command parses flags into the library's config and calls the library; nothing else lives here."""

from __future__ import annotations

import sys
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
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """ling-surgery command line."""


@app.command()
def convert(
    model: Optional[str] = typer.Argument(None, help="HF folder, hub id, .gguf file or embedded name (default smollm2-135m)"),
    target: str = typer.Option("hybrid-linear", "--target", help="target architecture"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="folder to write the upgraded model to (must not exist)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file with conversion settings"),
    overrides: list[str] = typer.Option([], "--set", help="override a setting: key.path=value (repeatable)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the layer plan and costs; load no weights"),
) -> None:
    """Convert MODEL into a servable bailing_hybrid checkpoint (KDA + gated MLA), distilled from the original."""
    from ling_surgery.surgery.config import load_config
    from ling_surgery.surgery.convert import convert as run_convert
    from ling_surgery.surgery.convert import plan_conversion

    flags = {"source.model": model, "target": target, "output": str(output) if output else None}
    cfg = load_config(config, overrides, **flags)
    if dry_run:
        console.print(plan_conversion(cfg).table())
        return
    run_convert(cfg, console)


def main() -> None:
    """Entry point: bad input ends in one line on stderr and exit code 2."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        app()
    except SurgeryError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: nothing was written to the output folder")
        sys.exit(130)

"""The `ling-surgery` command line: a thin Typer shell over the library."""

from ling_surgery.cli.app import app, main

__all__ = ["app", "main"]

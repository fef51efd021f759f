"""`ling-surgery validate`: a recipe's schema and its cross-checks against the source, with no weights loaded.

Reads only the source's config.json or GGUF header (no torch, no transformers), so it answers in well under 2 s.
Errors raise `SurgeryError` (one line, exit code 2); warnings come back as strings.
"""

from __future__ import annotations

import warnings

from ling_surgery.surgery.architectures import check_source
from ling_surgery.surgery.config import Recipe
from ling_surgery.surgery.data import locate_documents
from ling_surgery.surgery.sources import read_shape, resolve_source
from ling_surgery.surgery.targets import check_shapes


def check_recipe(recipe: Recipe) -> list[str]:
    """Everything `run` would reject before loading weights; returns warnings."""
    notes: list[str] = []
    source = resolve_source(recipe.source.model, recipe.source.revision)
    shape = read_shape(source)
    if shape is None:
        notes.append(f"source {source.name!r} is a hub model that is not cached here: layer-plan checks run when "
                     "`run` downloads its config")
    else:
        check_source(shape)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_shapes(recipe, shape)
        notes += [str(w.message) for w in caught]
    kind, _ = locate_documents(recipe.data.train)
    if kind == "hub":
        notes.append(f"data {recipe.data.train!r} is a hub dataset: checked when `run` loads it")
    # Whether this machine has a GPU is not a property of the recipe: `run` checks runtime.device where it runs.
    if recipe.runtime.dtype == "bfloat16" and recipe.runtime.device == "cpu":
        notes.append("runtime.dtype bfloat16 on CPU: typical CPUs run bf16 ~400x slower than fp32 (use auto or float32)")
    return notes

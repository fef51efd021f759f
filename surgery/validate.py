"""`ling-surgery validate`: a recipe's schema and its cross-checks against the source, with no weights loaded.

Reads only the source's config.json or GGUF header (no torch, no transformers), so it answers in well under 2 s.
Every problem is reported at once (`RecipeError`: one line each, exit code 2); warnings come back as strings.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ling_surgery.surgery.align import converts
from ling_surgery.surgery.architectures import check_source
from ling_surgery.surgery.config import Recipe, load_recipe
from ling_surgery.surgery.data import locate_documents
from ling_surgery.surgery.errors import RecipeError, SurgeryError
from ling_surgery.surgery.memory_plan import MemoryPlan
from ling_surgery.surgery.sources import check_local_files, read_shape, resolve_source
from ling_surgery.surgery.targets import check_shapes


def check_recipe(recipe: Recipe) -> list[str]:
    """Everything `run` would reject before loading weights, all problems in one `RecipeError`; returns warnings."""
    notes: list[str] = []
    problems: list[str] = []
    source = shape = None
    try:
        source = resolve_source(recipe.source.model, recipe.source.revision)
        shape = read_shape(source)
        check_local_files(source)
    except SurgeryError as err:
        problems.append(f"source.model: {err}")
        if source is None or shape is None or source.gguf_file:
            shape = source = None
    if recipe.source.teacher:
        try:
            check_local_files(resolve_source(recipe.source.teacher))
        except SurgeryError as err:
            problems.append(f"source.teacher: {err}")
    if source is not None and shape is None:
        notes.append(f"source {source.name!r} is a hub model that is not cached here: layer-plan checks run when "
                     "`run` downloads its config")
    elif shape is not None and not converts(recipe):
        problems += recall_problems(recipe, shape)  # alignment only: any causal LM, taken as it is
    elif shape is not None:
        try:
            check_source(shape)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                plan, resolved, _ = check_shapes(recipe, shape)
            notes += [str(w.message) for w in caught]
            notes += context_notes(recipe, shape)
            memory = MemoryPlan.of_shape(shape, resolved, plan.layer_types)
            if memory is not None:
                problems += memory.problems()
                notes += memory.notes()
        except RecipeError as err:
            problems += err.problems
        except SurgeryError as err:
            problems.append(f"source.model: {err}")
        problems += recall_problems(recipe, shape)
    for i, entry in enumerate(recipe.data.train):
        try:
            kind, _ = locate_documents(entry.source)
            if kind == "hub":
                notes.append(f"data {entry.source!r} is a hub dataset: checked when `run` loads it")
        except SurgeryError as err:
            problems.append(f"data.train{'' if len(recipe.data.train) == 1 else f'.{i}'}: {err}")
    problems += alignment_problems(recipe)
    if problems:
        raise RecipeError(problems, recipe)
    # Whether this machine has a GPU is not a property of the recipe: `run` checks runtime.device where it runs.
    if recipe.runtime.dtype == "bfloat16" and recipe.runtime.device == "cpu":
        notes.append("runtime.dtype bfloat16 on CPU: typical CPUs run bf16 ~400x slower than fp32 (use auto or float32)")
    return notes


def alignment_problems(recipe: Recipe) -> list[str]:
    """An alignment stage's files must exist and a data file's every row must hold a conversation; hub datasets and
    reasoning-gym tasks are checked when the stage builds its data."""
    from ling_surgery.surgery.sft_data import conversation_of, source_kind, user_rows

    problems = []
    for stage in recipe.stages:
        if stage.kind != "sft":
            continue
        if stage.chat_template and not Path(stage.chat_template).expanduser().is_file():
            problems.append(f"stages.{stage.name}.chat_template: {stage.chat_template!r} not found; pass a .jinja file")
        for i, data in enumerate(stage.data):
            try:
                if source_kind(data.source) == "file":  # every row, so a bad one is found before any weights load
                    for row in user_rows(data.source, data.split, data.examples, data.messages_field):
                        conversation_of(row, data.messages_field, data.source)
            except SurgeryError as err:
                problems.append(f"stages.{stage.name}.data.{i}: {err}")
    return problems


def context_notes(recipe: Recipe, shape) -> list[str]:
    """Windows longer than the context the source was trained for: allowed (RoPE extrapolates), but worth a word."""
    limit = shape.max_position_embeddings
    if not limit:
        return []
    windows = [("data.seq_len", recipe.data.seq_len), ("eval.seq_len", recipe.eval.seq_len)]
    windows += [(f"stages.{stage.name}.seq_len", stage.seq_len) for stage in recipe.stages if getattr(stage, "seq_len", None)]
    return [f"{key} {value} is longer than the source's max_position_embeddings {limit}: the teacher never saw such "
            "windows in training" for key, value in windows if value > limit]


def recall_problems(recipe: Recipe, shape) -> list[str]:
    """Recall tasks after every stage need prompts the source can hold (else the run would stop after its first stage)."""
    each = recipe.eval.each_stage
    limit = shape.max_position_embeddings
    if not limit or not {"passkey", "niah"} & set(each.tasks):
        return []
    too_long = [n for n in each.recall_lengths if n > limit]
    if not too_long:
        return []
    return [f"eval.each_stage.recall_lengths {too_long} exceed the source's max_position_embeddings {limit}; "
            f"use lengths up to {limit}"]


def validate_recipe(recipe=None, overrides=(), skip_kinds=(), **flags) -> tuple[Recipe, list[str]]:
    """`load_recipe` then `check_recipe`, with the problems of both in one `RecipeError`; returns (recipe, notes).

    What every command that takes a recipe runs first: a recipe with an unknown key, a bad value and a layer group
    that does not fit the source gets all three named in one report.
    """
    problems: list[str] = []
    try:
        resolved = load_recipe(recipe, overrides, skip_kinds=tuple(skip_kinds), **flags)
    except RecipeError as err:
        problems, resolved = list(err.problems), err.partial
    notes: list[str] = []
    if resolved is not None:
        try:
            notes = check_recipe(resolved)
        except RecipeError as err:
            problems += err.problems
    if problems:
        raise RecipeError(problems, resolved)
    return resolved, notes

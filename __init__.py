"""ling-surgery: upgrade a pretrained LLM into a hybrid KDA + MLA model instead of rebuilding it.

The Python API mirrors the CLI: ``ling_surgery.run(recipe)`` is ``ling-surgery run``, ``ling_surgery.convert(recipe)``
is ``ling-surgery convert``, ``ling_surgery.align(recipe)`` is ``ling-surgery align``, ``ling_surgery.load_recipe(...)``
reads a recipe with ``--set``-style overrides.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "ALIGN_STAGES", "Recipe", "RecipeError", "add_thinking_modes", "align", "check_recipe", "convert",
           "load_recipe", "plan_conversion", "run", "validate_recipe"]

_LAZY = {
    # Lazy so that `ling-surgery --help` and `validate` do not pay for importing torch.
    "Recipe": "ling_surgery.surgery.config",
    "load_recipe": "ling_surgery.surgery.config",
    "check_recipe": "ling_surgery.surgery.validate",
    "validate_recipe": "ling_surgery.surgery.validate",
    "RecipeError": "ling_surgery.surgery.errors",
    "convert": "ling_surgery.surgery.convert",
    "plan_conversion": "ling_surgery.surgery.convert",
    "run": "ling_surgery.surgery.run",
    "align": "ling_surgery.surgery.align",
    "ALIGN_STAGES": "ling_surgery.surgery.config",
    "add_thinking_modes": "ling_surgery.surgery.chat_template",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)

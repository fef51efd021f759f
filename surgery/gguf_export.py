"""GGUF export for llama.cpp (and Ollama, llama-cpp-python): upgraded models as `bailingmoe3`, teachers as `llama`.

Written with the `gguf` package's writer from the documented format (llama.cpp's own converter needs transformers
4.x and is not installed with any package). The layout follows llama.cpp's loader (`src/models/bailingmoe3.cpp`,
`src/models/llama.cpp`, `src/llama-vocab.cpp` at the commit vendored in llama-cpp-python 0.3.36):

| target | source `model_type` | notes |
|---|---|---|
| `bailingmoe3` | `bailing_hybrid` (all-dense) | KDA conv split q/k/v, `ssm_a = exp(A_log)`, MLA `kv_b_proj` split into absorbed `attn_k_b`/`attn_v_b`; no MoE keys (an all-dense file must not carry expert counts) |
| `llama` | `llama`, `mistral` | q/k rows permuted from rotate-half to adjacent pairs; tied embeddings written once |

Each tensor map is one pure function that accounts for every source tensor (`init_maps.Ledger`). Tensors llama.cpp
reads as f32 operands (1-D tensors, norms, biases, the KDA conv taps, `ssm_a`) stay f32 in every file type; the rest
take the requested type. The file is written next to its destination and renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.export import user_mode
from ling_surgery.surgery.init_maps import Ledger

DTYPES = ("f32", "f16", "q8_0", "q4_0")
F16_TINY = 127 * 2.0**-14  # a q8_0 block with this max has the smallest normal f16 scale
GGUF_ARCH = {"bailing_hybrid": "bailingmoe3", "llama": "llama", "mistral": "llama"}
EXPERT_GATING_SIGMOID = 2  # llama.cpp LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID


@dataclass(frozen=True)
class Key:
    name: str  # without the "<arch>." prefix when `arch_scoped`
    kind: str  # uint32 | float32 | bool | string | int_array
    value: object
    arch_scoped: bool = True


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def bailingmoe3_tensors(state: dict[str, torch.Tensor], config) -> dict[str, np.ndarray]:
    """GGUF tensors of an all-dense `bailing_hybrid` model (names relative to the in-memory state dict).

    | GGUF                         | transformers                                    | transform                          |
    |------------------------------|-------------------------------------------------|------------------------------------|
    | token_embd / output          | model.embed_tokens / lm_head                    | –                                  |
    | blk.i.attn_q/k/v (KDA)       | self_attn.{q,k,v}_proj                          | – (no RoPE in KDA: no permutation) |
    | blk.i.ssm_conv1d_{q,k,v}     | self_attn.conv1d (3D, 1, K)                     | split on dim 0 → (1, D, 1, K)      |
    | blk.i.ssm_f_a / ssm_beta     | forget_gate.f_proj / b_proj                     | –                                  |
    | blk.i.ssm_a                  | forget_gate.A_log                               | exp(A_log) → (H, 1)                |
    | blk.i.ssm_dt.bias            | forget_gate.dt_bias                             | –                                  |
    | blk.i.ssm_g_a / ssm_norm     | g_proj / o_norm                                 | –                                  |
    | blk.i.attn_q / attn_kv_a_mqa | (MLA) q_proj / kv_a_proj_with_mqa               | – (both interleaved RoPE already)  |
    | blk.i.attn_k_b               | kv_b_proj viewed (H, dn + dv, r)                | [:, :dn, :] transposed → (H, r, dn)|
    | blk.i.attn_v_b               | kv_b_proj viewed (H, dn + dv, r)                | [:, dn:, :] → (H, dv, r)           |
    | blk.i.attn_gate              | (MLA) g_proj (head-wise)                        | –                                  |
    """
    _check_bailing(config)
    ledger = Ledger(state)
    take = lambda name: _np(ledger.take(name))  # noqa: E731
    out = {
        "token_embd.weight": take("model.embed_tokens.weight"),
        "output_norm.weight": take("model.norm.weight"),
        "output.weight": take("lm_head.weight"),
    }
    heads, d = config.num_attention_heads, config.linear_head_dim
    dn, dv, r = config.qk_nope_head_dim, config.v_head_dim, config.kv_lora_rank
    for i, kind in enumerate(config.layer_types):
        src, dst = f"model.layers.{i}", f"blk.{i}"
        out[f"{dst}.attn_norm.weight"] = take(f"{src}.input_layernorm.weight")
        out[f"{dst}.ffn_norm.weight"] = take(f"{src}.post_attention_layernorm.weight")
        for proj, name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            out[f"{dst}.{name}.weight"] = take(f"{src}.mlp.{proj}.weight")
        a = f"{src}.self_attn"
        if kind == "linear_attention":
            for proj in ("q", "k", "v"):
                out[f"{dst}.attn_{proj}.weight"] = take(f"{a}.{proj}_proj.weight")
            conv = take(f"{a}.conv1d.weight")  # (3·H·d, 1, K), q, k, v in that order
            for j, proj in enumerate("qkv"):
                part = conv[j * heads * d : (j + 1) * heads * d]
                out[f"{dst}.ssm_conv1d_{proj}.weight"] = part.reshape(1, heads * d, 1, part.shape[-1])
            out[f"{dst}.ssm_f_a.weight"] = take(f"{a}.forget_gate.f_proj.weight")
            out[f"{dst}.ssm_a"] = np.exp(take(f"{a}.forget_gate.A_log")).reshape(heads, 1)
            out[f"{dst}.ssm_dt.bias"] = take(f"{a}.forget_gate.dt_bias")
            out[f"{dst}.ssm_beta.weight"] = take(f"{a}.b_proj.weight")
            out[f"{dst}.ssm_g_a.weight"] = take(f"{a}.g_proj.weight")
            out[f"{dst}.ssm_norm.weight"] = take(f"{a}.o_norm.weight")
        else:
            out[f"{dst}.attn_q.weight"] = take(f"{a}.q_proj.weight")
            out[f"{dst}.attn_kv_a_mqa.weight"] = take(f"{a}.kv_a_proj_with_mqa.weight")
            out[f"{dst}.attn_kv_a_norm.weight"] = take(f"{a}.kv_a_layernorm.weight")
            kv_b = take(f"{a}.kv_b_proj.weight").reshape(heads, dn + dv, r)  # per head [k_nope; v] rows
            out[f"{dst}.attn_k_b.weight"] = np.ascontiguousarray(kv_b[:, :dn, :].transpose(0, 2, 1))
            out[f"{dst}.attn_v_b.weight"] = np.ascontiguousarray(kv_b[:, dn:, :])
            out[f"{dst}.attn_gate.weight"] = take(f"{a}.g_proj.weight")
        out[f"{dst}.attn_output.weight"] = take(f"{a}.o_proj.weight")
    ledger.check_all_consumed()
    return out


def _check_bailing(config) -> None:
    """What llama.cpp's bailingmoe3 can represent: all-dense MLPs, head-wise MLA gates, no q-LoRA, no MTP."""
    problems = []
    if any(t != "dense" for t in getattr(config, "mlp_layer_types", None) or []):
        problems.append("MoE layers (mlp_layer_types must all be 'dense')")
    if getattr(config, "q_lora_rank", None):
        problems.append("q_lora_rank")
    if getattr(config, "num_mtp_layers", 0):
        problems.append("MTP layers")
    if not getattr(config, "kda_safe_gate", True) or getattr(config, "kda_lower_bound", -5.0) >= 0:
        problems.append("an unbounded KDA gate (kda_safe_gate with a negative kda_lower_bound is required)")
    if problems:
        raise SurgeryError(f"GGUF export of bailing_hybrid supports all-dense models only; this one has {problems[0]}")


def bailingmoe3_keys(config) -> list[Key]:
    layers = config.num_hidden_layers
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return [
        Key("block_count", "uint32", layers),
        Key("context_length", "uint32", config.max_position_embeddings),
        Key("embedding_length", "uint32", config.hidden_size),
        Key("feed_forward_length", "uint32", config.intermediate_size),
        Key("attention.head_count", "uint32", config.num_attention_heads),
        # 1 marks an MLA layer (latent cache), 0 a KDA layer (recurrent state): llama.cpp reads the layout from here.
        Key("attention.head_count_kv", "int_array", [1 if t == "full_attention" else 0 for t in config.layer_types]),
        Key("rope.freq_base", "float32", float(rope)),
        Key("attention.layer_norm_rms_epsilon", "float32", float(config.rms_norm_eps)),
        Key("attention.key_length", "uint32", config.kv_lora_rank + config.qk_rope_head_dim),  # MLA cache width
        Key("attention.value_length", "uint32", config.linear_head_dim),
        Key("rope.dimension_count", "uint32", config.qk_rope_head_dim),
        Key("vocab_size", "uint32", config.vocab_size),
        Key("ssm.conv_kernel", "uint32", config.short_conv_kernel_size),
        Key("kda.head_dim", "uint32", config.linear_head_dim),  # config.head_dim holds the RoPE dim in memory
        Key("kda.safe_gate", "bool", True),
        Key("kda.gate_lower_bound", "float32", float(config.kda_lower_bound)),
        Key("attention.kv_lora_rank", "uint32", config.kv_lora_rank),
        Key("attention.key_length_mla", "uint32", config.qk_nope_head_dim + config.qk_rope_head_dim),
        Key("attention.value_length_mla", "uint32", config.v_head_dim),
        # Required by the loader even when every layer is dense (leading_dense_block_count = all layers).
        Key("expert_feed_forward_length", "uint32", getattr(config, "moe_intermediate_size", None) or config.intermediate_size),
        Key("expert_shared_count", "uint32", 0),
        Key("leading_dense_block_count", "uint32", layers),
        Key("expert_gating_func", "uint32", EXPERT_GATING_SIGMOID),
    ]


def llama_tensors(state: dict[str, torch.Tensor], config) -> dict[str, np.ndarray]:
    """GGUF tensors of a Llama-family model; q/k rows go from rotate-half pairs (j, j + d/2) to adjacent (2j, 2j+1)."""
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise SurgeryError("GGUF export of Llama-family models with projection biases is not supported")
    ledger = Ledger(state)
    take = lambda name: _np(ledger.take(name))  # noqa: E731
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    out = {"token_embd.weight": take("model.embed_tokens.weight"), "output_norm.weight": take("model.norm.weight")}
    head = ledger.take_optional("lm_head.weight")
    if head is not None and not getattr(config, "tie_word_embeddings", False):
        out["output.weight"] = _np(head)  # a tied head is the embedding: llama.cpp reuses token_embd
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}", f"blk.{i}"
        out[f"{dst}.attn_norm.weight"] = take(f"{src}.input_layernorm.weight")
        out[f"{dst}.ffn_norm.weight"] = take(f"{src}.post_attention_layernorm.weight")
        out[f"{dst}.attn_q.weight"] = rotate_half_to_adjacent(take(f"{src}.self_attn.q_proj.weight"), heads)
        out[f"{dst}.attn_k.weight"] = rotate_half_to_adjacent(take(f"{src}.self_attn.k_proj.weight"), kv_heads)
        out[f"{dst}.attn_v.weight"] = take(f"{src}.self_attn.v_proj.weight")
        out[f"{dst}.attn_output.weight"] = take(f"{src}.self_attn.o_proj.weight")
        for proj, name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            out[f"{dst}.{name}.weight"] = take(f"{src}.mlp.{proj}.weight")
    ledger.check_all_consumed()
    return out


def rotate_half_to_adjacent(weight: np.ndarray, heads: int) -> np.ndarray:
    """Per head, row h·d + 2j + t ← row h·d + t·d/2 + j: HF RoPE pairs (j, j + d/2), llama.cpp pairs (2j, 2j + 1)."""
    d = weight.shape[0] // heads
    return weight.reshape(heads, 2, d // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama_keys(config) -> list[Key]:
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise SurgeryError(f"GGUF export of rope_type {rope.get('rope_type')!r} is not supported (default RoPE only)")
    return [
        Key("block_count", "uint32", config.num_hidden_layers),
        Key("context_length", "uint32", config.max_position_embeddings),
        Key("embedding_length", "uint32", config.hidden_size),
        Key("feed_forward_length", "uint32", config.intermediate_size),
        Key("attention.head_count", "uint32", config.num_attention_heads),
        Key("attention.head_count_kv", "uint32", config.num_key_value_heads),
        Key("rope.freq_base", "float32", float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))),
        Key("attention.layer_norm_rms_epsilon", "float32", float(config.rms_norm_eps)),
        Key("attention.key_length", "uint32", d),
        Key("attention.value_length", "uint32", d),
        Key("rope.dimension_count", "uint32", d),
        Key("vocab_size", "uint32", config.vocab_size),
    ]


LAYOUTS = {
    "bailingmoe3": (bailingmoe3_keys, bailingmoe3_tensors),
    "llama": (llama_keys, llama_tensors),
}


def tokenizer_keys(tokenizer, vocab_size: int) -> list[Key]:
    """Byte-level BPE vocabulary so llama.cpp tokenises exactly like the transformers tokenizer it came from.

    The pre-tokenizer name is read off the tokenizer's own pipeline: plain ByteLevel → "gpt-2", Digits + ByteLevel
    (SmolLM) → "smollm"; anything else is refused rather than tokenised differently.
    """
    import json

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise SurgeryError(f"GGUF export needs a byte-level BPE tokenizer; this one is {model.get('type')!r}")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        elif token in added:
            tokens.append(token)
            types.append(3 if added[token].special else 4)  # CONTROL / USER_DEFINED
        else:
            tokens.append(token)
            types.append(1)  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(p.replace(" ", "Ġ") for p in m) for m in model.get("merges", [])]
    if not merges:
        raise SurgeryError("GGUF export: the tokenizer has no BPE merges; llama.cpp cannot tokenise without them")
    keys = [
        Key("tokenizer.ggml.model", "string", "gpt2", False),
        Key("tokenizer.ggml.pre", "string", pre, False),
        Key("tokenizer.ggml.tokens", "string_array", tokens, False),
        Key("tokenizer.ggml.token_type", "int_array", types, False),
        Key("tokenizer.ggml.merges", "string_array", merges, False),
        Key("tokenizer.ggml.add_bos_token", "bool", False, False),
        Key("tokenizer.ggml.add_eos_token", "bool", False, False),
    ]
    for name, token in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("unknown", tokenizer.unk_token),
                        ("padding", tokenizer.pad_token)):
        if token is not None and token in vocab:
            keys.append(Key(f"tokenizer.ggml.{name}_token_id", "uint32", vocab[token], False))
    if tokenizer.chat_template:
        keys.append(Key("tokenizer.chat_template", "string", tokenizer.chat_template, False))
    return keys


def _pre_tokenizer_name(pre: dict | None) -> str:
    def is_byte_level(p):
        return p and p.get("type") == "ByteLevel" and not p.get("add_prefix_space") and p.get("use_regex", True)

    if is_byte_level(pre):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits") and is_byte_level(parts[1]):
            return "smollm"
    raise SurgeryError(f"GGUF export: the tokenizer's pre-tokenizer ({(pre or {}).get('type')}) has no llama.cpp "
                       "equivalent that tokenises identically; supported: ByteLevel, Digits + ByteLevel")


def _file_type(name: str, array: np.ndarray, dtype: str, output_name: str) -> str:
    """f32 for what llama.cpp uses as f32 operands: 1-D tensors, norms, biases, KDA conv taps and ssm_a.

    An MLA down-projection with a row whose largest value is below `F16_TINY` stays f32 (it is small): f16 would store
    the row as subnormals, and q8_0/q4_0 blocks carry an f16 scale (block max / 127) that would underflow.

    At 4 bits the output matrix (`output.weight`, or the tied `token_embd.weight` that doubles as it) stays q8_0, as
    llama.cpp's own quantizer keeps it at higher precision (it picks Q6_K, which the `gguf` package cannot pack):
    on the converted embedded default this halves q4_0's perplexity cost (teacher +37% → +25%, student +28% → +16%).
    """
    if array.ndim <= 1 or name.endswith("_norm.weight") or ".ssm_conv1d_" in name or not name.endswith(".weight"):
        return "f32"
    if dtype != "f32" and name.endswith(".attn_kv_a_mqa.weight") and np.abs(array).max(axis=-1).min() < F16_TINY:
        return "f32"  # MLA latent rows scaled into their norm's linear regime (init_maps): f16 cannot hold them
    if dtype == "q4_0" and name == output_name:
        return "q8_0"
    return dtype


def write_gguf(model, tokenizer, path: str | Path, dtype: str = "f32", name: str | None = None) -> dict:
    """Write `model` (+ tokenizer) as a GGUF file; returns a summary (arch, tensors, types, bytes)."""
    import gguf

    if dtype not in DTYPES:
        raise SurgeryError(f"--dtype {dtype!r} is not supported; supported: {', '.join(DTYPES)}")
    config = model.config
    arch = GGUF_ARCH.get(config.model_type)
    if arch is None:
        raise SurgeryError(f"GGUF export of model_type {config.model_type!r} is not supported; supported: "
                           f"{', '.join(GGUF_ARCH)}")
    keys_fn, tensors_fn = LAYOUTS[arch]
    state = {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}
    tensors = tensors_fn(state, config)
    keys = keys_fn(config) + tokenizer_keys(tokenizer, tensors["token_embd.weight"].shape[0])
    qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
    file_types = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}  # llama.cpp LLAMA_FTYPE_*
    planned = {}
    output_name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    for tensor_name, array in tensors.items():
        kind = _file_type(tensor_name, array, dtype, output_name)
        block = gguf.GGML_QUANT_SIZES[qtypes[kind]][0]
        if array.shape[-1] % block:
            raise SurgeryError(f"--dtype {dtype} cannot hold {tensor_name}: its rows have {array.shape[-1]} values and "
                               f"{dtype} packs blocks of {block}; use --dtype f16 or f32")
        planned[tensor_name] = kind
    path = Path(path)
    tmp = Path(tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)[1])
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_string("general.type", "model")
        writer.add_string("general.name", name or path.stem)
        writer.add_uint32("general.file_type", file_types[dtype])
        writer.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
        for key in keys:
            full = f"{arch}.{key.name}" if key.arch_scoped else key.name
            if key.kind == "int_array":
                writer.add_array(full, [int(v) for v in key.value])
            elif key.kind == "string_array":
                writer.add_array(full, list(key.value))
            else:
                getattr(writer, f"add_{key.kind}")(full, key.value)
        for tensor_name, array in tensors.items():
            kind = planned[tensor_name]
            if kind == "f32":
                writer.add_tensor(tensor_name, np.ascontiguousarray(array, dtype=np.float32))
            elif kind == "f16":
                writer.add_tensor(tensor_name, np.ascontiguousarray(array, dtype=np.float16))
            else:
                packed = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtypes[kind])
                writer.add_tensor(tensor_name, packed, raw_dtype=qtypes[kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.chmod(user_mode(0o666))  # mkstemp makes 0600; the file should look like any file the user creates
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = "the disk is full" if err.errno == 28 else (err.strerror or str(err))
        raise SurgeryError(f"writing {str(path)!r} failed: {reason}; nothing was written there") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    counts: dict[str, int] = {}
    for kind in planned.values():
        counts[kind] = counts.get(kind, 0) + 1
    return {"arch": arch, "tensors": len(tensors), "types": counts, "bytes": path.stat().st_size, "path": str(path)}


def export_gguf(model: str, output: str | Path, dtype: str = "f32") -> dict:
    """`ling-surgery export MODEL --format gguf`: load MODEL in fp32 and write it as GGUF to a new file."""
    from ling_surgery.surgery import sources

    if dtype not in DTYPES:
        raise SurgeryError(f"--dtype {dtype!r} is not supported; supported: {', '.join(DTYPES)}")
    output = Path(output).expanduser().resolve()
    if output.exists():
        raise SurgeryError(f"output {str(output)!r} already exists; pass a new .gguf path or remove it")
    if output.suffix != ".gguf":
        raise SurgeryError(f"output {str(output)!r} must end in .gguf")
    if not output.parent.is_dir():
        raise SurgeryError(f"folder {str(output.parent)!r} does not exist; create it or pick another --output")
    source = sources.resolve_source(model)
    model_type = sources.load_config(source).model_type
    if model_type not in GGUF_ARCH:
        raise SurgeryError(f"GGUF export of {source.name!r} ({model_type}) is not supported; "
                           f"supported model types: {', '.join(GGUF_ARCH)}")
    loaded, tokenizer = sources.load_model(source, torch.float32)
    return write_gguf(loaded, tokenizer, output, dtype, name=Path(source.name).name)

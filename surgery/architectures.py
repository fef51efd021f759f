"""What the surgery needs to know about each source architecture: one small declarative table per `model_type`.

The code that converts is generic; it looks modules up by the names below. Adding a Llama-like family is a new
entry here, plus a tiny-model test.
"""

from __future__ import annotations

from dataclasses import dataclass

from ling_surgery.surgery.errors import SurgeryError

# RoPE variants whose inverse frequencies depend only on the frequency itself, so keeping the highest-frequency
# pairs under a new base θ' = θ^(dr/d) reproduces them exactly (see init_maps.rope_pairs).
FREQUENCY_ONLY_ROPE = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ArchSpec:
    """Module paths and quirks of one Llama-style decoder family (names relative to the causal-LM model)."""

    model_type: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    mlp: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    qk_norm: tuple[str, str] | None = None  # per-head RMSNorm on q and k before RoPE (Qwen3)
    may_have_qkv_bias: bool = False  # projection biases are read from the weights when present
    hidden_act: str = "silu"


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", may_have_qkv_bias=True),  # attention_bias=True puts biases on q/k/v/o
    "mistral": ArchSpec("mistral"),
    "qwen2": ArchSpec("qwen2", may_have_qkv_bias=True),  # always biases on q/k/v
    "qwen3": ArchSpec("qwen3", qk_norm=("q_norm", "k_norm"), may_have_qkv_bias=True),
}


def get_arch(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise SurgeryError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))} "
            "(dense Llama-family decoders)"
        ) from None


def check_source(shape) -> ArchSpec:
    """The architecture spec for a source (a `sources.SourceShape`), after checking what the conversion relies on."""
    arch = get_arch(shape.model_type)
    if shape.rope_type not in FREQUENCY_ONLY_ROPE:
        raise SurgeryError(
            f"rope_type {shape.rope_type!r} of the source cannot be carried into MLA exactly; "
            f"supported: {', '.join(FREQUENCY_ONLY_ROPE)}"
        )
    if shape.hidden_act != arch.hidden_act:
        raise SurgeryError(
            f"hidden_act {shape.hidden_act!r} is not supported (bailing_hybrid reuses it in the KDA conv); need 'silu'"
        )
    if shape.num_experts:
        raise SurgeryError("MoE sources are not supported yet; pass a dense Llama-family model")
    return arch


def check_source_config(config) -> ArchSpec:
    """`check_source` for a transformers config object."""
    from ling_surgery.surgery.sources import SourceShape

    return check_source(SourceShape.from_config(config))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def get_module(root, dotted: str):
    for part in dotted.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root

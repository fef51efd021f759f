"""What the surgery needs to know about each source architecture: one small declarative table per `model_type`.

The code that converts is generic; it looks modules up by the names below. Adding a Llama-like family is a new
entry here, plus a tiny-model test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ling_surgery.surgery.errors import SurgeryError

# RoPE variants whose inverse frequencies depend only on the frequency itself, so keeping the highest-frequency
# pairs under a new base θ' = θ^(dr/d) reproduces them exactly (see init_maps.rope_pairs).
FREQUENCY_ONLY_ROPE = ("default", "linear", "llama3")


SIGMOID, SOFTMAX = "sigmoid", "softmax"


@dataclass(frozen=True)
class MoESpec:
    """Where one family keeps its MoE block and how it routes (tensor names relative to a decoder layer; config keys of
    its config)."""

    router: str  # SIGMOID (DeepSeek-V3's, copied exactly) | SOFTMAX
    num_experts: str  # config key: routed experts
    expert_width: str  # config key: one routed expert's intermediate size
    block: str = "mlp"
    selection_bias: str | None = None  # buffer of the sigmoid routers' choice-only bias, relative to the router
    shared: str | None = None  # ungated (or token-gated, see shared_gate) shared expert module
    shared_count: str | None = None  # config key: shared width = expert width × this (DeepSeek-V3)
    shared_width: str | None = None  # config key: shared width (Qwen2-MoE)
    shared_gate: str | None = None  # Qwen2-MoE: shared output × σ(g·x), a token-dependent scale the target lacks
    renormalise: str | None = "norm_topk_prob"  # config key; None: always renormalised (Mixtral)
    dense_layers: str = "none"  # which layers keep a dense MLP: "none" | "first_k_dense_replace" | "mlp_only_layers"


_DEEPSEEK = dict(router=SIGMOID, num_experts="n_routed_experts", expert_width="moe_intermediate_size",
                 selection_bias="e_score_correction_bias", shared="shared_experts", shared_count="n_shared_experts",
                 dense_layers="first_k_dense_replace")
MOE_SPECS: dict[str, MoESpec] = {
    "deepseek_v3": MoESpec(**_DEEPSEEK),
    "glm4_moe": MoESpec(**_DEEPSEEK),
    "dots1": MoESpec(**_DEEPSEEK),
    "qwen3_moe": MoESpec(SOFTMAX, "num_experts", "moe_intermediate_size", dense_layers="mlp_only_layers"),
    "qwen2_moe": MoESpec(SOFTMAX, "num_experts", "moe_intermediate_size", shared="shared_expert",
                         shared_width="shared_expert_intermediate_size", shared_gate="shared_expert_gate",
                         dense_layers="mlp_only_layers"),
    "mixtral": MoESpec(SOFTMAX, "num_local_experts", "intermediate_size", renormalise=None),
    "olmoe": MoESpec(SOFTMAX, "num_experts", "intermediate_size"),
}


@dataclass(frozen=True)
class MoEShape:
    """One source's MoE, resolved from its config: what the target's MoE keys become."""

    router: str
    num_experts: int
    top_k: int
    expert_width: int
    shared_width: int  # 0: no shared expert
    shared_gated: bool
    renormalise: bool
    scaling: float  # routed_scaling_factor of a sigmoid router (1 for softmax routers before the map)
    n_group: int
    topk_group: int
    sparse: tuple[bool, ...]  # per layer: MoE (True) or dense MLP

    @property
    def target_shared_experts(self) -> int:
        """Shared experts of the target: the source's shared width in units of the expert width, rounded up (zero
        padding is exact); one zero shared expert when the source has none, because llama.cpp requires its tensors."""
        return max(1, -(-self.shared_width // self.expert_width))

    @property
    def leading_dense(self) -> int:
        """Dense layers before the first MoE layer."""
        return next((i for i, sparse in enumerate(self.sparse) if sparse), len(self.sparse))

    @property
    def engine_loadable(self) -> bool:
        """vLLM and llama.cpp build dense MLPs only for the leading `first_k_dense_replace` layers."""
        return all(self.sparse[self.leading_dense:])


def moe_shape(spec: MoESpec, config) -> MoEShape:
    """The MoE facts of a source config (a transformers config or a raw config.json mapping)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    experts, width, layers = get(spec.num_experts), get(spec.expert_width), get("num_hidden_layers")
    if not experts or not width:
        raise SurgeryError(f"the source config lacks {spec.num_experts} or {spec.expert_width}; is it an MoE config?")
    if spec.shared_width:
        shared = get(spec.shared_width) or 0
    elif spec.shared_count:
        shared = width * (get(spec.shared_count) or 0)
    else:
        shared = 0
    if spec.dense_layers == "first_k_dense_replace":
        first = get("first_k_dense_replace") or 0
        sparse = tuple(i >= first for i in range(layers))
    elif spec.dense_layers == "mlp_only_layers":
        dense, step = set(get("mlp_only_layers") or ()), get("decoder_sparse_step") or 1
        sparse = tuple(i not in dense and (i + 1) % step == 0 for i in range(layers))
    else:
        sparse = (True,) * layers
    sigmoid = spec.router == SIGMOID
    renormalise = True if spec.renormalise is None else bool(get(spec.renormalise, False))
    shape = MoEShape(
        router=spec.router, num_experts=experts, top_k=get("num_experts_per_tok"), expert_width=width,
        shared_width=shared, shared_gated=spec.shared_gate is not None and shared > 0, renormalise=renormalise,
        scaling=float(get("routed_scaling_factor", 1.0) or 1.0) if sigmoid else 1.0,
        n_group=(get("n_group") or 1) if sigmoid else 1, topk_group=(get("topk_group") or 1) if sigmoid else 1,
        sparse=sparse,
    )
    if not 0 < shape.top_k <= experts:
        raise SurgeryError(f"num_experts_per_tok {shape.top_k} must be between 1 and the {experts} experts")
    if experts % shape.n_group or experts // shape.n_group < 2 or shape.topk_group > shape.n_group:
        raise SurgeryError(f"n_group {shape.n_group} / topk_group {shape.topk_group} do not fit {experts} experts "
                           "(each group needs ≥ 2 experts)")
    return shape



def target_routing(shape: MoEShape) -> MoEShape:
    """The target router's settings for a source: a sigmoid source's own; for softmax sources one group, renormalised,
    ρ = 1 (`moe.map_softmax_router` folds the rest into the experts)."""
    if shape.router == SIGMOID:
        return shape
    return replace(shape, router=SIGMOID, n_group=1, topk_group=1, renormalise=True, scaling=1.0)


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
    qk_norm: tuple[str, str] | None = None  # RMSNorm on q and k before RoPE (Qwen3: per head; read when present)
    qk_norm_per_head: bool = True  # False: one RMSNorm over all heads' channels (OLMoE)
    may_have_qkv_bias: bool = False  # projection biases are read from the weights when present
    o_bias: bool = True  # attention_bias also puts a bias on o_proj (Llama); False: on q/k/v only (GLM-4.5)
    hidden_act: str = "silu"
    moe: MoESpec | None = None  # MoE sources: where the experts and the router are
    # DeepSeek's attention is already MLA (q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj): its MLA layers
    # are copied, its KDA layers start from its NoPE queries, keys and values (init_maps.mla_source_heads)
    mla_attention: bool = False


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", may_have_qkv_bias=True),  # attention_bias=True puts biases on q/k/v/o
    "mistral": ArchSpec("mistral"),
    "qwen2": ArchSpec("qwen2", may_have_qkv_bias=True, o_bias=False),  # always biases on q/k/v, never on o_proj
    "qwen3": ArchSpec("qwen3", qk_norm=("q_norm", "k_norm"), may_have_qkv_bias=True),
    "qwen3_moe": ArchSpec("qwen3_moe", qk_norm=("q_norm", "k_norm"), may_have_qkv_bias=True, moe=MOE_SPECS["qwen3_moe"]),
    "qwen2_moe": ArchSpec("qwen2_moe", may_have_qkv_bias=True, moe=MOE_SPECS["qwen2_moe"]),
    "mixtral": ArchSpec("mixtral", moe=MOE_SPECS["mixtral"]),
    "olmoe": ArchSpec("olmoe", qk_norm=("q_norm", "k_norm"), qk_norm_per_head=False, moe=MOE_SPECS["olmoe"]),
    "dots1": ArchSpec("dots1", qk_norm=("q_norm", "k_norm"), may_have_qkv_bias=True, moe=MOE_SPECS["dots1"]),
    "deepseek_v3": ArchSpec("deepseek_v3", mla_attention=True, moe=MOE_SPECS["deepseek_v3"]),
    # GLM-4.5: RoPE on the first half of each head, q/k/v biases (attention_bias), optional per-head q/k norms
    "glm4_moe": ArchSpec("glm4_moe", qk_norm=("q_norm", "k_norm"), may_have_qkv_bias=True, o_bias=False,
                         moe=MOE_SPECS["glm4_moe"]),
}


def source_moe(config) -> MoEShape | None:
    """The MoE of a source config (transformers object or config.json mapping); None for a dense source (an all-MLA
    upgrade of a dense model is a deepseek_v3 with one expert and only dense layers)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    arch = ARCHITECTURES.get(get("model_type"))
    if arch is None or arch.moe is None or (get(arch.moe.num_experts) or 0) <= 1:
        return None
    shape = moe_shape(arch.moe, config)
    return shape if any(shape.sparse) else None


def get_arch(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise SurgeryError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))} "
            "(Llama-family decoders, dense or MoE)"
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
    if arch.mla_attention and shape.q_lora_rank:
        raise SurgeryError(f"{shape.model_type} sources with q_lora_rank {shape.q_lora_rank} (DeepSeek-V3/R1, Kimi-K2) "
                           "are not supported: bailing_hybrid has no query LoRA in transformers; sources without it "
                           "(DeepSeek-V2-Lite-style, Moonlight) convert")
    if shape.num_experts and arch.moe is None:
        moe_types = ", ".join(sorted(k for k, v in ARCHITECTURES.items() if v.moe))
        raise SurgeryError(f"model_type {shape.model_type!r} has {shape.num_experts} experts, but its MoE router is not "
                           f"supported; MoE sources supported: {moe_types}")
    return arch


def check_source_config(config) -> ArchSpec:
    """`check_source` for a transformers config object."""
    from ling_surgery.surgery.sources import SourceShape

    return check_source(SourceShape.from_config(config))


def rotary_dim(config) -> int:
    """How many channels of each head RoPE rotates (partial rotary, GLM-4.5: the first half), even; an MLA source's
    RoPE width. Pairs are (j, j + R/2) at θ^(-2j/R)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if get("kv_lora_rank") and get("qk_rope_head_dim"):
        return get("qk_rope_head_dim")
    rope = get("rope_parameters") or {}
    factor = rope.get("partial_rotary_factor", get("partial_rotary_factor")) or 1.0
    d = get("head_dim") or get("hidden_size") // get("num_attention_heads")
    return int(d * factor) // 2 * 2


def llama3_unscaled_dims(rope: dict, rotary: int) -> int:
    """How many leading RoPE dims (pairs × 2) llama3 scaling leaves as they are: pair j (inverse frequency
    θ^(-2j/R)) keeps its frequency while its wavelength is below original_max_position_embeddings / high_freq_factor
    (Llama 3.1's rule, transformers' `_compute_llama3_parameters`); the rest are divided by up to `factor`. 0 when the
    RoPE is not llama3."""
    if rope.get("rope_type", rope.get("type")) != "llama3" or not rotary:
        return 0
    theta = float(rope.get("rope_theta", 10000.0))
    limit = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    pairs = sum(1 for j in range(rotary // 2) if 2 * math.pi * theta ** (2 * j / rotary) < limit)
    return 2 * pairs


def head_dim(config) -> int:
    """The per-head width the upgraded model's heads take: a GQA source's head dim, an MLA source's value dim."""
    if getattr(config, "kv_lora_rank", None) and getattr(config, "v_head_dim", None):
        return config.v_head_dim
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def get_module(root, dotted: str):
    for part in dotted.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root

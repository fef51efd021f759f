"""Layer plans (which layers become KDA and which MLA) and inference-cost numbers computed from configs."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from ling_surgery.surgery.architectures import head_dim
from ling_surgery.surgery.errors import SurgeryError

KDA, MLA = "linear_attention", "full_attention"


def routed_experts(config) -> int:
    """Routed experts per MoE layer of an upgraded model's config (object or config.json mapping; transformers writes
    bailing_hybrid's as num_experts); 0 or 1 for a dense one."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return get("num_local_experts") or get("num_experts") or get("n_routed_experts") or 0


def moe_layers(config) -> tuple[bool, ...]:
    """Per layer of an upgraded model's config: MoE (True) or a dense MLP — bailing_hybrid's mlp_layer_types,
    deepseek_v3's layers from first_k_dense_replace on (when it has more than one routed expert)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    types = get("mlp_layer_types")
    if types:
        return tuple(t == "sparse" for t in types)
    first, moe = get("first_k_dense_replace") or 0, routed_experts(config) > 1
    return tuple(moe and i >= first for i in range(get("num_hidden_layers")))


def mixer_types(config) -> list[str]:
    """Per layer, KDA or MLA, for a target config (all-MLA targets have no `layer_types`)."""
    return list(getattr(config, "layer_types", None) or [MLA] * config.num_hidden_layers)


@dataclass(frozen=True)
class LayerPlan:
    num_layers: int
    full_attention: tuple[int, ...]
    group_size: int | None  # set when the layout is periodic, as vLLM and llama.cpp's converter require
    measured: bool = False  # placement: measured — the layers are chosen once the teacher is loaded (`placement`)
    provisional: bool = False  # measured, not yet resolved: only the count of MLA layers is known

    @property
    def layer_types(self) -> list[str]:
        return [MLA if i in self.full_attention else KDA for i in range(self.num_layers)]

    @property
    def kda_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.full_attention]


def layout_problems(num_layers: int, group_size: int | None, full_attention_layers: list[int] | None) -> list[str]:
    """What is wrong with a layer layout for a model of `num_layers` layers, one line each with its fix."""
    if full_attention_layers is not None:
        if not full_attention_layers:
            # transformers' bailing_hybrid reads the sequence length from a full-attention layer's cache
            return ["plan.full_attention_layers is empty: the hybrid needs at least one MLA layer; list one or more, "
                    "or set plan.layer_group_size"]
        bad = sorted({i for i in full_attention_layers if i >= num_layers})
        return [f"plan.full_attention_layers {bad} out of range: the model has {num_layers} layers "
                f"(0..{num_layers - 1})"] if bad else []
    if group_size is None:
        return ["plan: set plan.layer_group_size or plan.full_attention_layers"]
    if group_size > num_layers or num_layers % group_size:
        from ling_surgery.surgery.defaults import layer_group_size

        fits = [g for g in range(2, num_layers + 1) if num_layers % g == 0]
        return [f"plan.layer_group_size {group_size} does not divide num_hidden_layers {num_layers}; use one of {fits}, "
                f"list layers in plan.full_attention_layers, or leave it unset (derived: {layer_group_size(num_layers)[0]})"]
    return []


NON_PERIODIC = ("transformers and ling-surgery's GGUF (llama.cpp reads the layout per layer) run it; vLLM and "
                "llama.cpp's own converter read only periodic layouts (plan.layer_group_size)")


def engine_layer_types(num_layers: int, group_size: int) -> list[str]:
    """The layout vLLM (`_is_kda_layer`) and llama.cpp's own converter derive from `layer_group_size` alone: every
    g-th layer and the trailing remainder are full attention (research/llamacpp.md, moe.md §4); `layer_types` is ignored."""
    tail = num_layers // group_size * group_size
    return [MLA if (i + 1) % group_size == 0 or i >= tail else KDA for i in range(num_layers)]


def vllm_refusal(config) -> str | None:
    """Why vLLM would not serve this exported config as transformers runs it (None: it would)."""
    if config.model_type != "bailing_hybrid":
        return None
    moe = "sparse" in (getattr(config, "mlp_layer_types", None) or [])
    if moe and not config.norm_topk_prob:
        return ("not for vLLM: its BailingMoeV3 MoE always renormalises the routing weights, and this model's router "
                "does not (norm_topk_prob false, as its source's); serve it with transformers")
    if moe and "dense" in config.mlp_layer_types[config.mlp_layer_types.index("sparse"):]:
        return ("not for vLLM: it builds dense MLPs only for the leading layers, and this model has dense layers "
                "after MoE ones (plan.moe_layout: source); serve it with transformers")
    group, types = getattr(config, "layer_group_size", None), mixer_types(config)
    if group and engine_layer_types(config.num_hidden_layers, group) == types:
        return None
    layers = [i for i, t in enumerate(types) if t == MLA]
    return (f"not for vLLM: its MLA layers {layers} are not periodic and vLLM reads the layout from layer_group_size "
            "alone, so it would build the wrong layers; serve it with llama.cpp (`ling-surgery export --format gguf`) or "
            "transformers, or convert with plan.layer_group_size for vLLM")


def make_plan(num_layers: int, group_size: int | None = 6, full_attention_layers: list[int] | None = None,
              warn_non_periodic: bool = True) -> LayerPlan:
    problems = layout_problems(num_layers, group_size, full_attention_layers)
    if problems:
        raise SurgeryError(problems[0])
    if full_attention_layers is not None:
        layers = tuple(sorted(set(full_attention_layers)))
        for g in range(1, num_layers + 1):
            if num_layers % g == 0 and layers == tuple(range(g - 1, num_layers, g)):
                return LayerPlan(num_layers, layers, g)
        if warn_non_periodic:
            warnings.warn(f"layers {list(layers)} are not periodic: {NON_PERIODIC}", stacklevel=2)
        return LayerPlan(num_layers, layers, None)
    return LayerPlan(num_layers, tuple(range(group_size - 1, num_layers, group_size)), group_size)


@dataclass(frozen=True)
class Costs:
    params: int
    kv_bytes_per_token: int  # grows with context
    state_bytes_per_sequence: int  # constant: KDA recurrent + conv state
    active_params: int | None = None  # per token, for MoE models (routed experts a token skips left out); None: params

    @property
    def active(self) -> int:
        return self.params if self.active_params is None else self.active_params

    def cache_bytes(self, context: int) -> int:
        return self.kv_bytes_per_token * context + self.state_bytes_per_sequence


def count_params(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def skipped_expert_params(config) -> int:
    """Parameters of the routed experts a token does not use: per MoE layer, (E − k) experts of 3·H·I (SwiGLU)."""
    from ling_surgery.surgery.architectures import source_moe

    moe = source_moe(config)
    if moe is not None:
        layers, experts, top_k, width = sum(moe.sparse), moe.num_experts, moe.top_k, moe.expert_width
    else:  # an upgraded model's config
        layers, experts = sum(moe_layers(config)), routed_experts(config)
        top_k, width = getattr(config, "num_experts_per_tok", 1), getattr(config, "moe_intermediate_size", 0)
    return layers * max(0, experts - top_k) * 3 * config.hidden_size * width


def _costs(config, per_token: int, state: int) -> Costs:
    total, skipped = count_params(config), skipped_expert_params(config)
    return Costs(total, per_token, state, total - skipped if skipped else None)


def teacher_costs(config, kv_dtype_bytes: int = 2) -> Costs:
    if getattr(config, "kv_lora_rank", None):  # an MLA source (DeepSeek): the engines cache its latents
        per_token = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * kv_dtype_bytes
        return _costs(config, per_token, 0)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = config.num_hidden_layers * 2 * kv_heads * head_dim(config) * kv_dtype_bytes
    return _costs(config, per_token, 0)


def student_costs(config, kv_dtype_bytes: int = 2) -> Costs:
    """MLA caches (r + dr) latents per token; KDA keeps an fp32 [H, dk, dk] state and a (K-1)-tap conv state."""
    n_mla = mixer_types(config).count(MLA)
    n_kda = config.num_hidden_layers - n_mla
    per_token = n_mla * (config.kv_lora_rank + config.qk_rope_head_dim) * kv_dtype_bytes
    state = 0
    if n_kda:
        h, dk = config.linear_num_heads, config.linear_head_dim
        state = n_kda * (h * dk * dk * 4 + 3 * h * dk * (config.short_conv_kernel_size - 1) * kv_dtype_bytes)
    return _costs(config, per_token, state)


def human_bytes(n: float) -> str:
    if n <= 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    k = min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024**k:.1f} {units[k]}" if k else f"{int(n)} B"

"""Export targets: what the upgraded model is, as one small table per target, and its config.

| target          | model_type       | architectures              | mixers                          |
|-----------------|------------------|----------------------------|---------------------------------|
| `hybrid-linear` | `bailing_hybrid` | `BailingMoeV3ForCausalLM`  | KDA + head-wise gated MLA       |
| `all-mla`       | `deepseek_v3`    | `DeepseekV3ForCausalLM`    | MLA on every layer (no q-LoRA)  |

Both are stock transformers architectures (no `trust_remote_code`) with native vLLM, SGLang and llama.cpp
implementations; the serving-engine config rules are in DESIGN.md ("Export target").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.plan import LayerPlan, layout_problems, make_plan


@dataclass(frozen=True)
class TargetSpec:
    name: str
    model_type: str
    architecture: str
    linear_attention: bool  # has KDA layers (and a periodic layer plan)
    gated_mla: bool  # head-wise sigmoid gate before o_proj: sigmoid(0) = 1/2 is compensated at init


TARGETS: dict[str, TargetSpec] = {
    "hybrid-linear": TargetSpec("hybrid-linear", "bailing_hybrid", "BailingMoeV3ForCausalLM", True, True),
    "all-mla": TargetSpec("all-mla", "deepseek_v3", "DeepseekV3ForCausalLM", False, False),
}


def get_target(name: str) -> TargetSpec:
    try:
        return TARGETS[name]
    except KeyError:
        raise SurgeryError(f"target {name!r} is not supported; supported: {', '.join(TARGETS)}") from None


def spec_of(config) -> TargetSpec:
    """The target a (student) config belongs to, by its model_type."""
    for spec in TARGETS.values():
        if spec.model_type == config.model_type:
            return spec
    raise SurgeryError(f"model_type {config.model_type!r} is not an upgrade target ({', '.join(TARGETS)})")


def layer_plan(recipe, num_layers: int) -> LayerPlan:
    """The recipe's layer plan for a source with `num_layers` layers (an unset group size is derived from it)."""
    if not get_target(recipe.target).linear_attention:
        return make_plan(num_layers, 1)
    if recipe.plan.placement == "measured":
        # Provisional: as many MLA layers as measured placement will keep, evenly spread, for costs and validation;
        # `placement.resolve_measured` picks the real ones once the teacher is loaded.
        count = recipe.plan.full_attention_count or 1
        spread = sorted({min(num_layers - 1, (k + 1) * num_layers // count - 1) for k in range(count)})
        return replace(make_plan(num_layers, None, spread, warn_non_periodic=False), measured=True, provisional=True)
    group, layers = recipe.plan.layer_group_size, recipe.plan.full_attention_layers
    if group is None and layers is None:
        from ling_surgery.surgery.defaults import layer_group_size

        group, _ = layer_group_size(num_layers)
    return make_plan(num_layers, group, layers)


def shape_problems(recipe, shape) -> list[str]:
    """Every problem of a recipe (its plan values resolved) against the source (a `sources.SourceShape`)."""
    problems = []
    count = recipe.plan.full_attention_count
    if get_target(recipe.target).linear_attention and recipe.plan.placement == "measured":
        if count is not None and count > shape.num_layers:
            problems.append(f"plan.full_attention_count {count} exceeds the source's {shape.num_layers} layers; pick at "
                            f"most {shape.num_layers}")
    elif get_target(recipe.target).linear_attention:
        problems += layout_problems(shape.num_layers, recipe.plan.layer_group_size, recipe.plan.full_attention_layers)
    moe = getattr(shape, "moe", None)
    if moe is not None and not moe.engine_loadable:
        dense = [i for i, sparse in enumerate(moe.sparse) if not sparse]
        if not get_target(recipe.target).linear_attention:
            problems.append(f"the source's dense MLP layers {dense} are not all leading, and target {recipe.target} "
                            "(deepseek_v3) has dense MLPs only before its first MoE layer; use target hybrid-linear "
                            "with plan.moe_layout: source")
        elif recipe.plan.moe_layout == "engines":
            problems.append(f"the source's dense MLP layers {dense} are not all leading: vLLM and llama.cpp build dense "
                            "MLPs only for the first layers; set plan.moe_layout: source to keep the source's layout "
                            "(the upgraded model then runs in transformers only)")
    dr, rank = recipe.plan.mla.qk_rope_head_dim, recipe.plan.mla.kv_lora_rank
    mla = getattr(shape, "mla", None)
    if mla is not None and (rank, dr) != (mla[0], mla[2]):
        problems.append(f"plan.mla (kv_lora_rank {rank}, qk_rope_head_dim {dr}) differs from the source's own MLA "
                        f"(kv_lora_rank {mla[0]}, qk_rope_head_dim {mla[2]}), which is copied exactly; leave plan.mla unset")
    rotary = getattr(shape, "rotary_dim", 0) or shape.head_dim
    if dr > rotary:
        limit = (f"the source head_dim {rotary}" if rotary == shape.head_dim
                 else f"the source's {rotary} rotated channels per head")
        problems.append(f"plan.mla.qk_rope_head_dim {dr} exceeds {limit}; pick at most {rotary} or leave it unset")
    if rank > shape.hidden_size:
        problems.append(f"plan.mla.kv_lora_rank {rank} exceeds hidden_size {shape.hidden_size}; pick a smaller rank or "
                        "leave it unset")
    if not get_target(recipe.target).linear_attention:
        for stage in recipe.stages:
            if "kda_mixers" in (getattr(stage, "trainable", None) or []):
                problems.append(f"stages.{stage.name}.trainable names kda_mixers, but target {recipe.target} has no KDA "
                                "layers; use mixers (or mla_mixers)")
    return problems


def check_shapes(recipe, shape):
    """Cross-checks of a recipe against the source (a `sources.SourceShape`), every problem at once.

    Returns the layer plan, the recipe with its unset plan values derived from the source, and what was derived.
    """
    from ling_surgery.surgery.defaults import resolve_defaults
    from ling_surgery.surgery.errors import RecipeError

    resolved, derived = resolve_defaults(recipe, shape)
    problems = shape_problems(resolved, shape)
    if problems:
        raise RecipeError(problems)
    return layer_plan(resolved, shape.num_layers), resolved, derived


def target_config(source_config, plan: LayerPlan, recipe):
    """The upgraded model's config; every dim comes from the source.

    Heads = source query heads (GQA keys/values are repeated per head), MLA v_head_dim = the source head dim (and
    so does the KDA head dim: the serving engines need KDA dk == v_head_dim), MLPs as the source's (dense, or MoE
    with its experts, shared experts and router settings: `architectures.target_routing`), RoPE on the dr/2
    highest-frequency pairs under θ' = θ^(dr/d) (θ'^(-2j/dr) = θ^(-2j/d)), embeddings untied.
    """
    from ling_surgery.surgery.architectures import (check_source_config, get_arch, head_dim, rotary_dim, source_moe,
                                                    target_routing)
    from ling_surgery.surgery.init_maps import LATENT_NORM_EPS
    from ling_surgery.surgery.sources import SourceShape

    check_source_config(source_config)
    _, recipe, _ = check_shapes(recipe, SourceShape.from_config(source_config))
    target = get_target(recipe.target)
    d = head_dim(source_config)
    dr = recipe.plan.mla.qk_rope_head_dim
    rope = dict(getattr(source_config, "rope_parameters", None) or {"rope_type": "default"})
    theta = rope.get("rope_theta", getattr(source_config, "rope_theta", 10000.0))
    mla_source = get_arch(source_config.model_type).mla_attention
    # An MLA source's RoPE dims are copied as they are; a GQA source's kept pairs run under θ' = θ^(dr/R), R its rotated
    # channels (all d, or a partial-rotary head's first part), and MLA rotates all its dr RoPE dims.
    rope["rope_theta"] = float(theta) if mla_source else float(theta) ** (dr / rotary_dim(source_config))
    rope.setdefault("rope_type", "default")
    rope.pop("partial_rotary_factor", None)
    eos = source_config.eos_token_id
    pad = getattr(source_config, "pad_token_id", None)
    layers = plan.num_layers
    common = dict(
        vocab_size=source_config.vocab_size,
        hidden_size=source_config.hidden_size,
        intermediate_size=source_config.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=source_config.num_attention_heads,
        num_key_value_heads=source_config.num_attention_heads,
        kv_lora_rank=recipe.plan.mla.kv_lora_rank,
        qk_rope_head_dim=dr,
        qk_nope_head_dim=source_config.qk_nope_head_dim if mla_source else d - dr,
        v_head_dim=d,
        hidden_act=source_config.hidden_act,
        max_position_embeddings=getattr(source_config, "max_position_embeddings", 4096),
        # The MLA latent norm's ε, which transformers fixes at 1e-6 and the engines read from here (init_maps); every
        # other norm sees mean squares ≫ 1e-5, so the source's ε would change nothing (SmolLM2: perplexity ±3e-5).
        # (an MLA source keeps its own ε, so its copied norms compute what they did)
        rms_norm_eps=source_config.rms_norm_eps if mla_source else LATENT_NORM_EPS,
        rope_parameters=rope,
        first_k_dense_replace=layers,  # all MLPs dense
        num_mtp_layers=0,
        tie_word_embeddings=False,
        attention_bias=False,
        pad_token_id=pad if pad is not None else (eos if isinstance(eos, int) else None),
        bos_token_id=getattr(source_config, "bos_token_id", None),
        eos_token_id=eos,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=1,
    )
    moe = source_moe(source_config)
    if moe is not None:
        routing = target_routing(moe)
        common.update(
            num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.expert_width, n_shared_experts=moe.target_shared_experts,
            n_group=routing.n_group, topk_group=routing.topk_group, norm_topk_prob=routing.renormalise,
            routed_scaling_factor=routing.scaling, first_k_dense_replace=moe.leading_dense,
        )
    if target.model_type == "deepseek_v3":
        from transformers import DeepseekV3Config

        experts = dict(n_routed_experts=moe.num_experts) if moe else dict(
            moe_intermediate_size=source_config.intermediate_size, n_routed_experts=1, n_shared_experts=1)
        return DeepseekV3Config(**common, **experts, q_lora_rank=None, rope_interleave=True)
    from transformers import BailingHybridConfig

    mlp_types = ["sparse" if sparse else "dense" for sparse in moe.sparse] if moe else ["dense"] * layers
    return BailingHybridConfig(
        **common, head_dim=d, rope_theta=rope["rope_theta"], layer_types=plan.layer_types,
        layer_group_size=plan.group_size or layers, mlp_layer_types=mlp_types,
        num_local_experts=moe.num_experts if moe else 1,
    )


def serving_config(config_dict: dict, config) -> dict:
    """config.json as the serving engines read it: keys transformers does not write (DESIGN.md, export target)."""
    out = dict(config_dict)
    layers = config.num_hidden_layers
    if config.model_type not in ("deepseek_v3", "bailing_hybrid"):
        return out  # a source family aligned as it is: transformers' config is what the engines read
    if config.model_type == "deepseek_v3":
        out.update({
            "architectures": ["DeepseekV3ForCausalLM"],
            "first_k_dense_replace": config.first_k_dense_replace,
            "q_lora_rank": None,
            "rope_interleave": True,
            "num_nextn_predict_layers": 0,
            "tie_word_embeddings": False,
        })
        return out
    sparse = [i for i, kind in enumerate(config.mlp_layer_types) if kind == "sparse"]
    # The engines build dense MLPs for the first `first_k_dense_replace` layers and MoE for the rest (moe.md §4); the
    # shared expert's width is moe_shared_expert_intermediate_size × num_shared_experts in vLLM and
    # moe_intermediate_size × n_shared_experts in transformers: one expert width makes both agree.
    expert_width = config.moe_intermediate_size if sparse else config.intermediate_size
    out.update({
        "architectures": ["BailingMoeV3ForCausalLM"],
        # transformers writes the RoPE dim here; the engines (and transformers' own reload) read the KDA dim.
        "head_dim": config.linear_head_dim,
        "first_k_dense_replace": sparse[0] if sparse else layers,
        "no_kda_lora": True,
        "kda_safe_gate": True,
        "gated_attention_proj_granularity_type": "head_wise",
        "rope_interleave": True,
        "num_nextn_predict_layers": 0,
        "tie_word_embeddings": False,
        "use_bias": False,
        "use_qkv_bias": False,
        "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_shared_expert_intermediate_size": expert_width,
        "num_shared_experts": config.n_shared_experts if sparse else 0,
        "moe_intermediate_size": expert_width,
        "norm_topk_prob": config.norm_topk_prob,
        "moe_renormalize": config.norm_topk_prob,
        "n_group": config.n_group,
        "num_expert_group": config.n_group,
        "num_experts_per_tok": config.num_experts_per_tok,
        "num_experts_per_token": config.num_experts_per_tok,
        "topk_group": config.topk_group,
        "routed_scaling_factor": config.routed_scaling_factor,
        "max_position_embeddings": config.max_position_embeddings,
        "model_max_length": config.max_position_embeddings,
    })
    if config.rope_parameters:
        out["rope_theta"] = config.rope_parameters.get("rope_theta", out.get("rope_theta"))
    return out


def serving_tensor_names(config) -> dict[str, str]:
    """Checkpoint names the serving engines read where transformers' save writes others: tensor → official name.

    transformers' bailing_hybrid conversion saves every layer's output projection as `attention.dense`; the official
    Ling 3.0 layout (what vLLM's BailingMoeV3 builds, and llama.cpp's converter maps) names the KDA layers' one
    `attention.o_proj` and only the MLA layers' `attention.dense`. vLLM loads by name and would leave the KDA output
    projections uninitialised; transformers loads both spellings (its `.attention.` → `.self_attn.` rename).
    """
    if config.model_type != "bailing_hybrid":
        return {}
    return {f"model.layers.{i}.attention.dense.weight": f"model.layers.{i}.attention.o_proj.weight"
            for i, kind in enumerate(config.layer_types) if kind == "linear_attention"}

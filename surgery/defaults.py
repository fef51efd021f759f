"""Plan defaults derived from the source model: every number a recipe leaves unset, with the reason it was chosen.

A recipe that does not set a key below gets it computed from the source's config; an explicit value (in the recipe
or by `--set`) always wins and is checked as given. `plan` and `convert --dry-run` print each derived value and
what it was derived from.

| key                        | rule                                                        | from                  |
|----------------------------|-------------------------------------------------------------|-----------------------|
| `plan.layer_group_size`    | the divisor g of L closest (in ratio) to 6–8, ties to fewer | `num_hidden_layers` L |
| `plan.full_attention_count` | (placement: measured) L / that g                            | `num_hidden_layers` L |
| `plan.mla.qk_rope_head_dim`| d/2, at most 64, even; llama3 RoPE: at most its unscaled dims | `head_dim` d, `rope_parameters` |
| `plan.mla.kv_lora_rank`    | G·d/2, at most 512 and D, a multiple of 32 once ≥ 32        | KV heads G, d, hidden D |
| `plan.mla.*` of an MLA source | the source's own (DeepSeek attention is copied)          | `kv_lora_rank`, `qk_rope_head_dim` |
| `stages.<logit_distill>.trainable` | hybrids: [kda_mixers, mlp, norms]; all-MLA: [mixers, mlp, norms] | `target` |

Why these numbers (research/anchors-methods.md):
- Layer group: Ling 3.0 keeps one full-attention (MLA) layer in 6 (KDA : MLA = 5 : 1), Ling 2.5 one in 8 (7 : 1).
  vLLM and llama.cpp serve only periodic layouts, so g must divide L. Inside 6–8, 6 wins: the MLA layers are the only
  ones that retrieve from the context, and recall is what hybrids lose first.
- RoPE width: half of each head keeps RoPE (Ling 2.5's partial-RoPE factor 0.5; X-EcoMLA keeps 32 of 64), at most 64
  (DeepSeek-V3, TransMLA, Zebra-Llama: 64 RoPE dims on 128-wide heads). Under llama3 scaling, at most the dims whose
  frequency it leaves unscaled (Llama-3.1-8B: 58, Llama-3.2-1B: 30): llama.cpp's bailingmoe3 has no per-frequency
  factors, so only those run there as in transformers (`gguf_export.rope_frequencies`).
- Latent rank: half the teacher's value width per layer, so an MLA layer caches (r + dr) ≈ 1/4–3/8 of the teacher's
  K+V (TransMLA's 512 + 64 on Llama-3-8B's 2 × 1024), at most 512 (DeepSeek-V3 / Ling 2.5 / TransMLA, FlashMLA's
  size). A multiple of 32 so every llama.cpp quantisation block fits the latent rows.
- Logit distillation leaves a hybrid's MLA layers frozen: they are the only layers that retrieve, attention transfer
  (on windows with copied spans) teaches them the teacher's copying, and end-to-end KL on them erased it — the CPU
  demo's model found 0% of pass keys with MLA trainable in LD and 6/6, 4/6, 3/6 at 512/2k/4k without. An all-MLA
  model has nothing else to recover with, so all its mixers train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LING_GROUP_SIZES = (6, 8)  # Ling 3.0 (5:1) … Ling 2.5 (7:1): one full-attention layer per group
MAX_ROPE_DIM = 64
MAX_KV_LORA_RANK = 512
RANK_MULTIPLE = 32  # the llama.cpp quantisation block (q8_0, q4_0)


@dataclass(frozen=True)
class Derived:
    """One plan value the recipe left unset: its key path, the value and where it came from."""

    key: str
    value: object
    reason: str


def layer_group_size(num_layers: int) -> tuple[int, str]:
    """The divisor of `num_layers` closest to Ling's 1 full-attention layer in 6–8 (ties: the smaller group)."""
    divisors = [g for g in range(2, num_layers + 1) if num_layers % g == 0] or [1]
    lo, hi = LING_GROUP_SIZES

    def distance(g: int) -> float:  # how far the ratio is from [6, 8], in log space
        return max(0.0, math.log(lo / g), math.log(g / hi))

    group = min(divisors, key=lambda g: (distance(g), g))
    in_range = [g for g in divisors if lo <= g <= hi]
    why = (f"1 MLA layer in {group} ({group - 1} KDA : 1 MLA); Ling 3.0 keeps 1 in 6, Ling 2.5 1 in 8"
           if in_range else f"no divisor in {lo}–{hi}, {group} is the closest (divisors: {divisors})")
    return group, f"derived from num_hidden_layers={num_layers}: {why}"


def rope_head_dim(head_dim: int) -> tuple[int, str]:
    """Half of each head keeps RoPE, at most 64 dims, even (pairs)."""
    dr = max(2, min(MAX_ROPE_DIM, head_dim // 2) // 2 * 2)
    return dr, f"derived from head_dim={head_dim}: half the head keeps RoPE, at most {MAX_ROPE_DIM} (partial RoPE as in Ling 2.5 / DeepSeek-V3)"


def kv_lora_rank(num_kv_heads: int, head_dim: int, hidden_size: int) -> tuple[int, str]:
    """Half the teacher's value width G·d, at most 512 and hidden_size, a multiple of 32 once it reaches 32."""
    width = num_kv_heads * head_dim
    rank = max(1, min(width // 2, MAX_KV_LORA_RANK, hidden_size))
    if rank >= RANK_MULTIPLE:
        rank -= rank % RANK_MULTIPLE
    return rank, (f"derived from num_key_value_heads={num_kv_heads} × head_dim={head_dim}: half the teacher's value "
                  f"width {width}, at most {MAX_KV_LORA_RANK} (TransMLA / DeepSeek-V3 sizing)")


def logit_distill_trainable(linear_attention: bool) -> tuple[list[str], str]:
    """What logit distillation trains when the recipe does not say: a hybrid's MLA layers stay as attention transfer
    left them (they hold the copying), an all-MLA model trains every mixer."""
    if linear_attention:
        return ["kda_mixers", "mlp", "norms"], ("hybrid target: the MLA layers keep the copying attention transfer "
                                                "taught them (trained here, the CPU demo's recall fell to 0%)")
    return ["mixers", "mlp", "norms"], "all-MLA target: every mixer is MLA and recovers here"


def sft_trainable(model_type: str) -> tuple[list[str], str]:
    """What SFT trains when the recipe does not say. Upgraded models keep their MLA mixers: their latent rows sit in
    the RMSNorm's linear regime at ~1e-5 of the map they carry, where AdamW's ~lr-sized steps wreck them (full SFT at
    lr 1e-4 took the CPU demo's model to a loss of 20 nats/token), and they hold the model's retrieval."""
    if model_type == "bailing_hybrid":
        return ["kda_mixers", "mlp", "norms"], "upgraded hybrid: the MLA layers keep their copying and latent scale"
    if model_type == "deepseek_v3":
        return ["mlp", "norms"], "all-MLA upgrade: the MLA latents stay as distillation left them"
    return ["all"], "a source-family model: every weight"


def resolve_defaults(recipe, shape):
    """The recipe with every unset plan value derived from the source (a `sources.SourceShape`), and what was derived.

    Idempotent: values already set (explicitly, or by an earlier call) are kept and not reported.
    """
    from ling_surgery.surgery.targets import get_target

    derived: list[Derived] = []
    plan = recipe.plan.model_dump()
    linear = get_target(recipe.target).linear_attention
    if linear and plan["placement"] == "measured":
        if plan["full_attention_count"] is None:
            group, reason = layer_group_size(shape.num_layers)
            plan["full_attention_count"] = shape.num_layers // group
            derived.append(Derived("plan.full_attention_count", shape.num_layers // group,
                                   f"as many as the derived periodic layout (1 in {group}): {reason}"))
    elif linear and plan["layer_group_size"] is None and plan["full_attention_layers"] is None:
        value, reason = layer_group_size(shape.num_layers)
        plan["layer_group_size"] = value
        derived.append(Derived("plan.layer_group_size", value, reason))
    if shape.mla is not None:  # DeepSeek attention stays the MLA it is: its own latent and RoPE widths
        rank, _, rope, _ = shape.mla
        for key, value in (("qk_rope_head_dim", rope), ("kv_lora_rank", rank)):
            if plan["mla"][key] is None:
                plan["mla"][key] = value
                derived.append(Derived(f"plan.mla.{key}", value, f"the source's own MLA ({shape.model_type}): its MLA "
                                       "layers are copied exactly"))
    if plan["mla"]["qk_rope_head_dim"] is None:
        value, reason = rope_head_dim(shape.head_dim)
        if shape.rotary_dim and shape.rotary_dim < value:  # partial rotary: only the rotated channels carry position
            value, reason = shape.rotary_dim, (f"derived from the source's partial rotary: RoPE on {shape.rotary_dim} "
                                               f"of {shape.head_dim} channels per head, all kept")
        if 2 <= shape.unscaled_rope_dims < value:  # llama3 scaling: keep only frequencies llama.cpp can reproduce
            value, reason = shape.unscaled_rope_dims, (
                f"{reason}; capped at the {shape.unscaled_rope_dims} RoPE dims the source's llama3 scaling leaves "
                "unscaled, so llama.cpp (whose bailingmoe3 reads no per-frequency factors) runs the upgrade exactly")
        plan["mla"]["qk_rope_head_dim"] = value
        derived.append(Derived("plan.mla.qk_rope_head_dim", value, reason))
    if plan["mla"]["kv_lora_rank"] is None:
        value, reason = kv_lora_rank(shape.num_kv_heads, shape.head_dim, shape.hidden_size)
        plan["mla"]["kv_lora_rank"] = value
        derived.append(Derived("plan.mla.kv_lora_rank", value, reason))
    stages = list(recipe.stages)
    for i, stage in enumerate(stages):
        if stage.kind == "logit_distill" and stage.trainable is None:
            groups, reason = logit_distill_trainable(linear)
            stages[i] = stage.model_copy(update={"trainable": groups})
            derived.append(Derived(f"stages.{stage.name}.trainable", "[" + ", ".join(groups) + "]", reason))
    if not derived:
        return recipe, derived
    return recipe.model_copy(update={"plan": type(recipe.plan).model_validate(plan), "stages": stages}), derived

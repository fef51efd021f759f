"""GGUF export for llama.cpp (and Ollama, llama-cpp-python): upgraded models as `bailingmoe3`, teachers under their
own family's architecture, so both run in the same engine.

Written with the `gguf` package's writer from the documented format (llama.cpp's own converter needs transformers
4.x and is not installed with any package). The layout follows llama.cpp's loader (`src/models/bailingmoe3.cpp`,
`src/models/{llama,qwen2,qwen3}.cpp`, `src/llama-vocab.cpp` at the commit vendored in llama-cpp-python 0.3.36):

| target | source `model_type` | notes |
|---|---|---|
| `bailingmoe3` | `bailing_hybrid` | KDA conv split q/k/v, `ssm_a = exp(A_log)`, MLA `kv_b_proj` split into absorbed `attn_k_b`/`attn_v_b`; MoE layers as stacked experts, router, selection bias and shared expert (an all-dense file carries no expert count) |
| `llama` | `llama`, `mistral` | q/k rows permuted from rotate-half to adjacent pairs; tied embeddings written once; llama3 RoPE as `rope_freqs` |
| `qwen2` | `qwen2` | q/k/v biases; rotate-half RoPE as is (llama.cpp's NEOX type) |
| `qwen3` | `qwen3` | per-head q/k RMSNorms; rotate-half RoPE as is |
| `llama` | `mixtral` | as `mistral`, experts stacked (transformers fuses gate and up) |
| `qwen3moe` / `qwen2moe` | `qwen3_moe` / `qwen2_moe` | as `qwen3` / `qwen2`, experts stacked; Qwen2-MoE's token-gated shared expert |
| `olmoe` | `olmoe` | q/k RMSNorms over all heads, experts stacked, unnormalised softmax routing |
| `dots1` / `glm4moe` | `dots1` / `glm4_moe` | sigmoid router with its selection bias, shared experts, dense prefix, groups and scaling as keys; GLM-4.5: partial RoPE, q/k/v biases, optional q/k norms |

RoPE is read off the model's own rotary module: a uniform frequency scale becomes linear `rope.scaling.*` keys, and
per-pair factors (llama3) a `rope_freqs` tensor where the graph reads one. The tokenizer is written so llama.cpp
tokenises identically (`tokenizer_keys`) or refused in one line.

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
GGUF_ARCH = {"bailing_hybrid": "bailingmoe3", "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "olmoe": "olmoe", "dots1": "dots1",
             "glm4_moe": "glm4moe", "deepseek_v3": "deepseek2"}
EXPERT_GATING_SIGMOID = 2  # llama.cpp LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID


@dataclass(frozen=True)
class Key:
    name: str  # without the "<arch>." prefix when `arch_scoped`
    kind: str  # uint32 | float32 | bool | string | int_array | string_array | float32_array
    value: object
    arch_scoped: bool = True


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def bailingmoe3_tensors(state: dict[str, torch.Tensor], config) -> dict[str, np.ndarray]:
    """GGUF tensors of a `bailing_hybrid` model (names relative to the in-memory state dict; MoE layers: `_bailing_moe_tensors`).

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
    sparse = {i for i, t in enumerate(getattr(config, "mlp_layer_types", None) or []) if t == "sparse"}
    for i, kind in enumerate(config.layer_types):
        src, dst = f"model.layers.{i}", f"blk.{i}"
        out[f"{dst}.attn_norm.weight"] = take(f"{src}.input_layernorm.weight")
        out[f"{dst}.ffn_norm.weight"] = take(f"{src}.post_attention_layernorm.weight")
        if i in sparse:
            out.update(_sigmoid_moe_tensors(take, f"{src}.mlp", dst, config.moe_intermediate_size))
        else:
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
            out.update(_mla_tensors(take, a, dst, config, interleaved=True))
            out[f"{dst}.attn_gate.weight"] = take(f"{a}.g_proj.weight")
        out[f"{dst}.attn_output.weight"] = take(f"{a}.o_proj.weight")
    ledger.check_all_consumed()
    return out


def _mla_tensors(take, a: str, dst: str, config, interleaved: bool) -> dict[str, np.ndarray]:
    """An MLA attention's q, latent down-projection and norm, and `kv_b_proj` split into the absorbed `attn_k_b`
    (H, r, dn) and `attn_v_b` (H, dv, r). llama.cpp rotates adjacent pairs; a rotate-half source (DeepSeek with
    rope_interleave false) has its RoPE rows permuted: the last dr of each head's q rows and of the latent rows."""
    heads, r = config.num_attention_heads, config.kv_lora_rank
    dn, dr, dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    out = {}
    if getattr(config, "q_lora_rank", None):  # DeepSeek-V3/R1, Kimi-K2: q = q_b(RMSNorm(q_a x))
        out[f"{dst}.attn_q_a.weight"] = take(f"{a}.q_a_proj.weight")
        out[f"{dst}.attn_q_a_norm.weight"] = take(f"{a}.q_a_layernorm.weight")
        q_name, q = f"{dst}.attn_q_b.weight", take(f"{a}.q_b_proj.weight")
    else:
        q_name, q = f"{dst}.attn_q.weight", take(f"{a}.q_proj.weight")
    kv_a = take(f"{a}.kv_a_proj_with_mqa.weight")
    if not interleaved:
        q = q.reshape(heads, dn + dr, -1).copy()
        q[:, dn:] = np.stack([rotate_half_to_adjacent(h, 1) for h in q[:, dn:]])
        q = q.reshape(heads * (dn + dr), -1)
        kv_a = np.concatenate([kv_a[:r], rotate_half_to_adjacent(kv_a[r:], 1)])
    kv_b = take(f"{a}.kv_b_proj.weight").reshape(heads, dn + dv, r)  # per head [k_nope; v] rows
    return out | {
        q_name: q,
        f"{dst}.attn_kv_a_mqa.weight": kv_a,
        f"{dst}.attn_kv_a_norm.weight": take(f"{a}.kv_a_layernorm.weight"),
        f"{dst}.attn_k_b.weight": np.ascontiguousarray(kv_b[:, :dn, :].transpose(0, 2, 1)),
        f"{dst}.attn_v_b.weight": np.ascontiguousarray(kv_b[:, dn:, :]),
    }


def deepseek2_tensors(state: dict[str, torch.Tensor], config) -> dict[str, np.ndarray]:
    """GGUF tensors of a `deepseek_v3` model (DeepSeek-V3/R1 and Kimi-K2 with query LoRA, V2-Lite / Moonlight style
    sources and the all-MLA upgrade without): MLA as in `_mla_tensors`, dense MLPs before `first_k_dense_replace`,
    sigmoid MoE after."""
    ledger = Ledger(state)
    take = lambda name: _np(ledger.take(name))  # noqa: E731
    out = {"token_embd.weight": take("model.embed_tokens.weight"), "output_norm.weight": take("model.norm.weight")}
    head = ledger.take_optional("lm_head.weight")
    out["output.weight"] = _np(head) if head is not None else out["token_embd.weight"]
    moe = _deepseek_moe(config)
    for i in range(config.num_hidden_layers):
        src, dst, a = f"model.layers.{i}", f"blk.{i}", f"model.layers.{i}.self_attn"
        out[f"{dst}.attn_norm.weight"] = take(f"{src}.input_layernorm.weight")
        out[f"{dst}.ffn_norm.weight"] = take(f"{src}.post_attention_layernorm.weight")
        out.update(_mla_tensors(take, a, dst, config, interleaved=getattr(config, "rope_interleave", True)))
        out[f"{dst}.attn_output.weight"] = take(f"{a}.o_proj.weight")
        if moe is not None and moe.sparse[i]:
            out.update(_sigmoid_moe_tensors(take, f"{src}.mlp", dst, moe.expert_width))
        else:
            for proj, name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                out[f"{dst}.{name}.weight"] = take(f"{src}.mlp.{proj}.weight")
    ledger.check_all_consumed()
    return out


def _deepseek_moe(config):
    from ling_surgery.surgery.architectures import source_moe

    moe = source_moe(config)
    if moe is not None and not moe.engine_loadable:
        raise SurgeryError("GGUF export: llama.cpp's deepseek2 builds dense MLPs only before the first MoE layer, and "
                           "this model has dense MLP layers after it")
    return moe


def deepseek2_keys(config) -> list[Key]:
    r, dr = config.kv_lora_rank, config.qk_rope_head_dim
    keys = [
        Key("block_count", "uint32", config.num_hidden_layers),
        Key("context_length", "uint32", config.max_position_embeddings),
        Key("embedding_length", "uint32", config.hidden_size),
        Key("feed_forward_length", "uint32", config.intermediate_size),
        Key("attention.head_count", "uint32", config.num_attention_heads),
        Key("attention.head_count_kv", "uint32", 1),  # one latent "head" in the cache
        Key("attention.layer_norm_rms_epsilon", "float32", float(config.rms_norm_eps)),
        Key("attention.key_length", "uint32", r + dr),  # the cached latent + RoPE key
        Key("attention.value_length", "uint32", r),
        Key("attention.key_length_mla", "uint32", config.qk_nope_head_dim + dr),
        Key("attention.value_length_mla", "uint32", config.v_head_dim),
        Key("attention.q_lora_rank", "uint32", getattr(config, "q_lora_rank", None) or 0),  # 0: a plain q_proj
        Key("attention.kv_lora_rank", "uint32", r),
        Key("rope.dimension_count", "uint32", dr),
        Key("vocab_size", "uint32", config.vocab_size),
    ]
    moe = _deepseek_moe(config)
    if moe is None:  # the loader reads these unconditionally
        return keys + [Key("expert_feed_forward_length", "uint32", config.intermediate_size),
                       Key("expert_shared_count", "uint32", 0),
                       Key("leading_dense_block_count", "uint32", config.num_hidden_layers)]
    return keys + [Key("expert_count", "uint32", moe.num_experts), Key("expert_used_count", "uint32", moe.top_k),
                   Key("expert_feed_forward_length", "uint32", moe.expert_width)] + \
        _sigmoid_router_keys(moe.shared_width // moe.expert_width, moe.leading_dense, moe.scaling, moe.renormalise,
                             moe.n_group, moe.topk_group)


def _sigmoid_moe_tensors(take, src: str, dst: str, width: int) -> dict[str, np.ndarray]:
    """One DeepSeek-V3-style MoE layer (bailing_hybrid, dots1, GLM-4.5): the router, its selection-only bias, the
    stacked experts and the shared expert(s).

    | GGUF                      | transformers                        | transform                               |
    |---------------------------|-------------------------------------|-----------------------------------------|
    | ffn_gate_inp              | mlp.gate.weight (E, H)              | –                                       |
    | exp_probs_b.bias          | mlp.gate.e_score_correction_bias    | – (added for the choice only, both)     |
    | ffn_gate_exps / up_exps   | mlp.experts.gate_up_proj (E, 2I, H) | [:, :I] / [:, I:] → (E, I, H)           |
    | ffn_down_exps             | mlp.experts.down_proj (E, H, I)     | –                                       |
    | ffn_{gate,up,down}_shexp  | mlp.shared_experts.*_proj           | –                                       |
    """
    gate_up = take(f"{src}.experts.gate_up_proj")
    out = {
        f"{dst}.ffn_gate_inp.weight": take(f"{src}.gate.weight"),
        f"{dst}.exp_probs_b.bias": take(f"{src}.gate.e_score_correction_bias"),
        f"{dst}.ffn_gate_exps.weight": np.ascontiguousarray(gate_up[:, :width]),
        f"{dst}.ffn_up_exps.weight": np.ascontiguousarray(gate_up[:, width:]),
        f"{dst}.ffn_down_exps.weight": take(f"{src}.experts.down_proj"),
    }
    for proj, name in (("gate_proj", "ffn_gate_shexp"), ("up_proj", "ffn_up_shexp"), ("down_proj", "ffn_down_shexp")):
        out[f"{dst}.{name}.weight"] = take(f"{src}.shared_experts.{proj}.weight")
    return out


def _check_bailing(config) -> None:
    """What llama.cpp's bailingmoe3 can represent: dense MLPs only before the first MoE layer, head-wise MLA gates, no
    q-LoRA, no MTP."""
    problems = []
    sparse = [t == "sparse" for t in getattr(config, "mlp_layer_types", None) or []]
    if any(sparse) and not all(sparse[sparse.index(True):]):
        problems.append("dense MLP layers after its first MoE layer (llama.cpp builds dense MLPs only for the leading "
                        "layers)")
    if getattr(config, "q_lora_rank", None):
        problems.append("q_lora_rank")
    if getattr(config, "num_mtp_layers", 0):
        problems.append("MTP layers")
    if not getattr(config, "kda_safe_gate", True) or getattr(config, "kda_lower_bound", -5.0) >= 0:
        problems.append("an unbounded KDA gate (kda_safe_gate with a negative kda_lower_bound is required)")
    if problems:
        raise SurgeryError(f"GGUF export of this bailing_hybrid model is not supported: it has {problems[0]}")


def bailingmoe3_keys(config) -> list[Key]:
    layers = config.num_hidden_layers
    return [
        Key("block_count", "uint32", layers),
        Key("context_length", "uint32", config.max_position_embeddings),
        Key("embedding_length", "uint32", config.hidden_size),
        Key("feed_forward_length", "uint32", config.intermediate_size),
        Key("attention.head_count", "uint32", config.num_attention_heads),
        # 1 marks an MLA layer (latent cache), 0 a KDA layer (recurrent state): llama.cpp reads the layout from here.
        Key("attention.head_count_kv", "int_array", [1 if t == "full_attention" else 0 for t in config.layer_types]),
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
    ] + _bailing_moe_keys(config)


def _bailing_moe_keys(config) -> list[Key]:
    """The router's keys. An all-dense model still needs the expert width, shared count, dense-prefix length and gating
    function (the loader reads them unconditionally) but must carry no expert count."""
    layers = config.num_hidden_layers
    sparse = [t == "sparse" for t in getattr(config, "mlp_layer_types", None) or []]
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    if not any(sparse):
        return [Key("expert_feed_forward_length", "uint32", width), Key("expert_shared_count", "uint32", 0),
                Key("leading_dense_block_count", "uint32", layers),
                Key("expert_gating_func", "uint32", EXPERT_GATING_SIGMOID)]
    return [Key("expert_count", "uint32", config.num_experts),
            Key("expert_used_count", "uint32", config.num_experts_per_tok),
            Key("expert_feed_forward_length", "uint32", width),
            # transformers' shared expert is one MLP of width × count; llama.cpp reads the total here
            Key("expert_shared_feed_forward_length", "uint32", width * config.num_shared_experts)] + \
        _sigmoid_router_keys(config.num_shared_experts, sparse.index(True), config.routed_scaling_factor,
                             config.norm_topk_prob, config.n_group, config.topk_group)


def _sigmoid_router_keys(shared: int, dense_lead: int, scale: float, renormalise: bool, groups: int,
                         groups_used: int) -> list[Key]:
    """The keys of a DeepSeek-V3-style router, which its graphs read instead of fixing them."""
    keys = [
        Key("expert_shared_count", "uint32", shared),
        Key("leading_dense_block_count", "uint32", dense_lead),
        Key("expert_weights_scale", "float32", float(scale)),
        Key("expert_weights_norm", "bool", bool(renormalise)),
        Key("expert_gating_func", "uint32", EXPERT_GATING_SIGMOID),
    ]
    # Group-limited choice (groups ranked by their top-2 biased scores); llama.cpp asserts fewer groups used than
    # exist, and using them all is no limit.
    if groups > 1 and groups_used < groups:
        keys += [Key("expert_group_count", "uint32", groups), Key("expert_group_used_count", "uint32", groups_used)]
    return keys


@dataclass(frozen=True)
class TeacherLayout:
    """How one source family is laid out in llama.cpp (`src/models/<arch>.cpp`)."""

    arch: str
    # llama.cpp's LLAMA rope type rotates adjacent channels (2j, 2j+1); the NEOX type (qwen2, qwen3, …) rotates halves
    # (j, j + d/2) as transformers does, so only the former needs the q/k rows permuted.
    adjacent_rope: bool
    qk_norm: bool = False  # RMSNorm on q and k before RoPE (Qwen3, per head; OLMoE over all heads): written when present
    # llama.cpp's llama graph multiplies its RoPE frequencies by a `rope_freqs` tensor (llama3 scaling); the other
    # graphs pass none, so there only a uniform (linear) frequency scale can be written
    frequency_factors: bool = False
    # MoE graphs with a softmax router: every layer MoE, the top-k renormalisation fixed in the graph. Sigmoid-router
    # graphs (`sigmoid_router`) read renormalisation, scaling, groups and the dense prefix from keys instead.
    moe_renormalised: bool | None = None
    sigmoid_router: bool = False  # DeepSeek-V3-style: σ scores, a selection-only bias, shared experts, dense prefix
    gated_shared_expert: bool = False  # Qwen2-MoE: shared expert × σ(g·x), always present
    output_required: bool = False  # the graph has no tied-embedding fallback
    ffn_norm: str = "ffn_norm"  # GLM-4.5's graph calls the pre-MLP norm `post_attention_norm`
    multi_head_only: bool = False  # the graph sizes k/v (and OLMoE's k norm) for as many heads as queries


TEACHER_LAYOUTS = {
    "llama": TeacherLayout("llama", adjacent_rope=True, frequency_factors=True),
    "mistral": TeacherLayout("llama", adjacent_rope=True, frequency_factors=True),
    "qwen2": TeacherLayout("qwen2", adjacent_rope=False),
    "qwen3": TeacherLayout("qwen3", adjacent_rope=False, qk_norm=True),
    "mixtral": TeacherLayout("llama", adjacent_rope=True, frequency_factors=True, moe_renormalised=True),
    "qwen3_moe": TeacherLayout("qwen3moe", adjacent_rope=False, qk_norm=True, moe_renormalised=True),
    "qwen2_moe": TeacherLayout("qwen2moe", adjacent_rope=False, moe_renormalised=False, gated_shared_expert=True,
                               output_required=True),
    "olmoe": TeacherLayout("olmoe", adjacent_rope=False, qk_norm=True, moe_renormalised=False, output_required=True,
                           multi_head_only=True),
    "dots1": TeacherLayout("dots1", adjacent_rope=False, qk_norm=True, sigmoid_router=True, output_required=True,
                           multi_head_only=True),
    "glm4_moe": TeacherLayout("glm4moe", adjacent_rope=False, qk_norm=True, sigmoid_router=True,
                              ffn_norm="post_attention_norm"),
}


def teacher_tensors(state: dict[str, torch.Tensor], config) -> dict[str, np.ndarray]:
    """GGUF tensors of a source family under its own llama.cpp graph (`TEACHER_LAYOUTS`), biases included where present.

    | GGUF                          | transformers                       | transform                                   |
    |-------------------------------|------------------------------------|---------------------------------------------|
    | token_embd / output_norm      | model.embed_tokens / model.norm    | –                                           |
    | output                        | lm_head (untied only)              | a tied head is token_embd, written once     |
    | blk.i.attn_q/k (+ .bias)      | self_attn.q_proj / k_proj          | rotate-half → adjacent pairs (LLAMA rope)   |
    | blk.i.attn_v/output (+ .bias) | self_attn.v_proj / o_proj          | –                                           |
    | blk.i.attn_q_norm / k_norm    | self_attn.q_norm / k_norm (Qwen3)  | –                                           |
    | blk.i.ffn_gate/up/down        | mlp.gate_proj / up_proj / down_proj| – (dense layers)                            |
    | blk.i.ffn_*_exps, ffn_gate_inp| mlp.experts, mlp.gate (MoE layers) | `_teacher_moe_tensors`, `_sigmoid_moe_tensors`|
    """
    layout = TEACHER_LAYOUTS[config.model_type]
    moe = _check_teacher_moe(config, layout)
    if layout.multi_head_only and config.num_key_value_heads != config.num_attention_heads:
        raise SurgeryError(f"GGUF export: llama.cpp's {layout.arch} sizes keys and values for one head per query head "
                           f"(as its family's own checkpoints are), and this model has {config.num_key_value_heads} "
                           f"key/value heads for {config.num_attention_heads} query heads")
    if getattr(config, "mlp_bias", False):
        raise SurgeryError("GGUF export of Llama-family models with MLP biases is not supported (llama.cpp's graphs "
                           "for these families have none)")
    ledger = Ledger(state)
    take = lambda name: _np(ledger.take(name))  # noqa: E731
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    permute = rotate_half_to_adjacent if layout.adjacent_rope else (lambda w, _: w)
    out = {"token_embd.weight": take("model.embed_tokens.weight"), "output_norm.weight": take("model.norm.weight")}
    head = ledger.take_optional("lm_head.weight")
    if head is not None and (layout.output_required or not getattr(config, "tie_word_embeddings", False)):
        out["output.weight"] = _np(head)  # a tied head is the embedding: llama.cpp reuses token_embd
    elif layout.output_required:
        out["output.weight"] = out["token_embd.weight"]
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}", f"blk.{i}"
        a = f"{src}.self_attn"
        out[f"{dst}.attn_norm.weight"] = take(f"{src}.input_layernorm.weight")
        out[f"{dst}.{layout.ffn_norm}.weight"] = take(f"{src}.post_attention_layernorm.weight")
        for proj, name, count in (("q", "attn_q", heads), ("k", "attn_k", kv_heads), ("v", "attn_v", None),
                                  ("o", "attn_output", None)):
            for part in ("weight", "bias"):
                name_in = f"{a}.{proj}_proj.{part}"
                tensor = ledger.take(name_in) if part == "weight" else ledger.take_optional(name_in)
                if tensor is not None:
                    out[f"{dst}.{name}.{part}"] = permute(_np(tensor), count) if count else _np(tensor)
        for norm in ("q_norm", "k_norm") if layout.qk_norm else ():
            tensor = ledger.take_optional(f"{a}.{norm}.weight")  # GLM-4.5 has them only with use_qk_norm
            if tensor is not None:
                out[f"{dst}.attn_{norm}.weight"] = _np(tensor)
        if moe is not None and moe.sparse[i] and layout.sigmoid_router:
            out.update(_sigmoid_moe_tensors(take, f"{src}.mlp", dst, moe.expert_width))
            continue
        if moe is not None and moe.sparse[i]:
            out.update(_teacher_moe_tensors(take, f"{src}.mlp", dst, moe.expert_width, layout.gated_shared_expert))
            continue
        for proj, name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            out[f"{dst}.{name}.weight"] = take(f"{src}.mlp.{proj}.weight")
    ledger.check_all_consumed()
    return out


def _check_teacher_moe(config, layout: TeacherLayout):
    """The source's MoE shape where its llama.cpp graph can run it as transformers does (None for dense sources)."""
    from ling_surgery.surgery.architectures import source_moe

    moe = source_moe(config)
    if moe is None:
        return None
    arch = layout.arch
    if layout.sigmoid_router:
        if not moe.engine_loadable:
            raise SurgeryError(f"GGUF export: llama.cpp's {arch} builds dense MLPs only before the first MoE layer, and "
                               f"this {config.model_type} model has dense MLP layers after it")
        return moe
    if not all(moe.sparse):
        raise SurgeryError(f"GGUF export: llama.cpp's {arch} makes every layer MoE, and this {config.model_type} model "
                           "has dense MLP layers (mlp_only_layers / decoder_sparse_step)")
    if moe.renormalise != layout.moe_renormalised:
        raise SurgeryError(f"GGUF export: llama.cpp's {arch} {'always' if layout.moe_renormalised else 'never'} "
                           f"renormalises the top-k routing weights, and this model has norm_topk_prob "
                           f"{moe.renormalise}; it would route differently there")
    if layout.gated_shared_expert and not moe.shared_width:
        raise SurgeryError(f"GGUF export: llama.cpp's {arch} needs a shared expert, and this model has none")
    return moe


def _teacher_moe_tensors(take, src: str, dst: str, width: int, gated_shared: bool) -> dict[str, np.ndarray]:
    """One softmax-routed MoE layer (Mixtral, Qwen2/Qwen3-MoE): router, stacked experts (transformers keeps gate and up
    fused as (E, 2I, H)), and Qwen2-MoE's token-gated shared expert."""
    gate_up = take(f"{src}.experts.gate_up_proj")
    out = {
        f"{dst}.ffn_gate_inp.weight": take(f"{src}.gate.weight"),
        f"{dst}.ffn_gate_exps.weight": np.ascontiguousarray(gate_up[:, :width]),
        f"{dst}.ffn_up_exps.weight": np.ascontiguousarray(gate_up[:, width:]),
        f"{dst}.ffn_down_exps.weight": take(f"{src}.experts.down_proj"),
    }
    if gated_shared:
        out[f"{dst}.ffn_gate_inp_shexp.weight"] = take(f"{src}.shared_expert_gate.weight").reshape(-1)
        for proj, name in (("gate_proj", "ffn_gate_shexp"), ("up_proj", "ffn_up_shexp"), ("down_proj", "ffn_down_shexp")):
            out[f"{dst}.{name}.weight"] = take(f"{src}.shared_expert.{proj}.weight")
    return out


def rotate_half_to_adjacent(weight: np.ndarray, heads: int) -> np.ndarray:
    """Per head, row h·d + 2j + t ← row h·d + t·d/2 + j: HF RoPE pairs (j, j + d/2), llama.cpp pairs (2j, 2j + 1)."""
    d = weight.shape[0] // heads
    return weight.reshape(heads, 2, d // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def teacher_keys(config) -> list[Key]:
    from ling_surgery.surgery.architectures import rotary_dim

    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return [
        Key("block_count", "uint32", config.num_hidden_layers),
        Key("context_length", "uint32", config.max_position_embeddings),
        Key("embedding_length", "uint32", config.hidden_size),
        Key("feed_forward_length", "uint32", config.intermediate_size),
        Key("attention.head_count", "uint32", config.num_attention_heads),
        Key("attention.head_count_kv", "uint32", config.num_key_value_heads),
        Key("attention.layer_norm_rms_epsilon", "float32", float(config.rms_norm_eps)),
        Key("attention.key_length", "uint32", d),
        Key("attention.value_length", "uint32", d),
        Key("rope.dimension_count", "uint32", rotary_dim(config)),  # GLM-4.5 rotates the first half of each head
        Key("vocab_size", "uint32", config.vocab_size),
    ] + _teacher_moe_keys(config)


def _teacher_moe_keys(config) -> list[Key]:
    from ling_surgery.surgery.architectures import source_moe

    moe = source_moe(config)
    if moe is None:
        return []
    keys = [Key("expert_count", "uint32", moe.num_experts), Key("expert_used_count", "uint32", moe.top_k),
            Key("expert_feed_forward_length", "uint32", moe.expert_width)]
    if TEACHER_LAYOUTS[config.model_type].sigmoid_router:
        return keys + _sigmoid_router_keys(moe.shared_width // moe.expert_width, moe.leading_dense, moe.scaling,
                                           moe.renormalise, moe.n_group, moe.topk_group)
    if moe.shared_width:
        keys.append(Key("expert_shared_feed_forward_length", "uint32", moe.shared_width))
    return keys


@dataclass(frozen=True)
class RopeFrequencies:
    """A model's RoPE as llama.cpp computes it: θ_j = pos · base^(-2j/n) · scale / factor_j."""

    base: float
    scale: float  # uniform (linear) frequency scale: `rope.scaling.factor` = 1/scale
    factors: np.ndarray | None  # per-pair divisors beyond the uniform scale (llama3 scaling), `rope_freqs.weight`


def rope_frequencies(model, arch: str, allow_factors: bool) -> RopeFrequencies:
    """Read the frequencies off the model's own rotary module (what transformers computes for its `rope_type`), so the
    file reproduces them whatever the scaling rule: default, linear (one scale) and llama3 (per-pair factors)."""
    config = model.config
    rope = getattr(config, "rope_parameters", None) or {}
    base = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    rotary = model.model.rotary_emb
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise SurgeryError(f"GGUF export of rope_type {rope.get('rope_type')!r} is not supported: it scales attention "
                           "(YaRN-style), which this exporter does not write; supported: default, linear, llama3")
    inv_freq = rotary.inv_freq.detach().double().cpu().numpy()
    n = 2 * inv_freq.shape[0]
    default = base ** (-np.arange(0, n, 2, dtype=np.float64) / n)
    ratio = default / inv_freq  # 1 for default RoPE, the factor for linear, per-pair for llama3
    if np.allclose(ratio, ratio[0], rtol=1e-6, atol=0):
        return RopeFrequencies(base, 1.0 / float(ratio[0]), None)
    if not allow_factors:
        unscaled = int(np.argmax(~np.isclose(ratio, 1.0, rtol=1e-6))) * 2
        raise SurgeryError(f"GGUF export: llama.cpp's {arch} reads no per-frequency RoPE factors, and this model's "
                           f"{rope.get('rope_type')!r} RoPE scales its {n} rotary dims unevenly; only the first "
                           f"{unscaled} are unscaled, so an upgrade with plan.mla.qk_rope_head_dim ≤ {unscaled} exports "
                           "exactly")
    return RopeFrequencies(base, 1.0, ratio.astype(np.float32))


def rope_keys(frequencies: RopeFrequencies) -> list[Key]:
    keys = [Key("rope.freq_base", "float32", frequencies.base)]
    if frequencies.scale != 1.0:
        keys += [Key("rope.scaling.type", "string", "linear"), Key("rope.scaling.factor", "float32", 1 / frequencies.scale)]
    return keys


LAYOUTS = {"bailingmoe3": (bailingmoe3_keys, bailingmoe3_tensors), "deepseek2": (deepseek2_keys, deepseek2_tensors)}
LAYOUTS.update({layout.arch: (teacher_keys, teacher_tensors) for layout in TEACHER_LAYOUTS.values()})


# The splitting regexes of tokenizer.json `Split` pre-tokenizers that llama.cpp implements (src/llama-vocab.cpp).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")

# Byte-level BPE pipelines → llama.cpp `tokenizer.ggml.pre`, by whether the BPE model ignores merges (a word already
# in the vocabulary is one token), which llama.cpp switches on by name. A pipeline is its pre-tokenizers in order, each
# reduced to what changes the split.
BYTE_LEVEL_PIPELINES: dict[tuple, dict[bool, str]] = {
    (("ByteLevel", True),): {False: "gpt-2"},  # GPT-2 regex inside ByteLevel
    (("Digits", True), ("ByteLevel", True)): {False: "smollm"},  # SmolLM: every digit alone, then GPT-2
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): {True: "llama-bpe", False: "smaug-bpe"},  # Llama-3
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): {False: "qwen2"},  # Qwen2, Qwen2.5, Qwen3
}
SUPPORTED_TOKENIZERS = ("byte-level BPE: GPT-2, SmolLM, Llama-3, Qwen2/Qwen3 pre-tokenizers; "
                        "SentencePiece-style BPE with byte fallback (Llama-2, Mistral)")

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def tokenizer_keys(tokenizer, vocab_size: int) -> list[Key]:
    """The vocabulary in the form llama.cpp tokenises exactly like the transformers tokenizer it came from.

    Byte-level BPE (GPT-2, SmolLM, Llama-3, Qwen) is written as `gpt2` with its merges and the pre-tokenizer named by
    `BYTE_LEVEL_PIPELINES`. SentencePiece-style BPE (Llama-2, Mistral: `▁` for spaces, byte fallback) is written as
    `llama`, whose tokenizer merges the adjacent pair with the highest score: a token's score is minus the rank of the
    first merge that makes it, so pairs merge in the order the merge list gives. Anything else is refused rather than
    tokenised differently.
    """
    import json

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise SurgeryError(f"GGUF export needs a BPE tokenizer; this one is {model.get('type')!r} "
                           f"(supported: {SUPPORTED_TOKENIZERS})")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    if not merges:
        raise SurgeryError("GGUF export: the tokenizer has no BPE merges; llama.cpp cannot tokenise without them")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    sentencepiece = _metaspace_prefix(spec)
    if sentencepiece is None:
        pre = _byte_level_pre_tokenizer(spec, model)
        keys = [Key("tokenizer.ggml.model", "string", "gpt2", False), Key("tokenizer.ggml.pre", "string", pre, False)]
    else:
        if not model.get("byte_fallback"):
            raise SurgeryError("GGUF export: this SentencePiece-style tokenizer has no byte fallback, which llama.cpp's "
                               f"`llama` tokenizer always uses (supported: {SUPPORTED_TOKENIZERS})")
        keys = [Key("tokenizer.ggml.model", "string", "llama", False),
                Key("tokenizer.ggml.add_space_prefix", "bool", sentencepiece, False)]
    tokens, types, scores = [], [], []
    rank = {}
    for i, (left, right) in enumerate(merges):
        rank.setdefault(left + right, i)
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(token)
            if sentencepiece is not None and token == tokenizer.unk_token:
                types.append(TOKEN_UNKNOWN)
            elif token in added:
                types.append(TOKEN_CONTROL if added[token].special else TOKEN_USER_DEFINED)
            elif sentencepiece is not None and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types.append(TOKEN_BYTE)  # byte fallback: llama.cpp spells unknown characters with these
            else:
                types.append(TOKEN_NORMAL)
        scores.append(-float(rank.get(token, -1) + 1) if sentencepiece is not None else 0.0)
    keys += [Key("tokenizer.ggml.tokens", "string_array", tokens, False),
             Key("tokenizer.ggml.token_type", "int_array", types, False)]
    if sentencepiece is None:
        keys.append(Key("tokenizer.ggml.merges", "string_array", [f"{a} {b}" for a, b in merges], False))
    else:
        keys.append(Key("tokenizer.ggml.scores", "float32_array", scores, False))
    add_bos, add_eos = _added_specials(tokenizer)
    keys += [Key("tokenizer.ggml.add_bos_token", "bool", add_bos, False),
             Key("tokenizer.ggml.add_eos_token", "bool", add_eos, False)]
    for name, token in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("unknown", tokenizer.unk_token),
                        ("padding", tokenizer.pad_token)):
        if token is not None and token in vocab:
            keys.append(Key(f"tokenizer.ggml.{name}_token_id", "uint32", vocab[token], False))
    if tokenizer.chat_template:
        keys.append(Key("tokenizer.chat_template", "string", tokenizer.chat_template, False))
    return keys


def _metaspace_prefix(spec: dict) -> bool | None:
    """For a SentencePiece-style pipeline (spaces become `▁` and the text is one piece), whether a `▁` is put before
    the text (llama.cpp's `add_space_prefix`); None for any other pipeline.

    transformers 5 writes it as a Metaspace pre-tokenizer that does not split; older tokenizer.json files as a
    Prepend("▁") + Replace(" ", "▁") normalizer with no pre-tokenizer."""
    pre, norm = spec.get("pre_tokenizer"), spec.get("normalizer")
    if pre and pre.get("type") == "Metaspace":
        if norm or pre.get("replacement") != "▁" or pre.get("split", True):
            raise SurgeryError("GGUF export: this Metaspace tokenizer splits words or normalises text first, which "
                               f"llama.cpp's `llama` tokenizer does not (supported: {SUPPORTED_TOKENIZERS})")
        return pre.get("prepend_scheme", "always") != "never"
    if pre is None and norm and norm.get("type") == "Sequence":
        steps = [(n.get("type"), n.get("prepend"), (n.get("pattern") or {}).get("String"), n.get("content"))
                 for n in norm.get("normalizers", [])]
        replace = ("Replace", None, " ", "▁")
        if steps == [("Prepend", "▁", None, None), replace]:
            return True
        if steps == [replace]:
            return False
    return None


def _byte_level_pre_tokenizer(spec: dict, model: dict) -> str:
    """llama.cpp's name for a byte-level BPE pipeline, or a one-line refusal."""
    import json

    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer") or {}
    # Qwen's NFC normaliser changes only text that is not in NFC already; llama.cpp's converter maps it the same way.
    if norm and norm.get("type") != "NFC":
        raise SurgeryError(f"GGUF export: the tokenizer's {norm.get('type')} normalizer has no llama.cpp equivalent "
                           f"(supported: {SUPPORTED_TOKENIZERS})")
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]

    def reduce(part: dict):
        kind = part.get("type")
        if kind == "ByteLevel" and not part.get("add_prefix_space"):
            return ("ByteLevel", part.get("use_regex", True))
        if kind == "Digits":
            return ("Digits", part.get("individual_digits", False))
        if kind == "Split" and part.get("behavior") == "Isolated" and not part.get("invert"):
            return ("Split", (part.get("pattern") or {}).get("Regex"))
        return (kind, json.dumps(part, sort_keys=True))

    pipeline = tuple(reduce(p) for p in parts)
    ignore_merges = bool(model.get("ignore_merges"))
    name = BYTE_LEVEL_PIPELINES.get(pipeline, {}).get(ignore_merges)
    if name is None:
        parts = " + ".join(p[0] for p in pipeline) or "none"
        raise SurgeryError(f"GGUF export: the tokenizer's pre-tokenizer ({parts}"
                           f"{', ignore_merges' if ignore_merges else ''}) has no llama.cpp equivalent that tokenises "
                           f"identically (supported: {SUPPORTED_TOKENIZERS})")
    return name


def _added_specials(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer puts its BOS before, and its EOS after, a text it encodes with special tokens."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and full[:1] == [tokenizer.bos_token_id] and plain[:1] != full[:1]
    add_eos = tokenizer.eos_token_id is not None and full[-1:] == [tokenizer.eos_token_id] and plain[-1:] != full[-1:]
    return bool(add_bos), bool(add_eos)


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
    if name.endswith(".ffn_gate_inp.weight"):
        return "f32"  # the router: llama.cpp's quantizer never quantizes it (expert choice flips on rounding)
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
    layout = TEACHER_LAYOUTS.get(config.model_type)
    frequencies = rope_frequencies(model, arch, allow_factors=layout is not None and layout.frequency_factors)
    if frequencies.factors is not None:
        tensors["rope_freqs.weight"] = frequencies.factors  # llama.cpp divides pair j's frequency by factor j
    keys = keys_fn(config) + rope_keys(frequencies) + tokenizer_keys(tokenizer, tensors["token_embd.weight"].shape[0])
    qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
    file_types = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}  # llama.cpp LLAMA_FTYPE_*
    planned, fallback = {}, []
    output_name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    for tensor_name, array in tensors.items():
        kind = _file_type(tensor_name, array, dtype, output_name)
        if array.shape[-1] % gguf.GGML_QUANT_SIZES[qtypes[kind]][0]:
            # rows that do not fill whole quantization blocks (an MLA head's dn = d − dr of, say, 34) go in f16, as
            # llama.cpp's own quantizer does with such tensors
            kind = "f16"
            fallback.append(tensor_name)
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
            elif key.kind in ("string_array", "float32_array"):
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
    return {"arch": arch, "tensors": len(tensors), "types": counts, "bytes": path.stat().st_size, "path": str(path),
            "f16_fallback": fallback}


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

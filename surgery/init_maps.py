"""Weight-init maps from a Llama-family teacher to `bailing_hybrid` (KDA + gated MLA).

Each map is a pure function from teacher tensors (+ calibration statistics) to student tensors. A `Ledger` wraps
the teacher state dict: every tensor must be taken exactly once or the conversion raises, and the produced dict
must match the student's parameter names and shapes exactly (`build_student` loads it with strict=True).

Notation: D hidden, H query heads, G KV heads (H/G queries per KV head), d head dim, dr RoPE dims kept in MLA,
dn = d - dr NoPE dims, r latent rank, C = E[x xᵀ] the second moment of the attention input x on calibration text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ling_surgery.surgery.architectures import ArchSpec, head_dim, rotary_dim
from ling_surgery.surgery.errors import SurgeryError

GATE_COMPENSATION = 2.0  # sigmoid(0) = 0.5 for zero-initialised output gates; the next linear map doubles back
# transformers builds MLA's latent RMSNorm with its default ε = 1e-6 whatever the config says, while llama.cpp and vLLM
# read `rms_norm_eps`: upgraded models' configs say 1e-6 (`targets.target_config`), so every engine agrees.
LATENT_NORM_EPS = 1e-6
LATENT_MARGIN = 1e-3  # the latent's mean square as a fraction of ε at init: deep in the norm's linear regime


@dataclass
class LayerStats:
    """Calibration statistics of one teacher attention layer (all float64)."""

    x_moment: torch.Tensor  # E[x xᵀ] of the attention input, (D, D)
    x_mean: torch.Tensor  # E[x], (D,)
    head_rms: torch.Tensor  # rms of each head's attention output before o_proj, (H,)
    q_rms: torch.Tensor | None = None  # rms of pre-qk-norm queries per head, (H,) (per-model norm: (1,))
    k_rms: torch.Tensor | None = None  # rms of pre-qk-norm keys per KV head, (G,) (per-model norm: (1,))
    moe_inputs: torch.Tensor | None = None  # up to moe.CALIBRATION_TOKENS_PER_LAYER inputs of an MoE block, (N, D)
    latent_rms: float | None = None  # an MLA source's mean per-token rms of its latent before kv_a_layernorm


class Ledger:
    """Teacher tensors that must each be consumed exactly once."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = dict(state)
        self._taken: set[str] = set()

    def take(self, name: str) -> torch.Tensor:
        if name in self._taken:
            raise SurgeryError(f"init map bug: teacher tensor {name!r} consumed twice")
        if name not in self._state:
            raise SurgeryError(f"teacher checkpoint has no tensor {name!r}; is the architecture table right?")
        self._taken.add(name)
        return self._state[name]

    def take_optional(self, name: str) -> torch.Tensor | None:
        return self.take(name) if name in self._state else None

    def check_all_consumed(self) -> None:
        left = sorted(set(self._state) - self._taken)
        if left:
            more = f" (+{len(left) - 5} more)" if len(left) > 5 else ""
            raise SurgeryError(f"init maps left teacher tensors unaccounted for: {', '.join(left[:5])}{more}")


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _sqrt_and_inv_sqrt(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C^{1/2} and C^{-1/2} of a PSD matrix, with a small ridge so rarely used directions stay bounded."""
    ridge = 1e-4 * moment.diagonal().mean().clamp_min(1e-12)
    eigval, eigvec = torch.linalg.eigh(moment + ridge * torch.eye(len(moment), dtype=moment.dtype))
    eigval = eigval.clamp_min(ridge)
    return (eigvec * eigval.sqrt()) @ eigvec.T, (eigvec * eigval.rsqrt()) @ eigvec.T


def absorb_bias(weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None) -> torch.Tensor:
    """Fold a projection bias into the weight: the least-squares W' with W'x ≈ Wx + b over calibration inputs.

    bailing_hybrid has no q/k/v biases. W' = W + b μᵀ C⁻¹ minimises E‖W'x − (Wx + b)‖² (normal equations with
    C = E[xxᵀ], μ = E[x]). For keys the constant part is also softmax-invariant; the fold keeps what is not.
    """
    if bias is None:
        return weight
    if stats is None:
        raise SurgeryError("the source has projection biases; they need calibration (set calibration.tokens > 0)")
    _, inv_sqrt = _sqrt_and_inv_sqrt(stats.x_moment)
    return weight + torch.outer(bias, inv_sqrt @ inv_sqrt @ stats.x_mean)


def _fold_qk_norm(weight: torch.Tensor, norm_weight: torch.Tensor | None, rms: torch.Tensor | None):
    """RMSNorm(Wx)·w ≈ w ⊙ Wx / E[rms], per head (Qwen3: w has head_dim entries) or over all heads at once (OLMoE: w
    covers every row): exact up to the per-token rms spread (and exact in direction per head when per head, which is
    all KDA keeps after its L2 normalisation)."""
    if norm_weight is None:
        return weight
    groups = weight.shape[0] // len(norm_weight)
    scale = torch.ones(groups, dtype=weight.dtype) if rms is None else 1.0 / rms.clamp_min(1e-6)
    return (weight.view(groups, len(norm_weight), -1) * (scale[:, None] * norm_weight)[..., None]).reshape_as(weight)


def teacher_attention(ledger: Ledger, prefix: str, arch: ArchSpec, stats: LayerStats | None, d: int):
    """q/k/v/o of one teacher layer in float64 with biases and qk-norms folded in: Wq (H·d, D), Wk/Wv (G·d, D)."""
    def proj(name):
        return _f64(ledger.take(f"{prefix}.{name}.weight")), ledger.take_optional(f"{prefix}.{name}.bias")

    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (proj(getattr(arch, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if bo is not None and bo.abs().max() > 0:
        raise SurgeryError("sources with an o_proj bias are not supported (bailing_hybrid has none on KDA layers)")
    wq, wk, wv = (absorb_bias(w, None if b is None else _f64(b), stats) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    if arch.qk_norm is not None:  # read when present (GLM-4.5: use_qk_norm)
        qn, kn = (ledger.take_optional(f"{prefix}.{n}.weight") for n in arch.qk_norm)
        if qn is not None:
            wq = _fold_qk_norm(wq, _f64(qn), None if stats is None else stats.q_rms)
            wk = _fold_qk_norm(wk, _f64(kn), None if stats is None else stats.k_rms)
    return wq, wk, wv, wo


def repeat_kv_rows(weight: torch.Tensor, groups: int, heads: int, d: int) -> torch.Tensor:
    """GQA → MHA: repeat each KV head's rows for the H/G query heads that read it (head h uses KV head h // (H/G))."""
    return weight.view(groups, d, -1).repeat_interleave(heads // groups, dim=0).reshape(heads * d, -1)


def rope_half_lives(source_config, d: int, lo: float, hi: float) -> torch.Tensor:
    """Per key channel, the period (tokens) of the RoPE pair it belongs to in the teacher, clamped to [lo, hi].

    Llama's rotate_half pairs channel i with i + R/2 at frequency ω_i = θ^(-2i/R) (R = d, or the rotated part of a
    partial-rotary head, whose other channels carry no position and get the longest memory): channels that encode
    short-range position rotate fast, so they get a short memory, slow channels a long one.
    """
    rope = getattr(source_config, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(source_config, "rope_theta", 10000.0)))
    rotary = rotary_dim(source_config)
    freq = theta ** (-torch.arange(0, rotary, 2, dtype=torch.float64) / rotary)
    period = (2 * math.pi / freq).clamp(lo, hi)
    return torch.cat([period, period, torch.full((d - rotary,), float(hi), dtype=torch.float64)])


def init_kda(ledger: Ledger, prefix: str, arch: ArchSpec, stats: LayerStats | None, source_config, target_config,
             half_life: tuple[float, float] = (2.0, 2048.0)):
    """KDA mixer from a softmax-attention layer (names relative to the student's `self_attn`).

    | student                 | from                                                                     |
    |-------------------------|--------------------------------------------------------------------------|
    | q_proj                  | Wq (biases/qk-norm folded); an MLA source: `mla_source_heads`             |
    | k_proj, v_proj          | Wk, Wv with each KV head repeated for its query heads                    |
    | conv1d                  | identity tap ε_h on the current token, so silu(ε z) ≈ ε z / 2 stays linear |
    | forget_gate.f_proj      | 0 (gate input-independent at init)                                       |
    | forget_gate.A_log       | 0                                                                        |
    | forget_gate.dt_bias     | decay with half-life = teacher RoPE period of the channel (slow forget)  |
    | b_proj                  | 0 (β = 1/2)                                                              |
    | g_proj, o_norm          | 0 (gate 1/2) and weight 2: the gated norm is an open, unit-rms output    |
    | o_proj                  | Wo with head h's columns scaled by the teacher's head-output rms         |
    """
    d = head_dim(source_config)
    heads, groups, hidden = source_config.num_attention_heads, source_config.num_key_value_heads, source_config.hidden_size
    if arch.mla_attention:  # DeepSeek: its NoPE queries and keys and its values; those channels carry no position
        wq, wk, wv, wo = mla_source_heads(ledger, prefix, stats, source_config)
        periods = torch.full((d,), float(half_life[1]), dtype=torch.float64)
    else:
        wq, wk, wv, wo = teacher_attention(ledger, prefix, arch, stats, d)
        wk, wv = repeat_kv_rows(wk, groups, heads, d), repeat_kv_rows(wv, groups, heads, d)
        periods = rope_half_lives(source_config, d, *half_life)

    moment = torch.eye(hidden, dtype=torch.float64) if stats is None else stats.x_moment
    taps = []
    for w in (wq, wk, wv):
        # ε per head from the calibrated rms of its channels: |ε z| ≈ 0.1 keeps silu within ~2.5% of linear.
        channel_rms = ((w @ moment) * w).sum(-1).clamp_min(1e-12).sqrt().view(heads, d)
        taps.append((0.1 / channel_rms.max(-1).values).repeat_interleave(d))
    kernel = target_config.short_conv_kernel_size
    conv = torch.zeros(3 * heads * d, 1, kernel, dtype=torch.float64)
    conv[:, 0, -1] = torch.cat(taps)

    log_decay = -math.log(2) / periods.repeat(heads)  # g = log α per token
    frac = (log_decay / target_config.kda_lower_bound).clamp(1e-7, 1 - 1e-7)  # g = lower_bound · sigmoid(dt_bias)
    head_rms = torch.ones(heads, dtype=torch.float64) if stats is None else stats.head_rms
    o_proj = (wo.view(hidden, heads, d) * head_rms[None, :, None]).reshape(hidden, heads * d)
    return {
        "q_proj.weight": wq,
        "k_proj.weight": wk,
        "v_proj.weight": wv,
        "conv1d.weight": conv,
        "forget_gate.f_proj.weight": torch.zeros(heads * d, hidden, dtype=torch.float64),
        "forget_gate.A_log": torch.zeros(heads, dtype=torch.float64),
        "forget_gate.dt_bias": torch.log(frac) - torch.log1p(-frac),
        "b_proj.weight": torch.zeros(heads, hidden, dtype=torch.float64),
        "g_proj.weight": torch.zeros(heads * d, hidden, dtype=torch.float64),
        "o_norm.weight": torch.full((d,), GATE_COMPENSATION, dtype=torch.float64),
        "o_proj.weight": o_proj,
    }


def mla_source_heads(ledger: Ledger, prefix: str, stats: LayerStats | None, source_config):
    """Per-head q/k/v/o (H·dv rows each, float64) of a DeepSeek MLA layer, for a KDA layer in its place.

    DeepSeek: q_h = [q_nope; q_rope], [k_nope_h; v_h] = kv_b_h · RMSNorm(A x)·w with A the latent rows of
    kv_a_proj_with_mqa, and one RoPE key shared by all heads. KDA has no positions: it takes the NoPE queries and keys
    and the values, the latent's RMSNorm folded at its calibrated rms (w ⊙ Ax / E[rms], as `_fold_qk_norm`), each
    head's q/k cut or zero-padded to dv channels (KDA's head dim is the value dim; DeepSeek's dn = dv).
    """
    heads, hidden = source_config.num_attention_heads, source_config.hidden_size
    dn, dr, dv, r = (source_config.qk_nope_head_dim, source_config.qk_rope_head_dim, source_config.v_head_dim,
                     source_config.kv_lora_rank)
    wq = _f64(ledger.take(f"{prefix}.q_proj.weight")).view(heads, dn + dr, hidden)[:, :dn]
    latent = _f64(ledger.take(f"{prefix}.kv_a_proj_with_mqa.weight"))[:r]
    norm = _f64(ledger.take(f"{prefix}.kv_a_layernorm.weight"))
    rms = stats.latent_rms if stats is not None and stats.latent_rms is not None else 1.0
    latent = latent * (norm / max(float(rms), 1e-6))[:, None]
    kv_b = _f64(ledger.take(f"{prefix}.kv_b_proj.weight")).view(heads, dn + dv, r)
    wk, wv = kv_b[:, :dn] @ latent, kv_b[:, dn:] @ latent

    def to_dv(w):  # (H, dn, D) → (H, dv, D)
        return w[:, :dv] if dn >= dv else torch.cat([w, w.new_zeros(heads, dv - dn, hidden)], dim=1)

    wo = _f64(ledger.take(f"{prefix}.o_proj.weight"))
    return to_dv(wq).reshape(heads * dv, hidden), to_dv(wk).reshape(heads * dv, hidden), wv.reshape(heads * dv, hidden), wo


def copy_mla(ledger: Ledger, prefix: str, source_config, gated: bool = True) -> dict:
    """A DeepSeek MLA layer as the target's MLA, exactly: every tensor copied (RoPE rows of a rotate-half source made
    interleaved, as the target always is); gated targets get g_proj = 0 (sigmoid 1/2) and 2·o_proj (research/moe.md §3:
    DeepseekV3Attention → BailingHybridAttention, max |diff| 0)."""
    heads, hidden = source_config.num_attention_heads, source_config.hidden_size
    dn, dr = source_config.qk_nope_head_dim, source_config.qk_rope_head_dim
    take = lambda name: ledger.take(f"{prefix}.{name}.weight").clone()  # noqa: E731
    q, kv_a, norm, kv_b, wo = (take(n) for n in ("q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"))
    if not getattr(source_config, "rope_interleave", True):  # new[2j] = old[j], new[2j+1] = old[j + dr/2]
        order = torch.stack([torch.arange(dr // 2), torch.arange(dr // 2) + dr // 2], dim=1).reshape(-1)
        q = q.view(heads, dn + dr, hidden)
        q = torch.cat([q[:, :dn], q[:, dn:][:, order]], dim=1).reshape(-1, hidden)
        kv_a = torch.cat([kv_a[:-dr], kv_a[-dr:][order]])
    mixer = {"q_proj.weight": q, "kv_a_proj_with_mqa.weight": kv_a, "kv_a_layernorm.weight": norm,
             "kv_b_proj.weight": kv_b, "o_proj.weight": wo}
    if gated:
        mixer["g_proj.weight"] = torch.zeros(heads, hidden, dtype=wo.dtype)
        mixer["o_proj.weight"] = GATE_COMPENSATION * wo
    return mixer


def rope_split(d: int, dr: int, rotary: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel indices of the teacher head: NoPE channels, and the first/second halves of the kept RoPE pairs.

    The dr/2 highest-frequency pairs (i, i + R/2), i < dr/2, keep RoPE (R = `rotary`, the rotated channels: d unless
    partial; under θ' = θ^(dr/R) their frequencies are unchanged); every other channel becomes NoPE.
    """
    first = torch.arange(dr // 2)
    second = first + (rotary or d) // 2
    kept = set(first.tolist()) | set(second.tolist())
    nope = torch.tensor([c for c in range(d) if c not in kept], dtype=torch.long)
    return nope, first, second


def shared_rope_key(wk_first, wk_second, sqrt_c, inv_sqrt_c):
    """One RoPE key shared by all heads (MLA's k_rot) from G per-KV-head keys, pair by pair.

    A RoPE pair acts as a complex number rotated by e^{iωn}; a rotation commutes with complex scaling, so if
    k_g ≈ α_g·s for a shared s, each query pair multiplied by conj(α_g) gives the teacher's scores at every offset.
    The best such (α, s) is the top singular triplet of the complex G×D key matrix in whitened coordinates
    (activation-aware: minimises E|k_g − α_g s·x|²). Exact when G = 1.
    Inputs (G, P, D) for P pairs; returns s as (P, D) real/imag and α as (G, P) complex.
    """
    keys = torch.complex(wk_first, wk_second).permute(1, 0, 2) @ sqrt_c.to(torch.complex128)  # (P, G, D)
    u, s, vh = torch.linalg.svd(keys, full_matrices=False)
    alpha = (u[..., 0] * s[..., :1]).T  # (G, P)
    shared = vh[:, 0, :] @ inv_sqrt_c.to(torch.complex128)  # (P, D)
    return shared.real, shared.imag, alpha


def latent_norm_init(down: torch.Tensor, moment: torch.Tensor, mode: str = "linear"):
    """The latent's down-projection and RMSNorm weight such that, on average over calibration inputs, the norm passes
    the latent `down @ x` through unchanged.

    `per_token`: weight = the latent's rms, so RMSNorm(Ax)·w = Ax·rms/rms(Ax) — exact only for tokens of average
    norm: it divides each token's latent by that token's own rms, which the teacher's keys and values never were.
    Measured on SmolLM2-135M, all-MLA at full rank (192 + 64 RoPE dims): perplexity 2,677 straight after init.
    `linear` (default): the norm in its linear regime, y/sqrt(mean(y²) + ε)·w ≈ y·w/sqrt(ε) when mean(y²) ≪ ε —
    the rows are scaled by s so that the latent's mean square is `LATENT_MARGIN`·ε, and w = sqrt(s²·ms + ε)/s undoes
    s and ε. A token whose latent has k× the average energy is damped by 1/sqrt(1 + k·margin) only. Same checkpoint
    format, perplexity 53.8 (teacher 15.0) on the same windows. Training keeps the rows' scale (`distill`'s per-row
    learning rates), and the norm can still leave the regime if training moves it there.
    """
    r = len(down)
    ms = ((down @ moment) * down).sum().div(r).clamp_min(1e-24)  # E[mean_c (down x)_c²]
    if mode == "per_token":
        return down, torch.full((r,), float(ms.sqrt()), dtype=torch.float64)
    scale = (LATENT_MARGIN * LATENT_NORM_EPS / ms).sqrt()
    weight = (scale**2 * ms + LATENT_NORM_EPS).sqrt() / scale
    return down * scale, torch.full((r,), float(weight), dtype=torch.float64)


def init_mla(ledger: Ledger, prefix: str, arch: ArchSpec, stats: LayerStats | None, source_config, target_config,
             svd: str = "activation", gated: bool = True, latent_norm: str = "linear"):
    """(Gated) MLA from a softmax-attention layer (names relative to the student's `self_attn`).

    | student                  | from                                                                         |
    |--------------------------|------------------------------------------------------------------------------|
    | q_proj (per head)        | [NoPE channels of Wq_h ; kept RoPE pairs, interleaved, × conj(α_g)]           |
    | kv_a_proj_with_mqa       | [A = V_rᵀ C^{-1/2} (whitened latent) ; shared k_rot s, interleaved]           |
    | kv_a_layernorm           | in its linear regime: rows of A scaled down, weight undoes it (`latent_norm_init`) |
    | kv_b_proj (per head)     | rows of U_r S_r for [K_nope of KV head g ; V of KV head g]                    |
    | g_proj, o_proj           | 0 (gate 1/2) and 2·Wo; ungated MLA (deepseek_v3): no g_proj, o_proj = Wo      |

    [K_nope; V] C^{1/2} = U S Vᵀ is the joint SVD of keys and values (MHA2MLA / X-EcoMLA) in whitened
    coordinates (activation-aware: minimises E‖(M − BA)x‖², not ‖M − BA‖_F). Interleaving: bailing's RoPE rotates
    pairs (2j, 2j+1), Llama's pairs (j, j + d/2), so new[2j] = old[j], new[2j+1] = old[j + d/2].
    """
    d = head_dim(source_config)
    heads, groups, hidden = source_config.num_attention_heads, source_config.num_key_value_heads, source_config.hidden_size
    dr, r = target_config.qk_rope_head_dim, target_config.kv_lora_rank
    wq, wk, wv, wo = teacher_attention(ledger, prefix, arch, stats, d)
    use_stats = stats is not None and svd == "activation"
    moment = stats.x_moment if use_stats else torch.eye(hidden, dtype=torch.float64)
    sqrt_c, inv_sqrt_c = _sqrt_and_inv_sqrt(moment) if use_stats else (moment, moment)
    nope, first, second = rope_split(d, dr, rotary_dim(source_config))
    wq_h, wk_g, wv_g = wq.view(heads, d, hidden), wk.view(groups, d, hidden), wv.view(groups, d, hidden)

    # Shared RoPE key and the per-group complex factors folded into the queries.
    s_re, s_im, alpha = shared_rope_key(wk_g[:, first], wk_g[:, second], sqrt_c, inv_sqrt_c)
    k_rot = torch.stack([s_re, s_im], dim=1).reshape(dr, hidden)  # interleaved rows 2j, 2j+1
    a = alpha.repeat_interleave(heads // groups, dim=0)[..., None]  # (H, P, 1)
    q1, q2 = wq_h[:, first], wq_h[:, second]
    q_rot = torch.stack([q1 * a.real + q2 * a.imag, q2 * a.real - q1 * a.imag], dim=2).reshape(heads, dr, hidden)
    q_proj = torch.cat([wq_h[:, nope], q_rot], dim=1).reshape(heads * d, hidden)

    # Joint low-rank K_nope/V latent.
    dn = len(nope)
    joint = torch.cat([wk_g[:, nope], wv_g], dim=1).reshape(groups * (dn + d), hidden)  # per group [k_nope; v]
    u, s, vh = torch.linalg.svd(joint @ sqrt_c, full_matrices=True)
    s = torch.cat([s, s.new_zeros(max(0, r - len(s)))])
    down = vh[:r] @ inv_sqrt_c  # (r, D)
    up = u[:, :r] * s[:r] if u.shape[1] >= r else torch.cat([u * s[: u.shape[1]], u.new_zeros(len(u), r - u.shape[1])], 1)
    down, norm_weight = latent_norm_init(down, moment, latent_norm)
    kv_b = up.view(groups, dn + d, r).repeat_interleave(heads // groups, dim=0).reshape(-1, r)
    mixer = {
        "q_proj.weight": q_proj,
        "kv_a_proj_with_mqa.weight": torch.cat([down, k_rot], dim=0),
        "kv_a_layernorm.weight": norm_weight,
        "kv_b_proj.weight": kv_b,
        "o_proj.weight": wo,
    }
    if gated:
        mixer["g_proj.weight"] = torch.zeros(heads, hidden, dtype=torch.float64)
        mixer["o_proj.weight"] = GATE_COMPENSATION * wo
    return mixer


def mla_energy_kept(teacher_state, arch: ArchSpec, source_config, target_config, stats,
                    svd: str = "activation") -> dict[int, dict]:
    """Per MLA layer and KV head, the fraction of the teacher's key/value energy the MLA init keeps.

    `k_nope` and `v`: what the rank-r joint latent keeps of the NoPE key channels and of the values; `k_rope`: what
    the one shared RoPE key keeps of the head's RoPE'd key channels. Energies are measured as `init_mla` fits them:
    E‖·x‖² over calibration inputs with activation-aware SVD, ‖·‖_F² otherwise. 1.0 is lossless.
    """
    from ling_surgery.surgery.plan import MLA, mixer_types

    if arch.mla_attention:  # the source's own MLA layers are copied: nothing is lost
        return {}
    d = head_dim(source_config)
    groups, hidden = source_config.num_key_value_heads, source_config.hidden_size
    dr, r = target_config.qk_rope_head_dim, target_config.kv_lora_rank
    nope, first, second = rope_split(d, dr, rotary_dim(source_config))
    out = {}
    for i, kind in enumerate(mixer_types(target_config)):
        if kind != MLA:
            continue
        layer_stats = None if stats is None else stats[i]
        _, wk, wv, _ = teacher_attention(Ledger(teacher_state), f"{arch.layers}.{i}.{arch.attention}", arch, layer_stats, d)
        eye = torch.eye(hidden, dtype=torch.float64)
        sqrt_c = _sqrt_and_inv_sqrt(layer_stats.x_moment)[0] if layer_stats is not None and svd == "activation" else eye
        wk_g, wv_g = wk.view(groups, d, hidden), wv.view(groups, d, hidden)
        dn = len(nope)
        u, sv, _ = torch.linalg.svd(torch.cat([wk_g[:, nope], wv_g], dim=1).reshape(-1, hidden) @ sqrt_c,
                                    full_matrices=False)
        rows = (u * sv).view(groups, dn + d, -1).pow(2)  # energy of each row along each singular direction
        kept, total = rows[..., :r].sum(-1), rows.sum(-1)
        rope = torch.complex(wk_g[:, first], wk_g[:, second]).permute(1, 0, 2) @ sqrt_c.to(torch.complex128)  # (P, G, D)
        ur, sr, _ = torch.linalg.svd(rope, full_matrices=False)
        rope_kept = (ur[..., 0].abs() * sr[..., :1]).pow(2).sum(0) / rope.abs().pow(2).sum((0, 2)).clamp_min(1e-30)

        def share(part):  # kept over total energy of a KV head's channels
            return (kept[:, part].sum(1) / total[:, part].sum(1).clamp_min(1e-30)).tolist()

        out[i] = {"k_nope": share(slice(0, dn)) if dn else [1.0] * groups, "v": share(slice(dn, dn + d)),
                  "k_rope": rope_kept.tolist()}
    return out


def init_student_state(teacher_state, arch: ArchSpec, source_config, target_config, stats, init_stage):
    """The whole student state dict. Shared tensors are exact copies (MoE blocks: `moe.init_moe`); every teacher tensor
    is accounted for.

    `init_stage` is the recipe's `kind: init` stage (SVD flavour, KDA half-lives).
    """
    from ling_surgery.surgery.plan import MLA, mixer_types
    from ling_surgery.surgery.targets import spec_of

    from ling_surgery.surgery.architectures import source_moe
    from ling_surgery.surgery.moe import init_moe

    gated = spec_of(target_config).gated_mla
    moe = source_moe(source_config)
    half_life = (init_stage.kda_half_life_min, init_stage.kda_half_life_max)
    ledger = Ledger(teacher_state)
    out: dict[str, torch.Tensor] = {}
    embed = ledger.take(f"{arch.embed}.weight")
    out["model.embed_tokens.weight"] = embed.clone()
    lm_head = ledger.take_optional(f"{arch.lm_head}.weight")
    if lm_head is None and not getattr(source_config, "tie_word_embeddings", False):
        raise SurgeryError("source has no lm_head weight and does not tie embeddings")
    out["lm_head.weight"] = (embed if lm_head is None else lm_head).clone()  # bailing_hybrid cannot tie: untie
    out["model.norm.weight"] = ledger.take(f"{arch.final_norm}.weight").clone()
    for i, kind in enumerate(mixer_types(target_config)):
        src, dst = f"{arch.layers}.{i}", f"model.layers.{i}"
        for name, target in ((arch.input_norm, "input_layernorm"), (arch.post_attention_norm, "post_attention_layernorm")):
            out[f"{dst}.{target}.weight"] = ledger.take(f"{src}.{name}.weight").clone()
        layer_stats = None if stats is None else stats[i]
        if moe is not None and moe.sparse[i]:
            tensors = init_moe(ledger, src, arch.moe, moe, None if layer_stats is None else layer_stats.moe_inputs)
            out.update({f"{dst}.mlp.{k}": v for k, v in tensors.items()})
        else:
            for name in arch.mlp:
                out[f"{dst}.mlp.{name.split('.')[-1]}.weight"] = ledger.take(f"{src}.{name}.weight").clone()
        prefix = f"{src}.{arch.attention}"
        if kind == MLA and arch.mla_attention:
            mixer = copy_mla(ledger, prefix, source_config, gated)
        elif kind == MLA:
            mixer = init_mla(ledger, prefix, arch, layer_stats, source_config, target_config, init_stage.svd, gated,
                             init_stage.latent_norm)
        else:
            mixer = init_kda(ledger, prefix, arch, layer_stats, source_config, target_config, half_life)
        out.update({f"{dst}.self_attn.{k}": v for k, v in mixer.items()})
    ledger.check_all_consumed()
    return out


def build_student(state: dict[str, torch.Tensor], target_config, dtype=torch.float32):
    """Instantiate the target's stock causal-LM class and load every tensor (strict: nothing missing, nothing extra)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(target_config)
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k in expected and tuple(expected[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise SurgeryError(f"init map shape mismatch for {k}: built {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}")
    result = model.load_state_dict({k: v.to(expected[k].dtype) if k in expected else v for k, v in state.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise SurgeryError(f"init maps: missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    return model.to(dtype).eval()

"""Attention for a segment that continues a cached prefix, without a mask: the shared-prefix scorer's CPU kernel.

After a cached prefix of P tokens, T new queries see all P cached keys and the new keys causally. Given as one call
with a (T, P + T) mask, SDPA on CPU cannot skip anything and reads the mask for every pair; transformers also
converts the mask and repeats the KV heads per layer. Split instead into two calls that need no mask,

    past: the T queries over the P cached keys (no mask),   new: the T queries over the T new keys (is_causal),

and merge them by their log-sum-exps, which is exact (the online-softmax rescaling of Milakov & Gimelshein 2018,
as in FlashAttention's and Flash-Decoding's split-KV reductions):

    o = (o_past · e^{lse_past − m} + o_new · e^{lse_new − m}) / (e^{lse_past − m} + e^{lse_new − m}),  m = max(lse)

Measured on 2 cores (9 heads of 64): 2k queries after 4k keys take 0.19 s against 0.29 s masked, and 4k after 4k
take 0.43 s against 0.74 s. The log-sum-exps come from the CPU flash-attention op, which returns them with the output.

Registered as a transformers attention implementation (`AttentionInterface`). Anything else goes to the stock SDPA
function unchanged: other devices, decoding (one query), padding masks, sliding windows, soft-capping, sinks.
"""

from __future__ import annotations

import torch

NAME = "ling_surgery_prefix_sdpa"


def prefix_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    past = kv_len - q_len
    plain = (query.device.type == "cpu" and query.shape[0] == 1 and q_len > 1 and past > 0 and not dropout
             and query.dtype in (torch.float32, torch.bfloat16) and key.shape[-1] == value.shape[-1]
             and not any(kwargs.get(name) for name in ("sliding_window", "softcap", "s_aux")))
    if not plain or not _lower_right_causal(attention_mask, q_len, kv_len):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    return split_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), past, scaling), None


def split_attention(query, key, value, past: int, scaling) -> torch.Tensor:
    """(B, T, H, D): the queries over `past` cached keys (no mask) and the new keys (causal), merged exactly."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out_past, lse_past = flash(query, key[:, :, :past], value[:, :, :past], scale=scaling)
    out_new, lse_new = flash(query, key[:, :, past:], value[:, :, past:], is_causal=True, scale=scaling)
    top = torch.maximum(lse_past, lse_new)
    w_past, w_new = (lse_past - top).exp()[..., None], (lse_new - top).exp()[..., None]
    out = (out_past.float() * w_past + out_new.float() * w_new) / (w_past + w_new)
    return out.to(query.dtype).transpose(1, 2).contiguous()


def _lower_right_causal(mask, q_len: int, kv_len: int) -> bool:
    """Whether `mask` lets query t see exactly keys ≤ past + t (no padding): the only mask the split is exact for.
    Compared in full every call (a few ms against the ~100 ms the call saves)."""
    if mask is None or mask.dtype != torch.bool or mask.shape[-2:] != (q_len, kv_len) or mask.numel() != q_len * kv_len:
        return False
    from ling_surgery.surgery.kda import lower_right_causal_mask

    expected = lower_right_causal_mask(kv_len - q_len, q_len, mask.device)
    return bool(torch.equal(mask.reshape(q_len, kv_len), expected))


def register() -> str:
    """Registers the implementation (masks built as for SDPA) and returns its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, prefix_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME

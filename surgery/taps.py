"""Read the teacher's per-layer attention inputs and outputs with forward hooks (no changes to its code)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ling_surgery.surgery.architectures import ArchSpec, get_module, source_moe
from ling_surgery.surgery.init_maps import LayerStats
from ling_surgery.surgery.moe import CALIBRATION_TOKENS_PER_LAYER


@contextmanager
def attention_taps(model, arch: ArchSpec):
    """Yields a dict filled on every forward: layer index → (attention input x, attention output y), both (B, T, D)."""
    record: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(get_module(model, arch.layers)):
        attn = get_module(layer, arch.attention)

        def hook(module, args, kwargs, output, i=i):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            record[i] = (x.detach(), output[0].detach())

        handles.append(attn.register_forward_hook(hook, with_kwargs=True))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collect_stats(model, arch: ArchSpec, batches) -> list[LayerStats]:
    """Second moments of each attention input, per-head output rms, pre-qk-norm rms and MoE block inputs on
    calibration batches."""
    config = model.config
    layers = get_module(model, arch.layers)
    heads = config.num_attention_heads
    n = len(layers)
    hidden = config.hidden_size
    moment = [torch.zeros(hidden, hidden, dtype=torch.float64) for _ in range(n)]
    mean = [torch.zeros(hidden, dtype=torch.float64) for _ in range(n)]
    head_sq = [torch.zeros(heads, dtype=torch.float64) for _ in range(n)]
    # qk-norm rms per head, or one for a norm over all heads (OLMoE)
    q_groups, k_groups = (heads, config.num_key_value_heads) if arch.qk_norm_per_head else (1, 1)
    q_rms = [torch.zeros(q_groups, dtype=torch.float64) for _ in range(n)]
    k_rms = [torch.zeros(k_groups, dtype=torch.float64) for _ in range(n)]
    moe = source_moe(config)
    moe_inputs: list[list[torch.Tensor]] = [[] for _ in range(n)]
    latent_rms = [torch.zeros((), dtype=torch.float64) for _ in range(n)]
    count = 0
    handles = []
    for i, layer in enumerate(layers):
        attn = get_module(layer, arch.attention)

        def attn_hook(module, args, kwargs, output, i=i):
            x = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).reshape(-1, hidden).double().cpu()
            moment[i] += x.T @ x
            mean[i] += x.sum(0)

        def o_hook(module, args, i=i):
            z = args[0].reshape(-1, heads, args[0].shape[-1] // heads).double().cpu()
            head_sq[i] += z.pow(2).mean(-1).sum(0)

        handles.append(attn.register_forward_hook(attn_hook, with_kwargs=True))
        handles.append(get_module(attn, arch.o_proj).register_forward_pre_hook(o_hook))
        if arch.qk_norm is not None and hasattr(attn, arch.qk_norm[0]):
            for name, acc, groups in zip(arch.qk_norm, (q_rms, k_rms), (q_groups, k_groups)):
                def norm_hook(module, args, acc=acc, i=i, groups=groups):
                    acc[i] += args[0].double().pow(2).mean(-1).sqrt().reshape(-1, groups).sum(0).cpu()

                handles.append(get_module(attn, name).register_forward_pre_hook(norm_hook))
        if arch.mla_attention:
            def latent_hook(module, args, i=i):  # the per-token rms that the latent's RMSNorm divides by
                latent_rms[i] += args[0].double().pow(2).mean(-1).sqrt().sum().cpu()

            handles.append(get_module(attn, "kv_a_layernorm").register_forward_pre_hook(latent_hook))
        if moe is not None and moe.sparse[i]:
            def moe_hook(module, args, i=i):  # the MoE block's inputs (post-attention-norm), for the router map
                kept = sum(len(x) for x in moe_inputs[i])
                if kept < CALIBRATION_TOKENS_PER_LAYER:
                    x = args[0].detach().reshape(-1, hidden)[: CALIBRATION_TOKENS_PER_LAYER - kept]
                    moe_inputs[i].append(x.float().cpu())

            handles.append(get_module(layer, arch.moe.block).register_forward_pre_hook(moe_hook))
    try:
        for input_ids in batches:
            model(input_ids=input_ids.to(model.device))
            count += input_ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        return None
    return [
        LayerStats(
            x_moment=moment[i] / count,
            x_mean=mean[i] / count,
            head_rms=(head_sq[i] / count).sqrt(),
            q_rms=q_rms[i] / count if arch.qk_norm else None,
            k_rms=k_rms[i] / count if arch.qk_norm else None,
            moe_inputs=torch.cat(moe_inputs[i]) if moe_inputs[i] else None,
            latent_rms=float(latent_rms[i] / count) if arch.mla_attention else None,
        )
        for i in range(n)
    ]

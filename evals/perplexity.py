"""Perplexity on held-out windows of real text."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(logits_fn, windows: torch.Tensor, batch_size: int = 4, device="cpu") -> dict:
    """exp(mean next-token NLL) over every position of every window; `logits_fn(input_ids) -> (B, T, V)`."""
    nll, count = 0.0, 0
    start = time.perf_counter()
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size].to(device)
        logits = logits_fn(ids)[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    seconds = time.perf_counter() - start
    return {
        "perplexity": math.exp(nll / count) if count else float("nan"),
        "nll": nll / count if count else float("nan"),
        "tokens": count,
        "tokens_per_second": round(windows.numel() / seconds, 1) if seconds else None,
    }

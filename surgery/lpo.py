"""The sentence-level importance ratio of LPO (Linguistic-unit Policy Optimization, Ling 2.0 §4.2, arXiv 2510.22115).

    r_{i,k} = exp( mean_{t ∈ s_{i,k}} [log π_θ(y_t) − log π_old(y_t)] ),
    J = 1/Σ_i|y_i| · Σ_i Σ_k |s_{i,k}| · min(r_{i,k}·Â_i, clip(r_{i,k}, 1−ε, 1+ε)·Â_i),   ε = 0.03

Given every token its sentence's mean log-probability (`segment_mean`, differentiable), TRL's token-level loss computes
exactly this: each token's ratio is its sentence's, clipped per sentence, and a sentence of |s| tokens counts |s|
times. One sentence per completion is GSPO's sequence-level ratio. Sentences end after a token whose text holds end
punctuation (. ! ?) followed by a space, a newline or the end, or a newline (decimal points do not end one).
"""

from __future__ import annotations

import torch

END_PUNCTUATION = ".!?"


def token_texts(tokenizer, ids: list[int], cache: dict) -> list[str]:
    """Each token's own text (cached per tokenizer; byte-level pieces of a character decode to replacement chars,
    which are never punctuation)."""
    missing = [i for i in set(ids) if i not in cache]
    for i in missing:
        cache[i] = tokenizer.decode([i])
    return [cache[i] for i in ids]


def sentence_ends(texts: list[str]) -> list[bool]:
    """Whether each token ends a sentence: it holds a newline, or its text ends in end punctuation and the next token
    starts with a space (or there is none); a newline that follows stays with the sentence it ends."""
    ends = []
    for i, text in enumerate(texts):
        following = texts[i + 1] if i + 1 < len(texts) else ""
        if following.startswith("\n"):
            ends.append(False)
        elif "\n" in text:
            ends.append(True)
        else:
            ends.append(text.rstrip(" ")[-1:] in tuple(END_PUNCTUATION) and (not following or following[:1].isspace()))
    return ends


def sentence_ids(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor, cache: dict) -> torch.Tensor:
    """(B, T) sentence index of every completion token (padding takes the last sentence's; it is masked anyway)."""
    out = torch.zeros_like(completion_ids)
    for row in range(completion_ids.shape[0]):
        length = int(completion_mask[row].sum())
        ends = sentence_ends(token_texts(tokenizer, completion_ids[row, :length].tolist(), cache))
        index = 0
        for t, end in enumerate(ends):
            out[row, t] = index
            index += end
        out[row, length:] = max(0, index - 1) if ends and ends[-1] else index
    return out


def segment_mean(values: torch.Tensor, segments: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every position's value replaced by the mean over the unmasked positions of its segment (differentiable)."""
    mask = mask.to(values.dtype)
    sums = torch.zeros_like(values).scatter_add(1, segments, values * mask)
    counts = torch.zeros_like(values).scatter_add(1, segments, mask)
    return (sums / counts.clamp(min=1.0)).gather(1, segments)

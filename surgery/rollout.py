"""Sampling completions from an upgraded model through the fast KDA path (`kda.student_extend`), for RL rollouts.

transformers' own `generate` runs the prompt through its reference `chunk_kda` fallback when flash-linear-attention
is missing; on the CPU demo's model that prefill took 30 s for 16 prompts of 130 tokens, more than the whole decode.
Here each distinct prompt is run once (RL asks for several completions of the same prompt, so a group needs no
padding at all), its state is copied to the group's rows, and the rows decode together one token at a time, each
step exact (`student_extend` continues a state as if the whole sequence were run at once). Rows that end keep
stepping until the group ends (their later tokens are dropped), so every row stays the length of the group.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ling_surgery.surgery.kda import StudentState, student_extend


def expand_state(state: StudentState, rows: int) -> StudentState:
    """The state of one sequence copied to `rows` rows (views, no copy: `student_extend` never writes into a state)."""
    def grow(tensor):
        return tensor.expand(rows, *tensor.shape[1:])

    layers = tuple(replace(layer, conv_tail=grow(layer.conv_tail), recurrent=grow(layer.recurrent))
                   if hasattr(layer, "recurrent") else tuple(grow(t) for t in layer) for layer in state.layers)
    return StudentState(state.length, layers)


def warpers(temperature: float, top_p: float, top_k: int) -> LogitsProcessorList:
    """The logits warpers `generate` would apply for these settings, in its order (temperature, top-k, top-p)."""
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


@torch.no_grad()
def sample_group(model, prompt_ids: list[int], rows: int, max_new_tokens: int, eos_ids: list[int],
                 do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 chunk_size: int = 32) -> list[list[int]]:
    """`rows` completions of one prompt: each up to and including its first EOS token, at most `max_new_tokens`."""
    device = model.lm_head.weight.device
    hidden, state = student_extend(model, torch.tensor([prompt_ids], device=device), None, chunk_size)
    state = expand_state(state, rows)
    logits = model.lm_head(hidden[:, -1]).float().expand(rows, -1)
    process = warpers(temperature, top_p, top_k) if do_sample else LogitsProcessorList()
    eos = torch.tensor(eos_ids, device=device)
    tokens, done = [], torch.zeros(rows, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        scores = process(None, logits)
        if do_sample:
            step = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)
        else:
            step = scores.argmax(dim=-1)
        tokens.append(step)
        done |= torch.isin(step, eos)
        if bool(done.all()) or len(tokens) == max_new_tokens:
            break
        hidden, state = student_extend(model, step[:, None], state, 1)
        logits = model.lm_head(hidden[:, -1]).float()
    out = torch.stack(tokens, dim=1).tolist()
    return [_until_eos(row, set(eos_ids)) for row in out]


def _until_eos(row: list[int], eos: set[int]) -> list[int]:
    for index, token in enumerate(row):
        if token in eos:
            return row[: index + 1]
    return row


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_width: int,
                     temperature: float = 1.0, compute_entropy: bool = False, chunk_size: int = 32):
    """Per-token log-probabilities (and entropies) of the completions in a GRPO batch, through the fast KDA path.

    `input_ids` is TRL's layout: left-padded prompts, then right-padded completions (the last `completion_width`
    columns). Rows with the same prompt share one forward of it (a group's rows differ only in their completions):
    its state is copied to the rows and each completion continues from there, so gradients reach the prompt's
    positions once per row, as a forward of every row would give them. Log-probabilities are of the logits divided by
    `temperature`, as TRL scores them. Returns (B, completion_width) tensors, zero past each completion.
    """
    prompts, completions = input_ids[:, :-completion_width], input_ids[:, -completion_width:]
    prompt_mask, completion_mask = attention_mask[:, :-completion_width], attention_mask[:, -completion_width:]
    batch = input_ids.shape[0]
    logps = [None] * batch
    entropies = [None] * batch
    by_prompt: dict[tuple, list[int]] = {}
    for row in range(batch):
        by_prompt.setdefault(tuple(prompts[row][prompt_mask[row].bool()].tolist()), []).append(row)
    for prompt, rows in by_prompt.items():
        width = max(1, int(completion_mask[rows].sum(dim=1).max()))
        hidden, state = student_extend(model, torch.tensor([prompt], device=input_ids.device), None, chunk_size)
        tokens = completions[rows, :width]
        continued, _ = student_extend(model, tokens, expand_state(state, len(rows)), chunk_size)
        # The hidden state before each completion token: the prompt's last, then the completion's own.
        before = torch.cat([hidden[:, -1:].expand(len(rows), 1, -1), continued[:, :-1]], dim=1)
        log_probs = torch.log_softmax(model.lm_head(before).float() / temperature, dim=-1)
        picked = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        if compute_entropy:
            with torch.no_grad():
                entropy = -(log_probs.exp() * log_probs).sum(-1)
        for index, row in enumerate(rows):
            logps[row] = torch.nn.functional.pad(picked[index], (0, completion_width - width))
            if compute_entropy:
                entropies[row] = torch.nn.functional.pad(entropy[index], (0, completion_width - width))
    return torch.stack(logps), (torch.stack(entropies) if compute_entropy else None)

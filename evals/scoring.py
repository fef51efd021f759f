"""Scoring primitives: a loaded model, batched token log-likelihoods, greedy generation, answer extraction, errors.

Log-likelihoods follow lm-evaluation-harness: the context and the continuation are tokenised together and the
continuation is what follows the context's own tokens (so merges across the boundary are scored as the model sees
them); a context's trailing space moves to the continuation. Batches are right-padded without an attention mask:
every model here is causal (softmax attention and the linear-attention recurrence alike), so padding after a
sequence never changes its real positions.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch

from ling_surgery.surgery.errors import SurgeryError


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    chunk_size: int = 32

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def scoring_kernels(self) -> str:
        if self.model_type == "bailing_hybrid":
            return "KDA: ling-surgery chunk_kda (exact, parity-tested); MLA: torch SDPA"
        return "torch SDPA"

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states (B, T, D)."""
        if self.model_type == "bailing_hybrid":
            from ling_surgery.surgery.kda import student_hidden

            return student_hidden(self.model, input_ids, self.chunk_size)
        return self.model.model(input_ids=input_ids, use_cache=False).last_hidden_state

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def score(self, sequences, starts, batch_tokens: int = 4096, max_length: int | None = None, progress=None):
        return score_tokens(self, sequences, starts, batch_tokens, max_length, progress)

    def score_shared(self, sequences, starts, progress=None, at_end=None):
        return score_shared(self, sequences, starts, progress, at_end)

    def extend(self, input_ids: list[int], state=None, piece: int = 2048):
        """(final normed hidden states (T, D), the state after them) for tokens that continue `state` (None: the
        start of a sequence). A state can be continued any number of times: a prefix runs once for all its branches.

        A segment after a cached prefix runs in pieces of `piece` tokens: its attention needs an explicit mask, and
        SDPA computes every masked-out pair of a mask, so one long segment would pay for its causal half twice (at
        the start of a sequence SDPA's own causal mask skips them). Measured on 2 cores with masked SDPA, 4k tokens
        after 4k: pieces of 512 / 1k / 2k / 4k took 35 / 32 / 27 / 36 s (SmolLM2-135M). Teachers on CPU now attend
        without a mask (`prefix_attention`); upgraded models' MLA layers and other devices still use one.
        """
        hidden, begin = [], 0
        while begin < len(input_ids):
            end = len(input_ids) if state is None else begin + piece
            ids = torch.tensor([input_ids[begin:end]], device=self.device)
            out, state = self._extend(ids, state, forked=begin > 0)
            hidden.append(out[0])
            begin = end
        return (torch.cat(hidden) if hidden else None), state

    def _extend(self, ids: torch.Tensor, state, forked: bool):
        from transformers import PreTrainedModel

        if self.model_type == "bailing_hybrid":
            from ling_surgery.surgery.kda import student_extend

            return student_extend(self.model, ids, state, self.chunk_size)  # immutable states: nothing to fork
        if isinstance(self.model, PreTrainedModel):
            if self.model.config._attn_implementation == "sdpa" and self.device.type == "cpu":
                from ling_surgery.evals import prefix_attention

                self.model.set_attn_implementation(prefix_attention.register())  # SDPA, masks split where exact
            cache = state if state is None or forked else fork_cache(state)
            out = self.model.model(input_ids=ids, past_key_values=cache, use_cache=True)
            return out.last_hidden_state, out.past_key_values
        # A model without a cache (the tests' hand-made ones): the state is the prefix itself, recomputed.
        prefix = state if state is not None else ids[:, :0]
        whole = torch.cat([prefix, ids], dim=1)
        return self.hidden(whole)[:, prefix.shape[1] :], whole

    def generate(self, prompt: str | list[int], max_new_tokens: int = 256, stop: tuple[str, ...] = ("\n\n", "Question:")):
        return generate(self, prompt, max_new_tokens, stop)

    @property
    def max_length(self) -> int:
        """The longest context the model was built for (its position table / RoPE training length)."""
        return getattr(self.model.config, "max_position_embeddings", None) or 4096


def load_for_eval(model: str, device: str = "auto", chunk_size: int = 32) -> LoadedModel:
    """A model to evaluate: a run folder (its model/), an exported folder, a .gguf, a hub id or an embedded name."""
    from ling_surgery.surgery import sources

    source = sources.resolve_source(model)
    config = sources.load_config(source)
    if "ForCausalLM" not in "".join(getattr(config, "architectures", None) or ["ForCausalLM"]):
        raise SurgeryError(f"{model!r} is not a causal language model (architectures: {config.architectures})")
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    # fp32 on CPU (bf16 is ~400x slower there); bf16 on CUDA.
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    loaded, tokenizer = sources.load_model(source, dtype, str(target))
    return LoadedModel(source.name, loaded, tokenizer, target, chunk_size)


@dataclass
class Scored:
    logprobs: torch.Tensor  # (n,) log p of each scored token given everything before it
    greedy: torch.Tensor  # (n,) bool: the token is the argmax


def split_context(lm: LoadedModel, context: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of context+continuation and where the continuation starts (lm-evaluation-harness convention)."""
    trailing = len(context) - len(context.rstrip(" "))
    if trailing:
        context, continuation = context[:-trailing], context[-trailing:] + continuation
    whole = lm.encode(context + continuation)
    start = len(lm.encode(context))
    if start == 0:  # nothing to condition on: score from the first token after a document separator
        eos = lm.tokenizer.eos_token_id
        whole, start = [eos if eos is not None else 0] + whole, 1
    return whole, min(start, len(whole) - 1)


@torch.no_grad()
def score_tokens(lm: LoadedModel, sequences: list[list[int]], starts: list[int], batch_tokens: int = 4096,
                 max_length: int | None = None, progress=None) -> list[Scored]:
    """Per sequence, log p(token_t | tokens_<t) and greedy-ness for t ≥ start; longest first, batched by tokens."""
    max_length = max_length or getattr(lm.model.config, "max_position_embeddings", 4096)
    results: list[Scored | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    i = 0
    while i < len(order):
        longest = min(len(sequences[order[i]]), max_length)
        batch = order[i : i + max(1, batch_tokens // max(1, longest))]
        i += len(batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        kept = []
        for row, index in enumerate(batch):
            seq = sequences[index][-max_length:]  # left-truncate over-long contexts
            ids[row, : len(seq)] = torch.tensor(seq)
            kept.append((len(seq), max(1, starts[index] - (len(sequences[index]) - len(seq)))))
        hidden = lm.hidden(ids.to(lm.device))
        for row, index in enumerate(batch):
            length, start = kept[row]
            logits = lm.model.lm_head(hidden[row, start - 1 : length - 1]).float()
            targets = ids[row, start:length].to(lm.device)
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
            results[index] = Scored(logprobs.cpu(), (logits.argmax(-1) == targets).cpu())
        if progress is not None:
            progress(len(batch), sum(length for length, _ in kept))
    return results


def fork_cache(cache):
    """A transformers cache that can grow without touching `cache`: dynamic layers grow by concatenation (new
    tensors), so their tensors are shared; any other layer kind (static, recurrent) is copied."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    forked = copy.copy(cache)
    forked.layers = [copy.copy(layer) if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else copy.deepcopy(layer)
                     for layer in cache.layers]
    return forked


@dataclass
class _PrefixNode:
    start: int  # the tokens [start, end) of every member sequence are the same
    end: int
    members: list[int]
    children: list["_PrefixNode"]

    def size(self) -> int:
        return self.end - self.start + sum(child.size() for child in self.children)


def prefix_tree(sequences: list[list[int]], members: list[int] | None = None, start: int = 0) -> _PrefixNode:
    """The sequences as a radix tree: each node the longest run all its members share, children split on the next token."""
    import numpy as np

    members = list(range(len(sequences))) if members is None else members
    end = min(len(sequences[i]) for i in members)
    first = np.asarray(sequences[members[0]][start:end])
    for i in members[1:]:
        differs = np.flatnonzero(first[: end - start] != np.asarray(sequences[i][start:end]))
        if len(differs):
            end = start + int(differs[0])
    groups: dict[int, list[int]] = {}
    for i in members:
        if len(sequences[i]) > end:
            groups.setdefault(sequences[i][end], []).append(i)
    return _PrefixNode(start, end, members, [prefix_tree(sequences, group, end) for group in groups.values()])


@torch.no_grad()
def score_shared(lm: LoadedModel, sequences: list[list[int]], starts: list[int], progress=None,
                 at_end=None) -> list[Scored]:
    """What `score_tokens` gives, but every prefix shared by several sequences runs once: the sequences form a prefix
    tree, walked depth first, each branch continuing its parent's cache or recurrent state (`LoadedModel.extend`).
    Recall items share their haystack, so the questions asked of one haystack reuse its cache.

    `at_end(i, state, last_hidden)` is called where sequence i ends, with the state there (to decode from it)."""
    logprobs: list[list[torch.Tensor]] = [[] for _ in sequences]
    greedy: list[list[torch.Tensor]] = [[] for _ in sequences]

    def visit(node: _PrefixNode, state) -> None:
        tokens = sequences[node.members[0]]
        if node.end > node.start:
            hidden, state = lm.extend(tokens[node.start : node.end], state)
            for i in node.members:
                # Token t is scored from the hidden state at t − 1.
                low, high = max(node.start, starts[i] - 1), min(node.end, len(sequences[i]) - 1)
                if low < high:
                    logits = lm.model.lm_head(hidden[low - node.start : high - node.start]).float()
                    targets = torch.tensor(sequences[i][low + 1 : high + 1], device=logits.device)
                    logprobs[i].append(torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0].cpu())
                    greedy[i].append((logits.argmax(-1) == targets).cpu())
            if progress is not None:
                progress(0, node.end - node.start)
            for i in node.members:
                if at_end is not None and len(sequences[i]) == node.end:
                    at_end(i, state, hidden[-1])
        # Smallest branch first: the largest one continues the state last, when no sibling needs it any more.
        for child in sorted(node.children, key=_PrefixNode.size):
            visit(child, state)

    visit(prefix_tree(sequences), None)
    return [Scored(torch.cat(lp) if lp else torch.zeros(0), torch.cat(g) if g else torch.zeros(0, dtype=torch.bool))
            for lp, g in zip(logprobs, greedy)]


@torch.no_grad()
def greedy_continuation(lm: LoadedModel, state, last_hidden: torch.Tensor, max_new_tokens: int,
                        stop: tuple[str, ...] = ("\n",)) -> tuple[str, int]:
    """Greedy decoding from a state `LoadedModel.extend` returned (cached: one token per step), as `generate` decodes
    from a prompt; `last_hidden` is the hidden state of the state's last token. The state itself is left as it was."""
    eos = lm.tokenizer.eos_token_id
    new: list[int] = []
    text = ""
    while len(new) < max_new_tokens:
        token = int(lm.model.lm_head(last_hidden).argmax())
        if token == eos:
            break
        new.append(token)
        text = lm.tokenizer.decode(new, skip_special_tokens=True)
        if any(marker in text for marker in stop):
            break
        hidden, state = lm.extend([token], state)
        last_hidden = hidden[-1]
    for marker in stop:
        text = text.split(marker)[0]
    return text, len(new)


@torch.no_grad()
def generate(lm: LoadedModel, prompt: str | list[int], max_new_tokens: int = 256,
             stop: tuple[str, ...] = ("\n\n", "Question:")) -> tuple[str, int]:
    """Greedy generation with the stock model and its cache (what serving runs); returns (text, new tokens).

    `prompt` is text, or token ids used as they are."""
    ids = torch.tensor([prompt if isinstance(prompt, list) else lm.encode(prompt)], device=lm.device)
    out = lm.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
        stop_strings=list(stop), tokenizer=lm.tokenizer,
        pad_token_id=lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id,
    )
    new = out[0, ids.shape[1]:]
    text = lm.tokenizer.decode(new, skip_special_tokens=True)
    for marker in stop:
        text = text.split(marker)[0]
    return text, int(len(new))


_ANSWER = re.compile(r"answer is\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def extract_number(text: str) -> str | None:
    """GSM8K-style answer extraction: "… the answer is N", else the last number in the text (OLMES gsm8k)."""
    found = _ANSWER.findall(text) or _NUMBER.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "").rstrip(".")


def same_number(predicted: str | None, gold: str) -> bool:
    if predicted is None:
        return False
    try:
        return math.isclose(float(predicted), float(gold.replace(",", "")), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return predicted.strip() == gold.strip()


def binomial_stderr(successes: int, n: int) -> float:
    """Standard error of an accuracy over n independent items: sqrt(p(1 − p)/n)."""
    if n == 0:
        return float("nan")
    p = successes / n
    return math.sqrt(p * (1 - p) / n)

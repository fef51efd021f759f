"""Scoring primitives: a loaded model, batched token log-likelihoods, greedy generation, answer extraction, errors.

Log-likelihoods follow lm-evaluation-harness: the context and the continuation are tokenised together and the
continuation is what follows the context's own tokens (so merges across the boundary are scored as the model sees
them); a context's trailing space moves to the continuation. Batches are right-padded without an attention mask:
every model here is causal (softmax attention and the linear-attention recurrence alike), so padding after a
sequence never changes its real positions.
"""

from __future__ import annotations

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

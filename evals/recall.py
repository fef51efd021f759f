"""Long-context recall: passkey retrieval and needle-in-a-haystack, synthetic and seeded, so nothing is downloaded.

| task      | haystack                                   | needle(s)                                              | asked            |
|-----------|--------------------------------------------|--------------------------------------------------------|------------------|
| `passkey` | the classic repeated filler sentences      | "The pass key is 71520. Remember it. 71520 is …"        | the pass key     |
| `niah`    | packaged prose (held-out Wikipedia leads)  | single: one "special magic number" for a key           | that number      |
|           |                                            | multikey: the same plus 3 distractor keys and numbers  | the target's     |

`passkey` is the test of Mohtashami & Jaggi (2023, "Landmark Attention", §4.2) with their prompt; `niah` follows RULER
(Hsieh et al. 2024, `niah_single_2` / `niah_multikey_1`): 7-digit values, "adjective-noun" keys. Every item is a
(length, depth) cell of a grid: the prompt is `length` tokens in all and the target needle sits at `depth` (0 = the
start of the haystack, 1 = its end), snapped to the nearest sentence end. Items depend only on the seed and the
tokenizer, so a teacher and its upgraded model see the very same tokens.

Scoring is greedy decoding, computed teacher-forced: an item counts when every token of the answer is the argmax
given the prompt and the answer's earlier tokens, which is exactly when greedy generation emits the answer first.
That takes one forward pass per item (the fast exact KDA path for upgraded models) instead of a cached prefill plus a
decode loop, and a few items per model are also decoded for real so the report shows what the model says.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ling_surgery.surgery.errors import SurgeryError

CPU_LENGTHS = (512, 1024, 2048, 4096, 8192)
GPU_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)  # each model keeps those it allows
# Measured on 2 cores (one item, SmolLM2-135M): 512 → 8k tokens cost 1 → 44 s for the teacher, 3 → 32 s upgraded.
CPU_DEPTHS = (0.0, 0.5, 1.0)
GPU_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.\n")
ADJECTIVES = ("wise", "quiet", "brave", "ancient", "bitter", "bright", "calm", "clever", "crooked", "eager", "faint",
              "fierce", "gentle", "hollow", "humble", "jolly", "lively", "lonely", "proud", "rapid", "silent", "tame")
NOUNS = ("bird", "river", "lantern", "meadow", "harbor", "falcon", "canyon", "violin", "garden", "engine", "island",
         "pepper", "saddle", "thunder", "window", "beacon", "compass", "marble", "orchard", "spider", "tunnel", "walrus")
NIAH_DISTRACTORS = 3  # multikey: other keys with their own numbers, at random depths


@dataclass(frozen=True)
class RecallItem:
    prompt: list[int]  # token ids, question included
    answer: list[int]  # token ids of the expected continuation
    gold: str
    length: int
    depth: float
    variant: str


def grid_docs(task: str, lengths, depths, per_cell: int, seed: int) -> list[dict]:
    """The task's documents: one per (variant, length, depth, sample), each with its own seed."""
    variants = ("passkey",) if task == "passkey" else ("single", "multikey")
    rng = random.Random(f"{task}-{seed}")
    return [{"variant": v, "length": int(n), "depth": float(d), "seed": rng.randrange(2**31)}
            for v in variants for n in lengths for d in depths for _ in range(per_cell)]


class HaystackBuilder:
    """Builds recall prompts for one tokenizer; the prose haystack is tokenised once and sliced per item."""

    def __init__(self, encode, token_texts, prose: list[str] | None = None):
        self.encode = encode  # text → ids, no special tokens
        self.token_texts = token_texts  # ids → their text pieces (to find sentence ends)
        self._prose_docs = prose
        self._prose_ids: list[int] | None = None
        self._filler_ids = encode(PASSKEY_FILLER)

    def prose_ids(self, at_least: int) -> list[int]:
        if self._prose_ids is None or len(self._prose_ids) < at_least:
            docs, text, ids = self._prose_docs or [], "", []
            for doc in docs:
                text += "\n" + doc
                if len(text) > 6 * at_least:  # > 1 token per 6 characters for any real tokenizer
                    break
            ids = self.encode(text)
            if len(ids) < at_least:
                ids = ids * (at_least // max(1, len(ids)) + 1)  # a tiny corpus repeats (user text, tests)
            self._prose_ids = ids
        return self._prose_ids

    def item(self, doc: dict) -> RecallItem:
        rng = random.Random(doc["seed"])
        if doc["variant"] == "passkey":
            key = str(rng.randint(10000, 99999))
            intro = self.encode(PASSKEY_INTRO)
            needles = [(self.encode(f" The pass key is {key}. Remember it. {key} is the pass key."), doc["depth"])]
            question = self.encode(" What is the pass key? The pass key is")
            answer = self.encode(f" {key}")
            filler = self._filler_ids
            repeats = doc["length"] // max(1, len(filler)) + 2
            haystack_pool, offset = filler * repeats, 0
        else:
            keys = rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], 1 + NIAH_DISTRACTORS)
            values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
            count = 1 if doc["variant"] == "single" else len(keys)
            intro = self.encode(NIAH_INTRO)
            needles = [(self.encode(f" One of the special magic numbers for {keys[0]} is: {values[0]}."), doc["depth"])]
            needles += [(self.encode(f" One of the special magic numbers for {k} is: {v}."), rng.random())
                        for k, v in zip(keys[1:count], values[1:count])]
            question = self.encode(f"\nWhat is the special magic number for {keys[0]} mentioned in the provided text? "
                                   f"The special magic number for {keys[0]} mentioned in the provided text is")
            answer = self.encode(f" {values[0]}")
            key = values[0]
            pool = self.prose_ids(4 * doc["length"])
            start = rng.randrange(max(1, len(pool) - 2 * doc["length"]))
            haystack_pool, offset = pool, self._sentence_end(pool, start)  # start on a sentence
        budget = doc["length"] - len(intro) - sum(len(n) for n, _ in needles) - len(question) - len(answer)
        if budget < doc["length"] // 4:
            fixed = doc["length"] - budget
            raise SurgeryError(f"recall length {doc['length']}: the {doc['variant']} prompt's {fixed} tokens of intro, "
                               f"needles and question leave too little haystack; use lengths of at least {-(-4 * fixed // 3)}")
        haystack = haystack_pool[offset : offset + budget]
        # Insert needles deepest first so earlier insertion points stay valid.
        for ids, depth in sorted(needles, key=lambda n: -n[1]):
            at = self._sentence_end(haystack, round(depth * len(haystack)))
            haystack = haystack[:at] + ids + haystack[at:]
        return RecallItem(intro + haystack + question, answer, key, doc["length"], doc["depth"], doc["variant"])

    def _sentence_end(self, ids: list[int], target: int) -> int:
        """The insertion point nearest `target` that follows a token ending a sentence (or the haystack's ends)."""
        if target <= 0 or target >= len(ids):
            return max(0, min(target, len(ids)))
        for step in range(0, 64):
            for at in (target - step, target + step):
                if 0 < at < len(ids) and self.token_texts(ids[at - 1]).rstrip().endswith((".", "\n")):
                    return at
        return target


def recall_result(items: list[RecallItem], correct: list[bool], samples: list[dict], skipped: list[int]) -> dict:
    """Accuracy overall, per variant and per (length, depth) cell, with binomial standard errors."""
    from ling_surgery.evals.scoring import binomial_stderr

    n, hits = len(items), sum(correct)
    grids: dict[str, dict] = {}
    for item, ok in zip(items, correct):
        cells = grids.setdefault(item.variant, {}).setdefault(str(item.length), {})
        cell = cells.setdefault(f"{item.depth:g}", [0, 0])
        cell[0] += int(ok)
        cell[1] += 1
    variants = {
        variant: {
            "acc": sum(c[0] for row in cells.values() for c in row.values()) / sum(c[1] for row in cells.values() for c in row.values()),
            "by_length": {length: sum(c[0] for c in row.values()) / sum(c[1] for c in row.values()) for length, row in cells.items()},
            "grid": {length: {depth: c[0] / c[1] for depth, c in row.items()} for length, row in cells.items()},
        }
        for variant, cells in grids.items()
    }
    return {"kind": "recall", "n": n, "tokens": sum(len(i.prompt) + len(i.answer) for i in items),
            "acc": hits / n if n else 0.0, "acc_stderr": binomial_stderr(hits, n), "variants": variants,
            "skipped_lengths": skipped, "chance": 0.0, "primary": "acc", "value": hits / n if n else 0.0,
            "stderr": binomial_stderr(hits, n), "samples": samples}

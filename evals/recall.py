"""Long-context recall: passkey retrieval and needle-in-a-haystack, synthetic and seeded, so nothing is downloaded.

| task      | haystack                                   | needle(s)                                              | asked            |
|-----------|--------------------------------------------|--------------------------------------------------------|------------------|
| `passkey` | the classic repeated filler sentences      | "The pass key is 71520. Remember it. 71520 is …"        | the pass key     |
| `niah`    | packaged prose (held-out Wikipedia leads)  | single: one "special magic number" for a key           | that number      |
|           |                                            | multikey: every depth's needle in one haystack (the    | each in turn     |
|           |                                            | others its distractors), at least 1 + 3 needles        |                  |

`passkey` is the test of Mohtashami & Jaggi (2023, "Landmark Attention", §4.2) with their prompt; `niah` follows RULER
(Hsieh et al. 2024, `niah_single_2` / `niah_multikey_1`): 7-digit values, "adjective-noun" keys. Every item is a
(length, depth) cell of a grid: the prompt is `length` tokens in all and the target needle sits at `depth` (0 = the
start of the haystack, 1 = its end), snapped to the nearest sentence end. Items depend only on the seed and the
tokenizer, so a teacher and its upgraded model see the very same tokens.

Scoring is greedy decoding, computed teacher-forced: an item counts when every token of the answer is the argmax
given the prompt and the answer's earlier tokens, which is exactly when greedy generation emits the answer first.
The cells of one sample are built to share prefixes (one haystack stream read from its start at every length, one
key per depth, a multikey haystack asked once per depth), and the items are scored as a prefix tree: each shared
prefix runs once and every branch continues its cache or recurrent state (`scoring.score_shared`). That halves the
tokens run for `passkey` and `niah/single` and cuts `niah/multikey` to a third. A few items per model are also
decoded for real, from the cache at the end of their question, so the report shows what the model says.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ling_surgery.surgery.errors import SurgeryError

CPU_LENGTHS = (512, 1024, 2048, 4096, 8192)
GPU_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)  # each model keeps those it allows
# One 8k-token forward on 2 cores: 38 s for SmolLM2-135M (30 softmax layers: half of it attention), ~30 s upgraded.
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
    """The task's documents: one per (variant, sample, length, depth). The cells of one sample share its haystack
    and its keys (one per depth), so their prompts share prefixes that a cache computes once (see `HaystackBuilder`)."""
    variants = ("passkey",) if task == "passkey" else ("single", "multikey")
    rng = random.Random(f"{task}-{seed}")
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    # niah's two variants of a sample share the prose, keys and numbers: a multikey prompt then starts as the
    # single-needle prompt with the same first needle, and continues its cache up to the next needle.
    samples = [rng.randrange(2**31) for _ in range(per_cell)]
    return [{"variant": v, "length": n, "depth": d, "seed": sample_seed, "depths": depths, "longest": max(lengths)}
            for v in variants for sample_seed in samples for n in lengths for d in depths]


class HaystackBuilder:
    """Builds recall prompts for one tokenizer; the prose haystack is tokenised once and sliced per item.

    Items of one sample are built to share as much prefix as the task allows, so asking them costs far less than
    one forward pass each: every length reads the same haystack stream from its start, and a depth's key is the same
    at every length. Depth-0 items of all lengths then share intro + needle + haystack, items at other depths share
    intro + the haystack up to their needle, and a multikey haystack (every depth's needle in one text) is asked once
    per depth from one cache.
    """

    def __init__(self, encode, token_texts, prose: list[str] | None = None):
        self.encode = encode  # text → ids, no special tokens
        self.token_texts = token_texts  # ids → their text pieces (to find sentence ends)
        self._prose_docs = prose
        self._prose_ids: dict[int, list[int]] = {}
        self._filler_ids = encode(PASSKEY_FILLER)

    def prose_ids(self, at_least: int) -> list[int]:
        """The prose stream, the same for every item that asks for the same size."""
        if at_least not in self._prose_ids:
            docs, text = self._prose_docs or [], ""
            for doc in docs:
                text += "\n" + doc
                if len(text) > 6 * at_least:  # > 1 token per 6 characters for any real tokenizer
                    break
            ids = self.encode(text)
            if len(ids) < at_least:
                ids = ids * (at_least // max(1, len(ids)) + 1)  # a tiny corpus repeats (user text, tests)
            self._prose_ids[at_least] = ids
        return self._prose_ids[at_least]

    def item(self, doc: dict) -> RecallItem:
        rng = random.Random(doc["seed"])
        depths = doc.get("depths") or [doc["depth"]]
        target = depths.index(doc["depth"])
        if doc["variant"] == "passkey":
            keys = [str(rng.randint(10000, 99999)) for _ in depths]
            key = keys[target]
            intro = self.encode(PASSKEY_INTRO)
            needles = [(self.encode(f" The pass key is {key}. Remember it. {key} is the pass key."), doc["depth"])]
            question = self.encode(" What is the pass key? The pass key is")
            answer = self.encode(f" {key}")
            haystack_pool, offset = self._filler_ids * (doc["length"] // max(1, len(self._filler_ids)) + 2), 0
            placing = 0
        else:
            distractors = max(0, 1 + NIAH_DISTRACTORS - len(depths)) if doc["variant"] == "multikey" else 0
            names = rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], len(depths) + NIAH_DISTRACTORS)
            values = [str(rng.randint(1_000_000, 9_999_999)) for _ in names]
            longest = doc.get("longest", doc["length"])
            pool = self.prose_ids(4 * longest)
            offset = self._sentence_end(pool, rng.randrange(max(1, len(pool) - 2 * longest)))
            haystack_pool = pool
            # multikey: every depth's needle in one haystack (each the others' distractor), topped up to RULER's
            # 1 + 3 needles; single: the target's needle alone.
            placed = list(range(len(depths))) if doc["variant"] == "multikey" else [target]
            # Top-up needles go after the middle (drawn per length), so the prompt shares its first half with the
            # single-needle one.
            extra = random.Random(f"{doc['seed']}-{doc['length']}")
            spots = [(i, depths[i]) for i in placed] + [(len(depths) + j, extra.uniform(0.5, 1.0))
                                                        for j in range(distractors)]
            intro = self.encode(NIAH_INTRO)
            needles = [(self.encode(f" One of the special magic numbers for {names[i]} is: {values[i]}."), depth)
                       for i, depth in spots]
            asked = [(self._niah_question(names[i]), self.encode(f" {values[i]}")) for i in placed]
            question, answer = asked[placed.index(target)]
            key = values[target]
            # The needles are placed as for the longest question asked of this haystack, so every question of a
            # multikey prompt follows the very same haystack (a shorter one gets a few more tokens at its end).
            placing = max(len(q) + len(a) for q, a in asked) - len(question) - len(answer)
        budget = doc["length"] - len(intro) - sum(len(n) for n, _ in needles) - len(question) - len(answer)
        if budget < doc["length"] // 4:
            fixed = doc["length"] - budget
            raise SurgeryError(f"recall length {doc['length']}: the {doc['variant']} prompt's {fixed} tokens of intro, "
                               f"needles and question leave too little haystack; use lengths of at least {-(-4 * fixed // 3)}")
        haystack = haystack_pool[offset : offset + budget]
        # Insertion points are found on the bare haystack, then filled from the deepest so the others stay valid.
        placed_on = haystack[: len(haystack) - placing]
        points = sorted(((self._sentence_end(placed_on, round(depth * len(placed_on))), ids) for ids, depth in needles),
                        key=lambda point: -point[0])
        for at, ids in points:
            haystack = haystack[:at] + ids + haystack[at:]
        return RecallItem(intro + haystack + question, answer, key, doc["length"], doc["depth"], doc["variant"])

    def _niah_question(self, name: str) -> list[int]:
        return self.encode(f"\nWhat is the special magic number for {name} mentioned in the provided text? "
                           f"The special magic number for {name} mentioned in the provided text is")

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

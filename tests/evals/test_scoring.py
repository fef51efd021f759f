"""Scoring: the multiple-choice scorer against a hand-computed bigram example, batching parity, answer extraction."""

import math

import pytest
import torch
from helpers import char_tokenizer, tiny_model

from ling_surgery.evals.evaluate import choice_task
from ling_surgery.evals.scoring import (
    LoadedModel,
    binomial_stderr,
    extract_number,
    greedy_continuation,
    prefix_tree,
    same_number,
    score_shared,
    score_tokens,
    split_context,
)
from ling_surgery.evals.tasks import TASKS, Task


class BigramLM(torch.nn.Module):
    """p(next | previous) from a table: hidden = one-hot(previous), lm_head = log-table. Every score is by hand."""

    def __init__(self, log_table: torch.Tensor):
        super().__init__()
        vocab = log_table.shape[0]
        self.config = type("Config", (), {"model_type": "bigram", "max_position_embeddings": 64})()
        self.lm_head = torch.nn.Linear(vocab, vocab, bias=False)
        self.lm_head.weight.data = log_table.T.clone()  # logits[next] = log p(next | prev)

        class Body(torch.nn.Module):
            def forward(self, input_ids, use_cache=False):
                return type("Out", (), {"last_hidden_state": torch.nn.functional.one_hot(input_ids, vocab).float()})()

        self.model = Body()

    def generate(self, ids, max_new_tokens=4, **_):
        """Greedy: the most likely next character after the last one."""
        for _ in range(max_new_tokens):
            nxt = self.lm_head(self.model(ids).last_hidden_state[:, -1]).argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        return ids


def _bigram():
    tok = char_tokenizer()
    ids = {c: tok.convert_tokens_to_ids(c) for c in "abz "}
    vocab = len(tok)
    probs = torch.full((vocab, vocab), 1e-9)
    # Hand-picked next-character probabilities (each row sums to 1 over a, b, z, space).
    table = {"a": {" ": 0.5, "a": 0.1, "b": 0.2, "z": 0.2}, " ": {"a": 0.6, "b": 0.3, "z": 0.1},
             "b": {"b": 0.9, "a": 0.05, "z": 0.05}, "z": {" ": 1.0}}
    for prev, row in table.items():
        for nxt, p in row.items():
            probs[ids[prev], ids[nxt]] = p
    probs = probs / probs.sum(-1, keepdim=True)
    return LoadedModel("bigram", BigramLM(probs.log()), tok, torch.device("cpu")), table


def test_choice_scorer_matches_a_hand_computed_example():
    lm, p = _bigram()
    # Context "a", choices " a" and " bbb" (the context's own trailing space would move to the choice).
    # log p(" a" | "a")   = log p(' '|a) + log p(a|' ')                          = log .5 + log .6
    # log p(" bbb" | "a") = log p(' '|a) + log p(b|' ') + 2 log p(b|b)           = log .5 + log .3 + 2 log .9
    by_hand = {" a": math.log(0.5) + math.log(0.6), " bbb": math.log(0.5) + math.log(0.3) + 2 * math.log(0.9)}
    seqs, starts = zip(*(split_context(lm, "a", c) for c in by_hand))
    scored = score_tokens(lm, list(seqs), list(starts))
    for s, expected in zip(scored, by_hand.values()):
        assert s.logprobs.sum().item() == pytest.approx(expected, abs=1e-5)
    # Summed: " a" (−1.204) beats " bbb" (−2.108). Per character: " a" −0.602/char loses to " bbb" −0.527/char.
    doc = {"contexts": ["a", "a"], "continuations": [" a", " bbb"], "gold": 1}
    result = choice_task(lm, Task(TASKS["arc_easy"], [doc], 1), console=_quiet())
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0 and result["n"] == 1
    assert result["value"] == result["acc_norm"]  # arc_easy's primary metric is the length-normalised one


def test_generated_letters_match_log_likelihood_for_a_model_forced_to_one_answer():
    """A model that always says " A" (log-likelihood and generation alike) scores the same in both formats."""
    tok = char_tokenizer()
    vocab = len(tok)
    ids = {c: tok.convert_tokens_to_ids(c) for c in ": A\n"}
    probs = torch.full((vocab, vocab), 1e-6)
    probs[:, ids[" "]] = 1.0  # after anything else: a space
    probs[ids[" "], ids["A"]] = 1000.0  # after a space: "A"
    probs[ids["A"], ids["\n"]] = 1000.0  # after "A": end of line
    probs = probs / probs.sum(-1, keepdim=True)
    lm = LoadedModel("always-A", BigramLM(probs.log()), tok, torch.device("cpu"))
    golds = [0, 1, 0, 2, 3, 0]
    docs = [{"contexts": [f"Question: item {i}?\nAnswer:"] * 4, "continuations": [" A", " B", " C", " D"], "gold": g}
            for i, g in enumerate(golds)]
    result = choice_task(lm, Task(TASKS["arc_easy"], docs, len(docs)), console=_quiet())
    assert result["acc"] == result["acc_norm"] == result["gen_acc"] == 0.5 and result["gen_answered"] == 1.0
    sample = result["gen_samples"][0]
    assert sample["output"].startswith(" A\n") and sample["predicted"] == "A" and sample["gold"] == "A"


@pytest.mark.parametrize("text, choices, expected", [
    (" B", 4, 1), (" (C) because", 4, 2), ("D. the end", 4, 3), (" The answer is A", 4, 0), (" E", 4, None),
    (" AB", 4, None), ("", 2, None),
])
def test_generated_letter_extraction(text, choices, expected):
    from ling_surgery.evals.evaluate import generated_letter

    assert generated_letter(text, choices) == expected


def test_lettered_prompt_format():
    from ling_surgery.evals.evaluate import lettered_prompt

    doc = {"contexts": ["Question: Which is a gas?\nAnswer:"] * 2, "continuations": [" helium", " iron"], "gold": 0}
    assert lettered_prompt(doc) == "Question: Which is a gas?\n A. helium\n B. iron\nAnswer:"
    assert lettered_prompt({"contexts": ["x Maria", "x Katrina"], "continuations": [" a", " b"], "gold": 0}) is None


def test_context_trailing_space_moves_to_the_continuation():
    lm, _ = _bigram()
    seq, start = split_context(lm, "a ", "a")
    assert lm.tokenizer.decode(seq[start:]) == " a" and start == 1


def _quiet():
    from rich.console import Console

    return Console(quiet=True)


def _scoring_model(model_type: str) -> LoadedModel:
    """A tiny teacher (llama) or a tiny upgraded model (KDA + MLA, weights perturbed off the lossless init)."""
    if model_type == "llama":
        model = tiny_model("llama")
    else:
        from helpers import tiny_recipe

        from ling_surgery.surgery.architectures import get_arch
        from ling_surgery.surgery.init_maps import build_student, init_student_state
        from ling_surgery.surgery.targets import layer_plan, target_config

        teacher = tiny_model("llama")
        recipe = tiny_recipe()
        config = target_config(teacher.config, layer_plan(recipe, 4), recipe)
        model = build_student(init_student_state(teacher.state_dict(), get_arch("llama"), teacher.config, config, None,
                                                 recipe.stages[0]), config)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
    return LoadedModel(model_type, model, char_tokenizer(), torch.device("cpu"), chunk_size=8)


@pytest.mark.parametrize("model_type", ["llama", "bailing"])
def test_right_padded_batches_equal_one_at_a_time(model_type):
    """Causal models: right padding without a mask leaves every real position exact (softmax and KDA alike)."""
    lm = _scoring_model(model_type)
    texts = ["the quick brown fox jumps", "a", "linear attention keeps a fixed-size state", "mla caches"]
    seqs = [lm.encode(t) for t in texts]
    together = score_tokens(lm, seqs, [1] * 4, batch_tokens=10_000)
    alone = score_tokens(lm, seqs, [1] * 4, batch_tokens=1)
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.greedy, b.greedy)


@pytest.mark.parametrize("model_type", ["llama", "bailing", "bigram"])
def test_shared_prefix_scoring_equals_scoring_each_sequence(model_type):
    """The prefix tree reuses a cache (KV, KDA state, MLA latents) across branches: the scores must not change.
    Pieces of 7 tokens make every branch continue a cache across several segments."""
    lm = _bigram()[0] if model_type == "bigram" else _scoring_model(model_type)
    haystack = "the quick brown fox jumps over the lazy dog while the cat sleeps"
    texts = [haystack + " where is the fox", haystack + " where is the dog", haystack[:30] + " where",
             haystack, "a different start", haystack + " where is the fox"]  # a duplicate and a strict prefix
    seqs = [lm.encode(t) for t in texts]
    starts = [len(lm.encode(haystack)) - 3, 40, 5, 1, 2, 20]
    expected = score_tokens(lm, seqs, starts, batch_tokens=1)
    original_extend = lm.extend
    lm.extend = lambda ids, state=None: original_extend(ids, state, piece=7)
    seen = []
    shared = score_shared(lm, seqs, starts, progress=lambda n, tokens: seen.append(tokens))
    for a, b in zip(shared, expected):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-4)
        assert torch.equal(a.greedy, b.greedy)
    assert sum(seen) < sum(map(len, seqs)) - 2 * len(seqs[0])  # the haystack ran once, not four times


@pytest.mark.parametrize("model_type", ["llama", "bailing"])
def test_greedy_decoding_from_a_shared_state_equals_generate(model_type):
    """Decoding continued from `extend`'s state (what recall's shown samples use) is the stock model's cached greedy
    generation, token for token."""
    lm = _scoring_model(model_type)
    prompt = lm.encode("linear attention keeps a fixed-size state while mla caches latents")
    expected_text, expected_new = lm.generate(prompt, max_new_tokens=12, stop=("\n",))
    hidden, state = lm.extend(prompt[:20])
    hidden, state = lm.extend(prompt[20:], state)
    text, new = greedy_continuation(lm, state, hidden[-1], 12, stop=("\n",))
    assert (text, new) == (expected_text, expected_new)
    assert greedy_continuation(lm, state, hidden[-1], 12, stop=("\n",)) == (text, new)  # the state was not consumed


def test_prefix_tree_splits_where_sequences_differ():
    tree = prefix_tree([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3], [7]])
    assert (tree.start, tree.end) == (0, 0)
    other, first = sorted(tree.children, key=lambda n: n.end)
    assert (other.start, other.end, other.members) == (0, 1, [3])
    assert (first.start, first.end, sorted(first.members)) == (0, 2, [0, 1, 2])
    spans = sorted((c.start, c.end, c.members) for c in first.children)
    assert spans == [(2, 3, [0, 2]), (2, 3, [1])]
    assert [(c.start, c.end, c.members) for c in next(c for c in first.children if c.members == [0, 2]).children] == [(3, 4, [0])]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She has 3 apples. So the answer is 42.", "42"),
        ("The total is $1,234. So the answer is 1,234.", "1234"),
        ("First 5, then 7, finally 12", "12"),
        ("So the answer is -3.5", "-3.5"),
        ("no numbers here", None),
    ],
)
def test_gsm8k_answer_extraction(text, expected):
    assert extract_number(text) == expected


def test_numeric_comparison_and_stderr():
    assert same_number("18.0", "18") and same_number("1234", "1,234") and not same_number(None, "3")
    assert binomial_stderr(30, 100) == pytest.approx(math.sqrt(0.3 * 0.7 / 100))
    assert math.isnan(binomial_stderr(0, 0))

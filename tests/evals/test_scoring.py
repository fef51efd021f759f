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
    same_number,
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


@pytest.mark.parametrize("model_type", ["llama", "bailing"])
def test_right_padded_batches_equal_one_at_a_time(model_type):
    """Causal models: right padding without a mask leaves every real position exact (softmax and KDA alike)."""
    tok = char_tokenizer()
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
    lm = LoadedModel(model_type, model, tok, torch.device("cpu"), chunk_size=8)
    texts = ["the quick brown fox jumps", "a", "linear attention keeps a fixed-size state", "mla caches"]
    seqs = [lm.encode(t) for t in texts]
    together = score_tokens(lm, seqs, [1] * 4, batch_tokens=10_000)
    alone = score_tokens(lm, seqs, [1] * 4, batch_tokens=1)
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.greedy, b.greedy)


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

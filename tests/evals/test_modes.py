"""Mode evaluation: prompts select the mode both ways, and accuracy, output tokens and obedience are scored per mode
(a scripted model whose answers are known, so every number can be checked)."""

import types

import pytest
import torch
from helpers import bpe_tokenizer

from ling_surgery.evals.modes import chat_prompt, model_modes, modes_rows, modes_task
from ling_surgery.evals.scoring import LoadedModel
from ling_surgery.evals.tasks import Task, get_spec
from ling_surgery.surgery.chat_template import THINK_PREFILL, add_thinking_modes, answer_text, obeys

PROBLEMS = [{"question": "Tom has 2 apples and buys 3. How many?", "answer": "5"},
            {"question": "A box holds 4 pens; 2 boxes hold how many?", "answer": "8"}]


class ScriptedModel(torch.nn.Module):
    """Answers by mode: think mode reasons then answers right, fast mode answers the first problem right and the
    second wrong; with `disobey`, fast mode also opens a think block and think mode never closes its block."""

    def __init__(self, tokenizer, disobey=False):
        super().__init__()
        self.tokenizer, self.disobey = tokenizer, disobey
        self.generation_config = types.SimpleNamespace(eos_token_id=tokenizer.eos_token_id)
        self.config = types.SimpleNamespace(model_type="scripted")

    def generate(self, ids, max_new_tokens, **kwargs):
        prompt = self.tokenizer.decode(ids[0])
        gold = next(p["answer"] for p in PROBLEMS if p["question"] in prompt)
        if "detailed thinking on" in prompt:
            assert prompt.endswith(THINK_PREFILL)  # the think block is opened by the prompt
            text = answer_text("think", gold, "Count them one by one, then add the groups together carefully.")
            text = text[len(THINK_PREFILL):].split("</think>")[0] if self.disobey else text[len(THINK_PREFILL):]
        elif self.disobey and "detailed thinking off" in prompt:
            text = answer_text("think", gold, "Count them one by one, then add the groups together carefully.")
        elif "detailed thinking off" in prompt:
            text = gold if gold == "5" else "9"
        else:
            text = f"The answer is {gold}."
        new = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id, 0, 0]
        return torch.cat([ids, torch.tensor([new])], dim=1)


def lm_for(template_with_modes: bool, disobey=False):
    tok = bpe_tokenizer()
    if template_with_modes:
        add_thinking_modes(tok)
    return LoadedModel("scripted", ScriptedModel(tok, disobey), tok, torch.device("cpu"))


def test_prompts_select_the_mode():
    lm = lm_for(True)
    assert model_modes(lm) == ["fast", "think"]
    fast, think = (chat_prompt(lm, "2+2?", m) for m in ("fast", "think"))
    assert "detailed thinking off" in fast and "detailed thinking on" in think
    assert think.endswith(THINK_PREFILL) and not fast.endswith(THINK_PREFILL)
    assert "Give the result as your final answer." in fast
    plain = lm_for(False)
    assert model_modes(plain) == ["default"] and "detailed thinking" not in chat_prompt(plain, "2+2?", "default")


def test_modes_are_scored_per_mode():
    task = Task(get_spec("gsm8k_chat"), PROBLEMS, len(PROBLEMS))
    result = modes_task(lm_for(True), task, console=None)
    fast, think = result["modes"]["fast"], result["modes"]["think"]
    assert (fast["accuracy"], think["accuracy"]) == (0.5, 1.0)
    assert fast["obedience"] == think["obedience"] == 1.0
    assert fast["output_tokens_mean"] == 2.0  # one digit and the end-of-turn token; the padding after it is not counted
    assert think["tokens_per_correct"] == think["output_tokens_mean"] and fast["tokens_per_correct"] == 4.0
    assert result["think_over_fast_tokens"] == pytest.approx(think["output_tokens_mean"] / 2.0) and result["think_over_fast_tokens"] > 3
    assert result["value"] == 0.5  # the primary value is the default mode's (fast)
    disobeying = modes_task(lm_for(True, disobey=True), task, console=None)
    assert disobeying["modes"]["fast"]["obedience"] == disobeying["modes"]["think"]["obedience"] == 0.0
    plain = modes_task(lm_for(False), task, console=None)
    assert list(plain["modes"]) == ["default"] and plain["modes"]["default"]["obedience"] is None
    assert plain["modes"]["default"]["accuracy"] == 1.0
    rows = modes_rows({"teacher": plain, "student": result}, ["teacher", "student"], compare=True)
    labels = [r[0].strip() for r in rows]
    assert "default: accuracy" in labels and "think: obedience" in labels and "default: obedience" not in labels


def test_obedience_needs_a_closed_think_block_and_an_answer_in_think_mode_and_none_in_fast_mode():
    think = answer_text("think", "42", "6 times 7")
    assert obeys("think", think) and not obeys("fast", think)
    assert obeys("fast", "42") and not obeys("think", "42")
    assert not obeys("think", think.split("</think>")[0])  # never closed
    assert not obeys("think", think[: think.index("</think>") + len("</think>")])  # closed, but no answer
    assert not obeys("fast", "42 </think>")


def test_answers_are_decoded_as_the_model_ships_sampled_ones_seeded_per_problem():
    from helpers import tiny_model

    from ling_surgery.evals.modes import chat_generate, decoding
    from ling_surgery.surgery.config import SamplingSettings
    from ling_surgery.surgery.sft import ship_sampling

    tok = bpe_tokenizer()
    add_thinking_modes(tok)
    model = tiny_model("llama", vocab_size=len(tok))
    model.generation_config.eos_token_id = tok.eos_token_id
    lm = LoadedModel("tiny", model, tok, torch.device("cpu"))
    prompt = chat_prompt(lm, PROBLEMS[0]["question"], "think")
    ids = torch.tensor([lm.encode(prompt)])
    argmax = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
    assert decoding(lm) == "greedy"
    assert chat_generate(lm, prompt, 12, seed=0)[0] == chat_generate(lm, prompt, 12, seed=1)[0]
    assert chat_generate(lm, prompt, 12)[0] == tok.decode(argmax[: chat_generate(lm, prompt, 12)[1]], skip_special_tokens=True)

    ship_sampling(model.generation_config, SamplingSettings(temperature=2.0, top_k=0, top_p=1.0))  # spread out
    assert decoding(lm) == "sampled T=2.0 top-p=1.0 top-k=0"
    answers = [chat_generate(lm, prompt, 12, seed=s)[0] for s in range(4)]
    torch.manual_seed(123)  # what ran before does not matter: each answer is seeded by its problem
    assert chat_generate(lm, prompt, 12, seed=2)[0] == answers[2]
    assert len(set(answers)) > 1  # a random tiny model at T=2 does not repeat itself four times

"""Thinking modes in the chat template: both switches give the same prompt, the original format is kept, and the
assistant mask covers exactly the assistant turns."""

import pytest
from helpers import bpe_tokenizer

from ling_surgery.surgery.chat_template import (
    EMPTY_THINK,
    THINK_OFF,
    THINK_ON,
    THINK_PREFILL,
    add_thinking_modes,
    answer_text,
    read_format,
    split_thinking,
)
from ling_surgery.surgery.errors import SurgeryError

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
          " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
NO_SYSTEM = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ raise_exception('System role not "
             "supported') }}{% endif %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}")
QUESTION = [{"role": "user", "content": "What is 2+3?"}]


def tokenizer(template):
    tok = bpe_tokenizer()
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", [SMOLLM2, LLAMA3], ids=["chatml", "llama3"])
def test_both_switches_give_the_same_prompt_and_fast_is_the_default(template):
    tok = add_thinking_modes(tokenizer(template))
    render = lambda messages, **kw: tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
    think, fast = render(QUESTION, enable_thinking=True), render(QUESTION, enable_thinking=False)
    assert THINK_ON in think and THINK_OFF in fast and think != fast
    assert render([{"role": "system", "content": THINK_ON}] + QUESTION) == think
    assert render([{"role": "system", "content": THINK_OFF}] + QUESTION) == fast
    assert render(QUESTION) == fast
    # The user's own system prompt follows the mode line, either way the mode is chosen.
    mine = [{"role": "system", "content": "Answer in French."}] + QUESTION
    assert render(mine, enable_thinking=True) == render([{"role": "system", "content": f"{THINK_ON}\nAnswer in French."}]
                                                        + QUESTION)
    assert "Answer in French." in render(mine)


@pytest.mark.parametrize("template", [SMOLLM2, LLAMA3], ids=["chatml", "llama3"])
def test_the_original_format_is_kept(template):
    # The original's role markers around the same turns; fast answers open with the empty think block, which the
    # generation prompt writes too.
    original = tokenizer(template)
    moded = add_thinking_modes(tokenizer(template))
    conversation = [{"role": "system", "content": THINK_OFF}, *QUESTION, {"role": "assistant", "content": "5"},
                    {"role": "user", "content": "And 3+4?"}]
    as_written = [dict(m, content=EMPTY_THINK + m["content"]) if m["role"] == "assistant" else m for m in conversation]
    for gen in (False, True):
        assert moded.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen) == \
            original.apply_chat_template(as_written, tokenize=False, add_generation_prompt=gen) + (EMPTY_THINK if gen else "")


def test_assistant_mask_covers_exactly_the_assistant_turns():
    tok = add_thinking_modes(tokenizer(SMOLLM2))
    conversation = [*QUESTION, {"role": "assistant", "content": "5", "reasoning_content": "2 plus 3 is 5."},
                    {"role": "user", "content": "And 3+4?"}, {"role": "assistant", "content": "7"}]
    out = tok.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                  enable_thinking=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    spans, current = [], []
    for token, inside in zip(ids, mask):
        if inside:
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    spans += [tok.decode(current)] if current else []
    # The think block's opening and fast mode's empty block are the template's (the generation prompt writes them).
    assert spans == [answer_text("think", "5", "2 plus 3 is 5.")[len(THINK_PREFILL):] + "<|im_end|>\n", "7<|im_end|>\n"]


def test_answers_split_back_into_reasoning_and_answer():
    assert split_thinking(answer_text("think", "42", "6 times 7")) == ("6 times 7", "42")
    assert split_thinking(answer_text("fast", " 42 ")) == (None, "42")
    assert split_thinking("<think>\nunfinished") == (None, "<think>\nunfinished")


def test_templates_that_cannot_carry_modes_are_refused_in_one_line():
    with pytest.raises(SurgeryError, match="no chat template"):
        read_format(tokenizer(None))
    with pytest.raises(SurgeryError, match="cannot render a system turn.*System role not supported"):
        read_format(tokenizer(NO_SYSTEM))
    moded = add_thinking_modes(tokenizer(SMOLLM2))
    assert add_thinking_modes(moded).chat_template == moded.chat_template  # already has modes: kept
    with pytest.raises(SurgeryError, match="already has thinking modes"):
        read_format(moded)


@pytest.mark.parametrize("template", [SMOLLM2, LLAMA3], ids=["chatml", "llama3"])
@pytest.mark.parametrize("mode", ["fast", "think"])
def test_the_generation_prompt_is_where_a_trained_answer_starts(template, mode):
    # Think mode's prompt opens the think block; a trained think answer renders the same text and tokens up to there,
    # so what the model continues at inference is exactly what it learned to continue.
    tok = add_thinking_modes(tokenizer(template))
    answered = QUESTION + [{"role": "assistant", "content": answer_text(mode, "5", "2 plus 3 is 5.")}]
    think = mode == "think"
    prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True, enable_thinking=think)
    whole = tok.apply_chat_template(answered, tokenize=False, enable_thinking=think)
    assert whole.startswith(prompt) and prompt.endswith(THINK_PREFILL if think else EMPTY_THINK)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok(whole, add_special_tokens=False)["input_ids"][: len(prompt_ids)] == prompt_ids

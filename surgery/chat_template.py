"""Thinking modes in the chat template: one model, two behaviours chosen at inference (Ling 2.0's decoupled SFT).

The mode is selected the two ways the ecosystem already uses, and both give the very same prompt tokens:

| how                                        | convention                                   | fast (default)            | think                       |
|--------------------------------------------|----------------------------------------------|---------------------------|-----------------------------|
| `apply_chat_template(..., enable_thinking=)` | Qwen3; vLLM/SGLang `chat_template_kwargs`  | `enable_thinking=False`   | `enable_thinking=True`      |
| a system prompt                            | Ling 2.0 (`detailed thinking on` / `off`)    | `detailed thinking off`   | `detailed thinking on`      |

The rendered conversation always opens with a system turn that states the mode (`detailed thinking on|off`, then the
user's own system prompt, if any), so the model is conditioned the same way whichever switch a client uses. A think
answer is `<think>\\n{reasoning}\\n</think>\\n\\n{answer}` and think mode's generation prompt already ends with
`<think>\\n` (DeepSeek-R1's convention: the block cannot be skipped; reasoning parsers accept a completion without its
opening tag); a fast answer is the answer alone. An assistant message may carry its reasoning in `reasoning_content`
(Qwen3's field) or inline in `content`.

The template is synthesised from the model's own: the original is rendered on probe conversations to read off its
role markers (ChatML, Llama-3 headers, …), and the new template must reproduce the original's rendering of a
conversation that has a system turn, or it is refused with the reason. Assistant turns are wrapped in
`{% generation %}` markers, so `return_assistant_tokens_mask` (TRL's `assistant_only_loss`) labels exactly them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ling_surgery.surgery.errors import SurgeryError

THINK_ON = "detailed thinking on"
THINK_OFF = "detailed thinking off"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINK_PREFILL = THINK_OPEN + "\n"  # what a think-mode generation prompt ends with: the answer starts inside the block
# What a fast-mode generation prompt ends with: an empty think block, so the answer comes straight after it. One newline
# each side (Qwen3 writes two): byte-level BPE splits "\n\n" before text differently from "\n\n" at the end of a
# prompt, and the prompt must tokenise as the trained answer's start does.
EMPTY_THINK = THINK_OPEN + "\n" + THINK_CLOSE + "\n"
MODES = ("fast", "think")

_PROBE = {"system": "\x01SYS\x01", "user": "\x01USR\x01", "assistant": "\x01AST\x01"}
_MARK = "ling-surgery thinking modes"  # opens every template written here, so one is recognised and kept


@dataclass(frozen=True)
class ChatFormat:
    """The role markers of a chat template: what surrounds each role's content, and what opens an assistant turn."""

    start: str  # before the first turn (e.g. a BOS the template writes itself)
    turns: dict[str, tuple[str, str]]  # role → (prefix, suffix)
    generation_prompt: str  # what add_generation_prompt appends

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        text = self.start + "".join(self.turns[m["role"]][0] + m["content"] + self.turns[m["role"]][1] for m in messages)
        return text + (self.generation_prompt if add_generation_prompt else "")


def _render(tokenizer, template: str, messages, add_generation_prompt: bool, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


def read_format(tokenizer, template: str | None = None) -> ChatFormat:
    """The role markers of `template` (default: the tokenizer's own), found by rendering probe conversations.

    One-line errors for a tokenizer without a chat template, a template without a system role, and a template whose
    turns are not plain prefix + content + suffix (the synthesised template would not reproduce it).
    """
    template = template or tokenizer.chat_template
    if not template:
        raise SurgeryError("the model has no chat template; pass one with --chat-template FILE.jinja (in a recipe: "
                           "stages.sft.chat_template)")
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default") or next(iter(template.values()))
    if _MARK in template:
        raise SurgeryError("the chat template already has thinking modes (written by ling-surgery); nothing to add")
    s, u, a = (_PROBE[r] for r in ("system", "user", "assistant"))
    try:
        with_system = _render(tokenizer, template, [{"role": "system", "content": s}, {"role": "user", "content": u},
                                                    {"role": "assistant", "content": a}], False)
        prompt = _render(tokenizer, template, [{"role": "system", "content": s}, {"role": "user", "content": u}], True)
    except Exception as err:  # jinja's raise_exception, e.g. "System role not supported"
        raise SurgeryError(f"the chat template cannot render a system turn ({str(err).splitlines()[0]}); thinking modes "
                           "need one: pass a template that has it with --chat-template FILE.jinja") from None
    if not (with_system.count(s) == with_system.count(u) == with_system.count(a) == 1
            and with_system.index(s) < with_system.index(u) < with_system.index(a)):
        raise SurgeryError("the chat template does not render system, user and assistant turns in order; pass one "
                           "that does with --chat-template FILE.jinja")
    start_sys, rest = with_system.split(s)
    sys_suffix_user, rest = rest.split(u)
    user_suffix_ast, ast_suffix = rest.split(a)
    # A conversation that ends on the user's turn shows the user's suffix; the rest up to the answer is the
    # assistant's prefix, and what add_generation_prompt appends after that suffix is the generation prompt.
    user_last = _render(tokenizer, template, [{"role": "system", "content": s}, {"role": "user", "content": u}], False)
    user_suffix = user_last.split(u, 1)[1]
    tail = prompt.split(u, 1)[1]
    if not (user_suffix_ast.startswith(user_suffix) and tail.startswith(user_suffix)):
        raise SurgeryError("the chat template renders a user turn differently when an answer follows; pass a template "
                           "with plain role markers with --chat-template FILE.jinja")
    ast_prefix = user_suffix_ast[len(user_suffix):]
    generation_prompt = tail[len(user_suffix):]
    # What follows an answer when the user speaks again is the assistant's suffix and then the user's prefix.
    two_users = _render(tokenizer, template, [{"role": "system", "content": s}, {"role": "user", "content": u},
                                              {"role": "assistant", "content": a}, {"role": "user", "content": u}], False)
    after_ast = two_users.split(a, 1)[1].split(u)[0]
    if not after_ast.startswith(ast_suffix):
        raise SurgeryError("the chat template renders an assistant turn differently when a user turn follows; pass a "
                           "template with plain role markers with --chat-template FILE.jinja")
    user_prefix = after_ast[len(ast_suffix):]
    if not sys_suffix_user.endswith(user_prefix):
        raise SurgeryError("cannot tell the chat template's system and user markers apart; pass a template with plain "
                           "role markers with --chat-template FILE.jinja")
    sys_suffix = sys_suffix_user[: len(sys_suffix_user) - len(user_prefix)]
    # The system prefix is the start of the text minus what the template writes before any turn: the part it shares
    # with the user prefix's role marker is the prefix, anything before it (a BOS) is `start`.
    start, sys_prefix = _split_start(start_sys, user_prefix, ast_prefix)
    fmt = ChatFormat(start, {"system": (sys_prefix, sys_suffix), "user": (user_prefix, user_suffix),
                             "assistant": (ast_prefix, ast_suffix)}, generation_prompt)
    check = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}]
    for messages, gen in ((check, False), (check[:4], True)):
        if fmt.render(messages, gen) != _render(tokenizer, template, messages, gen):
            raise SurgeryError("the chat template's turns are not plain role markers around the content; pass one "
                               "that is with --chat-template FILE.jinja")
    return fmt


def _split_start(start_sys: str, user_prefix: str, ast_prefix: str) -> tuple[str, str]:
    """Split what precedes the system content into (text before any turn, the system turn's prefix).

    Role markers share their opening (`<|im_start|>` in ChatML, `<|start_header_id|>` in Llama-3); the system prefix
    starts where that shared opening does.
    """
    opening = _common_prefix(user_prefix, ast_prefix)
    if opening and opening in start_sys:
        at = start_sys.rindex(opening)
        return start_sys[:at], start_sys[at:]
    return "", start_sys


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def thinking_template(fmt: ChatFormat) -> str:
    """The mode-aware template for a chat format (see the module docstring for the conventions it follows)."""
    lit = json.dumps  # jinja string literals: JSON's escaping is valid jinja
    (sp, ss), (up, us), (ap, as_) = fmt.turns["system"], fmt.turns["user"], fmt.turns["assistant"]
    return (
        f"{{#- {_MARK}: enable_thinking=true|false, or a system prompt that starts '{THINK_ON}' or '{THINK_OFF}' "
        "(fast by default) -#}\n"
        "{%- set ns = namespace(think=false, system='', prefill='') -%}\n"
        "{%- set turns = messages -%}\n"
        "{%- if messages and messages[0]['role'] == 'system' -%}\n"
        "  {%- set ns.system = messages[0]['content'] | trim -%}\n"
        "  {%- set turns = messages[1:] -%}\n"
        f"  {{%- if ns.system.startswith({lit(THINK_ON)}) -%}}\n"
        f"    {{%- set ns.think = true -%}}{{%- set ns.system = ns.system[{len(THINK_ON)}:] | trim -%}}\n"
        f"  {{%- elif ns.system.startswith({lit(THINK_OFF)}) -%}}\n"
        f"    {{%- set ns.system = ns.system[{len(THINK_OFF)}:] | trim -%}}\n"
        "  {%- endif -%}\n"
        "{%- endif -%}\n"
        "{%- if enable_thinking is defined and enable_thinking is not none -%}"
        "{%- set ns.think = enable_thinking -%}{%- endif -%}\n"
        f"{{{{- {lit(fmt.start)} + {lit(sp)} -}}}}\n"
        f"{{{{- {lit(THINK_ON)} if ns.think else {lit(THINK_OFF)} -}}}}\n"
        "{%- if ns.system -%}{{- '\\n\\n' + ns.system -}}{%- endif -%}\n"
        f"{{{{- {lit(ss)} -}}}}\n"
        "{%- for message in turns -%}\n"
        "  {%- if message['role'] == 'assistant' -%}\n"
        "    {%- set content = message['content'] or '' -%}\n"
        "    {%- if message.get('reasoning_content') -%}\n"
        f"      {{%- set content = {lit(THINK_OPEN + chr(10))} + (message['reasoning_content'] | trim) + "
        f"{lit(chr(10) + THINK_CLOSE + chr(10) + chr(10))} + (content | trim) -%}}\n"
        "    {%- endif -%}\n"
        # The prefill (the think block's opening, or fast mode's empty block) is the template's, not the model's: it
        # stays outside the generation markers, so the loss covers what the model writes after it.
        f"    {{%- if content.startswith({lit(THINK_PREFILL)}) -%}}{{%- set ns.prefill = {lit(THINK_PREFILL)} -%}}"
        f"{{%- set content = content[{len(THINK_PREFILL)}:] -%}}\n"
        f"    {{%- elif content.startswith({lit(THINK_OPEN)}) -%}}{{%- set ns.prefill = '' -%}}\n"
        f"    {{%- else -%}}{{%- set ns.prefill = {lit(EMPTY_THINK)} -%}}{{%- endif -%}}\n"
        f"    {{{{- {lit(ap)} + ns.prefill -}}}}{{% generation %}}{{{{- content + {lit(as_)} -}}}}{{% endgeneration %}}\n"
        "  {%- elif message['role'] == 'user' -%}\n"
        f"    {{{{- {lit(up)} + message['content'] + {lit(us)} -}}}}\n"
        "  {%- elif message['role'] == 'system' -%}\n"
        f"    {{{{- {lit(sp)} + message['content'] + {lit(ss)} -}}}}\n"
        "  {%- else -%}\n"
        "    {{- raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') -}}\n"
        "  {%- endif -%}\n"
        "{%- endfor -%}\n"
        # The generation prompt opens the think block in think mode (DeepSeek-R1's convention) and writes it empty in
        # fast mode (Qwen3's): the mode is in the last tokens the model reads, not only in the system turn, and
        # answers are rendered in training with the very same tokens before them.
        f"{{%- if add_generation_prompt -%}}{{{{- {lit(fmt.generation_prompt)} -}}}}"
        f"{{{{- {lit(THINK_PREFILL)} if ns.think else {lit(EMPTY_THINK)} -}}}}{{%- endif -%}}\n"
    )


def has_thinking_modes(tokenizer) -> bool:
    return bool(tokenizer.chat_template) and _MARK in str(tokenizer.chat_template)


def add_thinking_modes(tokenizer, template: str | None = None):
    """Give `tokenizer` the mode-aware template built from `template` (default: its own); returns the tokenizer.

    A tokenizer that already has ling-surgery's modes keeps its template.
    """
    if has_thinking_modes(tokenizer) and template is None:
        return tokenizer
    tokenizer.chat_template = thinking_template(read_format(tokenizer, template))
    return tokenizer


def answer_text(mode: str, answer: str, reasoning: str | None = None) -> str:
    """An assistant turn's content in a mode: the answer alone (fast), or reasoning in think markers, then it."""
    if mode == "fast":
        return answer.strip()
    if not reasoning:
        raise SurgeryError("a think-mode answer needs its reasoning")
    return f"{THINK_PREFILL}{reasoning.strip()}\n{THINK_CLOSE}\n\n{answer.strip()}"


def assistant_turn(prompt: str, generated: str) -> str:
    """The whole assistant turn of a generation: what the prompt already opened (think mode's `<think>\\n`), then the
    generated text — what obedience and answer reading look at."""
    return (THINK_PREFILL if prompt.endswith(THINK_PREFILL) else "") + generated


def obeys(mode: str, turn: str) -> bool:
    """Fast: no think block at all. Think: a think block that is closed and followed by an answer."""
    if mode == "fast":
        return THINK_OPEN not in turn and THINK_CLOSE not in turn
    reasoning, answer = split_thinking(turn)
    return reasoning is not None and bool(answer)


def split_thinking(text: str) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a generated assistant turn."""
    if THINK_OPEN in text and THINK_CLOSE in text.split(THINK_OPEN, 1)[1]:
        head, rest = text.split(THINK_OPEN, 1)
        reasoning, answer = rest.split(THINK_CLOSE, 1)
        return reasoning.strip(), (head + answer).strip()
    return None, text.strip()


def mode_system_prompt(mode: str) -> str:
    return THINK_ON if mode == "think" else THINK_OFF

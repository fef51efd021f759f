"""Rewards for `kind: rl`, each called the way TRL's GRPOTrainer calls reward functions: the whole rollout at once
(prompts, completions, completion_ids and the dataset's columns), one float per completion.

| name          | what it pays                                                                                      |
|---------------|---------------------------------------------------------------------------------------------------|
| `correctness` | the reasoning-gym task's own `score_answer` on the answer after the think block (1 when right)    |
| `length`      | Evo-CoT's dynamic length reward (Ling 2.0 §4.2, arXiv 2510.22115): per group of completions of one |
|               | prompt, p(l) = 0.5 − (l − l_min)/(l_max − l_min + 1e-9); p when correct, min(p, 0) when wrong      |
| `length_by_accuracy` | the same times the group's share of right answers (Evo-CoT's larger α on easy tasks, smaller |
|               | on hard, measured per prompt): a prompt nobody solves pays no length                              |
| `format`      | −0.5 when an answer breaks its mode (Evo-CoT's penalty for `<think>` in fast mode; in think mode,  |
|               | a think block that is not closed and followed by an answer)                                       |
| `module:function` | a user function with TRL's reward signature                                                   |

Completions arrive in groups: TRL repeats each prompt `num_generations` times, consecutively, and scores the rollout
before shuffling it; a group is a run of equal prompts.
"""

from __future__ import annotations

import functools
import importlib
import json

from ling_surgery.surgery.chat_template import THINK_CLOSE, THINK_OPEN, assistant_turn, obeys, split_thinking
from ling_surgery.surgery.config import BUILTIN_REWARDS
from ling_surgery.surgery.errors import SurgeryError

FORMAT_PENALTY = -0.5  # Evo-CoT's penalty for a think marker in instant mode
CORRECT = 1.0  # a scorer's full marks; reasoning-gym gives partial credit (0.01 for a wrong number) below it


@functools.lru_cache(maxsize=32)
def scorer(task: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def answer_of(prompt: str, completion: str) -> str:
    """The answer a completion gives: after its think block (the prompt may have opened it), else all of it."""
    return split_thinking(assistant_turn(prompt, completion))[1]


def correctness(prompts, completions, task, entry, **_) -> list[float]:
    """The task's scorer on each answer (`entry`: the reasoning-gym entry as JSON)."""
    return [float(scorer(t)(answer_of(p, c) or None, json.loads(e)))
            for p, c, t, e in zip(prompts, completions, task, entry, strict=True)]


def length(prompts, completions, completion_ids, task, entry, **_) -> list[float]:
    """Evo-CoT's dynamic length reward over each group of completions of one prompt (α: the reward's weight)."""
    return _dynamic_length(prompts, completions, completion_ids, task, entry, scale_by_accuracy=False)


def length_by_accuracy(prompts, completions, completion_ids, task, entry, **_) -> list[float]:
    """Evo-CoT's dynamic length reward scaled, per prompt, by the share of its group's completions that are right.

    Ling 2.0 §4.2 sets α larger for easy tasks and smaller for hard ones; the group measures that per prompt. With one
    α, a group with no right answer pays its shortest wrong answer most (0 against down to −0.5): stopping early is
    paid exactly where the model cannot yet solve the problem. Scaled, that group pays no length at all — and, while
    the policy is rarely right, most groups pay nothing but correctness and format."""
    return _dynamic_length(prompts, completions, completion_ids, task, entry, scale_by_accuracy=True)


def _dynamic_length(prompts, completions, completion_ids, task, entry, scale_by_accuracy: bool) -> list[float]:
    right = [score >= CORRECT for score in correctness(prompts, completions, task, entry)]
    lengths = [len(ids) for ids in completion_ids]
    out = []
    for start, end in groups(prompts):
        low, high = min(lengths[start:end]), max(lengths[start:end])
        alpha = sum(right[start:end]) / (end - start) if scale_by_accuracy else 1.0
        for i in range(start, end):
            p = 0.5 - (lengths[i] - low) / (high - low + 1e-9)
            out.append(alpha * (p if right[i] else min(p, 0.0)))
    return out


def format(prompts, completions, mode, **_) -> list[float]:  # noqa: A001 - the reward's name in TRL's logs
    """−0.5 for an answer that breaks its mode; a model without modes ("default") is never penalised."""
    out = []
    for p, c, m in zip(prompts, completions, mode, strict=True):
        turn = assistant_turn(p, c)
        if m == "fast":
            ok = THINK_OPEN not in turn and THINK_CLOSE not in turn
        else:
            ok = m == "default" or obeys(m, turn)
        out.append(0.0 if ok else FORMAT_PENALTY)
    return out


def groups(prompts: list) -> list[tuple[int, int]]:
    """[start, end) of each run of equal consecutive prompts."""
    bounds, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start]:
            bounds.append((start, i))
            start = i
    return bounds


BUILTIN = {"correctness": correctness, "length": length, "length_by_accuracy": length_by_accuracy, "format": format}
assert set(BUILTIN) == set(BUILTIN_REWARDS)


def resolve_reward(name: str):
    """A built-in reward by name, or a user function `module:function`."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise SurgeryError(f"{name!r} is not a reward; use {', '.join(BUILTIN)} or a function as module:function")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module may fail in any way on import
        raise SurgeryError(f"reward {name!r}: cannot import {module_name!r} ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); put it on PYTHONPATH") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise SurgeryError(f"reward {name!r}: module {module_name!r} has no function {attr!r}")
    return function


def reward_problem(name: str) -> str | None:
    """Why `name` does not resolve to a reward, or None."""
    try:
        resolve_reward(name)
    except SurgeryError as err:
        return str(err)
    return None


def reward_functions(specs) -> tuple[list, list[float]]:
    """(functions, weights) for GRPOTrainer's reward_funcs and reward_weights."""
    return [resolve_reward(spec.name) for spec in specs], [spec.weight for spec in specs]

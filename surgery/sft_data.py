"""Conversations for decoupled SFT: each in one mode, the mode stated by the system turn (`chat_template.py`).

| source                  | what it gives                                                  | modes                                |
|-------------------------|----------------------------------------------------------------|--------------------------------------|
| `reasoning-gym`         | seeded verifiable problems (`tasks`, default `gsm_symbolic`;   | think: worked solution, then answer; |
|                         | task settings in `config`)                                     | fast: the bare answer (same problem) |
| `chitchat`              | human–human chat (chitchat-dataset, MIT), so the model keeps talking | fast                           |
| `FILE.jsonl` / `.json`  | rows with a `messages` list of {role, content}                 | as written (a `<think>` answer is think mode) |
| HF dataset name         | the same rows, streamed through `datasets`                     | as written                           |

Worked solutions are the task's own (`answer_cot`), or written from the problem where the task ships none
(`WORKED_SOLUTIONS`: chain_sum's running total), or a model's (`traces: teacher`).

Training problems come from seeds below `EVAL_SEED`; evaluation draws its reasoning-gym problems from `EVAL_SEED` on.
Seeds alone do not keep them apart (a problem's template is drawn from its dataset's seed and its numbers from seed +
index, so small templates recur: 5 of the first 1,000 evaluation problems were among 2,000 training ones), so training
also drops, by text, every question among the first `EVAL_GUARD` evaluation problems;
and GSM8K (the evaluation's word problems) is never a training source.
"""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path

from ling_surgery.surgery.chat_template import THINK_CLOSE, THINK_OPEN, answer_text, mode_system_prompt
from ling_surgery.surgery.errors import SurgeryError

EVAL_SEED = 1_000_003  # reasoning-gym seeds from here on are evaluation problems, never trained on
EVAL_GUARD = 1_000  # evaluation problems (from EVAL_SEED) whose questions training never uses
MAX_PROBLEMS = 100_000  # per task and source
CHITCHAT_MAX_TURNS = 6
TRACE_ATTEMPTS = 4  # traces: teacher — problems tried per one needed before giving up
_FINAL_LINE = re.compile(r"\n?\s*####\s*(.+?)\s*$")


def conversations(source, seed: int, writer=None) -> list[dict]:
    """`source.examples` conversations ({"messages": [...]}) from one `SFTData` entry, each in one mode; `writer`
    solves the reasoning-gym problems whose think-mode traces it writes, used only where the source says `traces:
    teacher`."""
    name = source.source
    if name == "reasoning-gym":
        if source.examples > MAX_PROBLEMS:
            raise SurgeryError(f"reasoning-gym: at most {MAX_PROBLEMS} examples per source; add another source entry")
        if source.traces == "teacher" and writer is None:
            raise SurgeryError("traces: teacher needs a model to write the traces")
        rows = reasoning_gym_conversations(source.tasks or ["gsm_symbolic"], source.examples, source.modes, seed,
                                           writer if source.traces == "teacher" else None, source.config)
    elif name == "chitchat":
        rows = chitchat_conversations(source.examples, seed)
    else:
        rows = [with_mode(conversation_of(row, source.messages_field, name), None)
                for row in user_rows(name, source.split, source.examples, source.messages_field)]
    if len(rows) < source.examples:
        raise SurgeryError(f"SFT data {name!r}: {len(rows)} conversations, fewer than the {source.examples} asked "
                           "for; lower examples or add data")
    return rows[: source.examples]


# Sums of two or three one-digit numbers (reasoning-gym chain_sum): arithmetic a 135M model sometimes gets right, so
# RL's correctness reward has something to pay on the CPU demo (reasoning-gym's default chain_sum, gsm_symbolic,
# basic_arithmetic and products: 0 of 48 sampled answers right in either mode after `align`'s SFT; these: 2 of 40 in
# fast mode). The `arithmetic_chat` evaluation asks them from evaluation seeds.
EASY_ARITHMETIC = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}


def chain_sum_solution(entry: dict) -> str:
    """chain_sum's worked solution, which the task does not ship: the running total left to right, one step a line
    ("8 + 0 + 7" → "8 + 0 = 8\n8 + 7 = 15"); checked against the task's own answer."""
    first, *rest = entry["metadata"]["expression"].split(" ")
    total, lines = int(first), []
    for op, term in zip(rest[::2], rest[1::2]):
        new = total + int(term) if op == "+" else total - int(term)
        lines.append(f"{total} {op} {term} = {new}")
        total = new
    if str(total) != str(entry["answer"]).strip():
        raise SurgeryError(f"chain_sum worked solution of {entry['question']!r} gives {total}, not {entry['answer']}")
    return "\n".join(lines)


# Worked solutions for reasoning-gym tasks that ship none (metadata without answer_cot), so think mode can be taught
# on them; a task in neither is fast-mode only.
WORKED_SOLUTIONS = {"chain_sum": chain_sum_solution}


def problems(task: str, count: int, seed: int, config: dict | None = None) -> list[dict]:
    """`count` seeded reasoning-gym problems ({question, answer, reasoning or None, entry}); `seed` ≥ EVAL_SEED for
    evaluation; `config`: the task's settings (e.g. EASY_ARITHMETIC for chain_sum)."""
    try:
        import reasoning_gym
    except ImportError:
        raise SurgeryError("reasoning-gym is not installed; run: pip install reasoning-gym==0.1.25") from None
    try:
        dataset = reasoning_gym.create_dataset(task, size=count, seed=seed, **(config or {}))
    except Exception as err:  # unknown names and settings raise plain exceptions
        what = f"reasoning-gym task {task!r}" + (f" with config {config}" if config else "")
        raise SurgeryError(f"{what}: {str(err).splitlines()[0]}; e.g. gsm_symbolic, basic_arithmetic, chain_sum (and "
                           "their settings: reasoning_gym.create_dataset's keywords)") from None
    out = []
    for entry in dataset:
        cot = (entry.get("metadata") or {}).get("answer_cot")
        solver = WORKED_SOLUTIONS.get(task)
        reasoning = _FINAL_LINE.sub("", cot).strip() if cot else solver(entry) if solver else None
        out.append({"question": entry["question"], "answer": str(entry["answer"]).strip(), "reasoning": reasoning,
                    "entry": entry, "task": task})
    return out


def reasoning_gym_conversations(tasks: list[str], examples: int, modes: list[str], seed: int,
                                writer=None, config: dict | None = None) -> list[dict]:
    """Problems shared out over `tasks` (with their settings `config`); each problem appears once per mode, so the
    modes differ only in the answer. With a `writer`, the think-mode reasoning is the writer's own solution of each
    problem it solved right."""
    per_problem = len(modes)
    count = -(-examples // per_problem)
    rows = []
    for i, task in enumerate(tasks):
        share = count // len(tasks) + (i < count % len(tasks))
        # reasoning-gym draws problem k's numbers from Random(seed + k): training seed ranges stay below EVAL_SEED.
        base = (seed + 100_003 * i) % (EVAL_SEED - MAX_PROBLEMS)
        if writer is None:
            pool = training_problems(task, share, base, config)
            if len(pool) < share:
                raise SurgeryError(f"reasoning-gym {task!r}: too many problems coincide with evaluation ones")
        else:
            pool = solved_problems(task, share, base, writer, config)
        for problem in pool:
            if "think" in modes and not problem["reasoning"]:
                raise SurgeryError(f"reasoning-gym task {task!r} has no worked solution for think mode; use it with "
                                   "modes: [fast], traces: teacher, or a task that has one (gsm_symbolic, chain_sum)")
            for mode in modes:
                rows.append({"messages": [
                    {"role": "system", "content": mode_system_prompt(mode)},
                    {"role": "user", "content": problem["question"]},
                    {"role": "assistant", "content": answer_text(mode, problem["answer"], problem["reasoning"])},
                ]})
    random.Random(seed).shuffle(rows)
    return rows


@functools.lru_cache(maxsize=8)
def evaluation_questions(task: str, config: tuple = ()) -> frozenset[str]:
    return frozenset(p["question"] for p in problems(task, EVAL_GUARD, EVAL_SEED, dict(config)))


def not_evaluated(task: str, pool: list[dict], config: dict | None = None) -> list[dict]:
    """`pool` without the problems whose question the evaluation asks (the first EVAL_GUARD of its seed)."""
    held_out = evaluation_questions(task, tuple(sorted((config or {}).items())))
    return [p for p in pool if p["question"] not in held_out]


def training_problems(task: str, count: int, seed: int, config: dict | None = None) -> list[dict]:
    """Up to `count` problems from `seed` on that the evaluation never asks (fewer only where the task's settings leave
    too few). Small problem spaces share many questions with the evaluation (sums of two one-digit numbers: nearly all
    of them are among its first 1,000), so four times what is needed are drawn."""
    return not_evaluated(task, problems(task, 4 * count + 8, seed, config), config)[:count]


def solved_problems(task: str, count: int, seed: int, writer, config: dict | None = None) -> list[dict]:
    """`count` problems of `task` that `writer` solved right, its solution as their reasoning (rejection sampling, as
    in STaR / DeepSeek-R1's SFT data); problems are drawn in rounds until enough are solved or `TRACE_ATTEMPTS`×count
    have been tried."""
    from ling_surgery.evals.scoring import extract_number, same_number

    solved, tried = [], 0
    # Training seeds stay below EVAL_SEED: never a problem the evaluation asks.
    while len(solved) < count and tried < TRACE_ATTEMPTS * count and seed + tried + count - len(solved) <= EVAL_SEED:
        batch = problems(task, count - len(solved), seed + tried, config)  # numbers from Random(seed + k)
        tried += len(batch)
        batch = not_evaluated(task, batch, config)
        for problem, text in zip(batch, writer.solve([p["question"] for p in batch])):
            if same_number(extract_number(text), problem["answer"]):
                solved.append(dict(problem, reasoning=text.strip()))
    if len(solved) < count:
        raise SurgeryError(f"traces: teacher — {getattr(writer, 'name', 'the model')} solved {len(solved)} of {tried} "
                           f"{task} problems, fewer than the {count} needed; use traces: dataset, fewer examples, or a "
                           "stronger trace_model")
    return solved


def chitchat_conversations(examples: int, seed: int) -> list[dict]:
    """Fast-mode chat: the first speaker is the user; each side's consecutive messages form one turn."""
    import importlib.util

    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or spec.origin is None:
        raise SurgeryError("chitchat needs the chitchat-dataset package; run: pip install chitchat-dataset==0.9.0")
    data = json.loads((Path(spec.origin).parent / "dataset.json").read_text())
    keys = sorted(data)
    random.Random(seed).shuffle(keys)
    rows = []
    for key in keys:
        turns = [" ".join(m["text"].strip() for m in group if m.get("text", "").strip())
                 for group in data[key]["messages"]][:CHITCHAT_MAX_TURNS]
        turns = [t for t in turns if t]
        turns = turns[: len(turns) // 2 * 2]  # end on the assistant
        if not turns:
            continue
        messages = [{"role": "system", "content": mode_system_prompt("fast")}]
        messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        rows.append({"messages": messages})
        if len(rows) == examples:
            break
    return rows


def source_kind(name: str) -> str:
    """"reasoning-gym", "chitchat", "file" (.jsonl/.json, which must exist) or "hub" (org/name); else a one-line error."""
    if name in ("reasoning-gym", "chitchat"):
        return name
    path = Path(name).expanduser()
    if path.suffix in (".jsonl", ".json"):
        if not path.is_file():
            raise SurgeryError(f"SFT data file {name!r} not found")
        return "file"
    if path.exists() or "/" not in name:
        raise SurgeryError(f"unknown SFT data source {name!r}; use reasoning-gym, chitchat, a .jsonl/.json file of "
                           "{messages: [...]} rows, or a hub dataset name (org/name)")
    return "hub"


def user_rows(name: str, split: str, examples: int, field: str):
    """Rows of a local .jsonl/.json file or a hub dataset (streamed), at most `examples`."""
    path = Path(name).expanduser()
    if source_kind(name) == "file":
        text = path.read_text(encoding="utf-8")
        try:
            rows = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
                    else json.loads(text))
        except ValueError as err:
            raise SurgeryError(f"SFT data file {name!r} is not valid JSON{' lines' if path.suffix == '.jsonl' else ''}: "
                               f"{err}") from None
        return rows[:examples] if isinstance(rows, list) else []
    try:
        import datasets

        stream = datasets.load_dataset(name, split=split, streaming=True)
        return [row for _, row in zip(range(examples), stream)]
    except Exception as err:
        raise SurgeryError(f"SFT data {name!r} could not be loaded: {str(err).splitlines()[0]}") from None


def conversation_of(row, field: str, name: str) -> list[dict]:
    """The `field` list of a user row, checked: {role, content} dicts with an assistant turn."""
    if not isinstance(row, dict) or field not in row:
        found = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
        raise SurgeryError(f"SFT data {name!r}: a row has no {field!r} field (found: {found}); give each row a "
                           f"{field!r} list of {{role, content}} messages, or set messages_field")
    messages = row[field]
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) and "role" in m and "content" in m
                                                            for m in messages)):
        raise SurgeryError(f"SFT data {name!r}: {field!r} must be a list of {{role, content}} messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise SurgeryError(f"SFT data {name!r}: a conversation has no assistant turn to learn from")
    return [{"role": m["role"], "content": str(m["content"])} for m in messages]


def with_mode(messages: list[dict], mode: str | None) -> dict:
    """The conversation with its mode stated first: given, else think when an answer reasons in think markers."""
    if mode is None:
        thinks = any(m["role"] == "assistant" and THINK_OPEN in m["content"] and THINK_CLOSE in m["content"]
                     for m in messages)
        mode = "think" if thinks else "fast"
    line = mode_system_prompt(mode)
    if messages[0]["role"] == "system":
        own = messages[0]["content"].strip()
        if own.startswith(("detailed thinking on", "detailed thinking off")):
            return {"messages": messages}
        return {"messages": [{"role": "system", "content": f"{line}\n\n{own}"}] + messages[1:]}
    return {"messages": [{"role": "system", "content": line}] + messages}

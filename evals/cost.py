"""Inference cost of one model on this machine: cache memory (measured and computed), prefill and decode speed.

Each model is measured in a child process of its own (`python -m ling_surgery.evals.cost MODEL ...`) so that peak
resident memory is that model's alone and two models never share an allocator. The measurement uses the stock
transformers modules and cache, the path users serve with, and labels which kernels ran.

Per context length T: prefill T real tokens with the cache on (tokens/s), read the bytes of every tensor the cache
object holds (KV / latent caches, KDA conv and recurrent states), then time `decode_tokens` greedy steps (ms/token).
The computed column is `plan.teacher_costs` / `plan.student_costs` at the dtype the cache was measured in.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

CPU_CONTEXTS = (256, 512, 1024, 2048)  # transformers' pure-PyTorch KDA prefill is slow on CPU
CUDA_CONTEXTS = (1024, 4096, 16384, 32768)
LLAMACPP_CONTEXTS = (512, 4096, 16384, 32768)
COMPUTED_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)


def default_contexts(engine: str, cuda: bool) -> tuple[int, ...]:
    if engine == "llamacpp":
        return LLAMACPP_CONTEXTS
    return CUDA_CONTEXTS if cuda else CPU_CONTEXTS


def cache_bytes(cache) -> int:
    """Bytes of every distinct tensor reachable from a cache object (layers, lists, dicts, attributes)."""
    import torch

    seen, total, stack = set(), 0, [cache]
    visited = set()
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            key = (item.data_ptr(), item.nbytes)
            if item.data_ptr() and key not in seen:
                seen.add(key)
                total += item.nbytes
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif hasattr(item, "__dict__") and id(item) not in visited:
            visited.add(id(item))
            stack.extend(vars(item).values())
    return total


def peak_memory_bytes(device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(model: str, contexts: tuple[int, ...], decode_tokens: int = 16, device: str = "auto", on_row=None) -> dict:
    """Measure one model in this process (call through `measure_in_child` for clean peak memory).

    `on_row(row)` is called after each context length, so a parent can show progress.
    """
    import torch

    from ling_surgery.evals.scoring import load_for_eval
    from ling_surgery.surgery.data import TokenStream, load_documents
    from ling_surgery.surgery.plan import student_costs, teacher_costs

    lm = load_for_eval(model, device)
    config = lm.model.config
    dtype_bytes = next(lm.model.parameters()).element_size()
    baseline = peak_memory_bytes(lm.device)
    text = TokenStream.from_documents(load_documents("wikipedia"), lm.tokenizer, max_tokens=max(contexts) + 1, seed=1)
    costs = student_costs(config, dtype_bytes) if config.model_type in ("bailing_hybrid", "deepseek_v3") else teacher_costs(config, dtype_bytes)
    rows = []
    with torch.no_grad():
        # Warm-up (allocator, thread pool, lazy kernel setup), so it is not billed to the shortest context's row.
        warm = lm.model(input_ids=text[:16][None].to(lm.device), use_cache=True)
        lm.model(input_ids=warm.logits[:, -1:].argmax(-1), past_key_values=warm.past_key_values, use_cache=True)
        del warm
        for context in sorted(contexts):
            ids = text[:context][None].to(lm.device)
            sync(lm.device)
            start = time.perf_counter()
            out = lm.model(input_ids=ids, use_cache=True)
            sync(lm.device)
            prefill = time.perf_counter() - start
            measured = cache_bytes(out.past_key_values)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            del out
            start = time.perf_counter()
            for _ in range(decode_tokens):
                step = lm.model(input_ids=token, past_key_values=cache, use_cache=True)
                token = step.logits[:, -1:].argmax(-1)
            sync(lm.device)
            decode = (time.perf_counter() - start) / decode_tokens
            rows.append(context_row(context, prefill, decode, measured, costs, peak_memory_bytes(lm.device), on_row))
            del cache, step
    from ling_surgery.evals.evaluate import generation_kernels

    return {
        "model": lm.name,
        "model_type": config.model_type,
        "device": str(lm.device),
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "kernels": generation_kernels(lm),
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "memory_after_load_bytes": baseline,
        "kv_bytes_per_token": costs.kv_bytes_per_token,
        "state_bytes_per_sequence": costs.state_bytes_per_sequence,
        "computed": {str(c): costs.cache_bytes(c) for c in COMPUTED_CONTEXTS},
        "contexts": rows,
    }


def context_row(context: int, prefill_s: float, decode_s: float, measured: int, costs, peak: int, on_row=None) -> dict:
    """One context length's result, with the keys every engine reports; `on_row` sees it as soon as it exists."""
    row = {
        "context": context,
        "prefill_tokens_per_second": round(context / prefill_s, 1),
        "decode_ms_per_token": round(1000 * decode_s, 2),
        "cache_bytes_measured": measured,
        "cache_bytes_computed": costs.cache_bytes(context),
        "peak_memory_bytes": peak,
    }
    if on_row is not None:
        on_row(row)
    return row


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_in_child(model: str, contexts: tuple[int, ...], decode_tokens: int = 16, device: str = "auto",
                     console=None, role: str = "model") -> dict:
    """`measure` in a fresh Python process; its last stdout line is the JSON result. (llama.cpp: see
    `evals/llamacpp_bench.py`, which measures all models in lockstep, each in a process of its own.)

    The child reports each finished context on stderr (`ROW {json}`), which drives a progress bar here: long contexts
    take minutes (a 135M teacher prefills 32k tokens in llama.cpp on 2 cores in 5 to 12 minutes).
    """
    import threading

    from ling_surgery.surgery.errors import SurgeryError
    from ling_surgery.surgery.progress import training_progress

    command = [sys.executable, "-m", "ling_surgery.evals.cost", model, ",".join(map(str, contexts)), str(decode_tokens),
               device]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.extend(child.stdout), daemon=True)  # never let a pipe fill up
    reader.start()
    errors: list[str] = []
    total = sum(contexts) + len(contexts) * decode_tokens  # each context is prefilled from scratch
    with training_progress(f"inference {role}", total, console) as bar:
        for line in child.stderr:
            if line.startswith(ROW_PREFIX):
                row = json.loads(line[len(ROW_PREFIX):])
                bar.advance(row["context"] + decode_tokens, context=row["context"],
                            **{"decode ms/tok": row["decode_ms_per_token"]})
            elif line.strip():
                errors.append(line.strip())
    child.wait()
    reader.join()
    if child.returncode != 0:
        raise SurgeryError(f"inference benchmark of {model!r} failed: {(errors or ['?'])[-1]}")
    return json.loads("".join(stdout).strip().splitlines()[-1])


ROW_PREFIX = "ROW "


def _report_row(row: dict) -> None:
    print(ROW_PREFIX + json.dumps(row), file=sys.stderr, flush=True)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    name, contexts, decode, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    result = measure(name, tuple(int(c) for c in contexts.split(",")), decode, device, on_row=_report_row)
    print(json.dumps(result))

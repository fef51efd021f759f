"""The llama.cpp inference benchmark: every model under every engine setting, measured in lockstep.

Measured one after the other, teacher and upgraded model run 15 minutes apart, and on a shared machine the same
model's speed drifts 10-30% over that time (three runs of the same two files read 2.4x, 2.8x and 3.5x at 16k). So
each (model, setting) pair gets a worker process of its own (its own peak memory, no shared allocator) and this
module drives all of them through one text in turn:

- at each context, every worker prefills up to it in `PREFILL_CHUNK`-token chunks, taken round-robin;
- then every worker decodes `decode_tokens` single-token steps (the text's own next tokens, exactly what generation
  does at that depth) in `rounds` rounds, each round visiting every worker, in reverse order every other round.

Drift hits all workers alike and cancels in the ratio; a worker's decode figure is its median round, so one stall
does not move it. The decoded tokens stay in the context for the next row. The prefill figure is tokens so far over
prefill time so far, as a fresh prefill of that context would report. A setting that is clearly slower than another
setting of the same model and growing slower faster (`llamacpp.dominated`) stops there: long contexts are the
expensive ones (prefill is quadratic in context).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from ling_surgery.evals.llamacpp import (DECODE_TOKENS, EngineSetting, check_contexts, dominated, fastest_among,
                                        fastest_per_context)
from ling_surgery.surgery.errors import SurgeryError

PREFILL_CHUNK = 512  # llama.cpp's n_batch: one chunk is one batch
FILE_TYPES = {0: "float32", 1: "float16", 7: "q8_0", 2: "q4_0"}
REPLY = "BENCH "  # marks the worker's replies on stdout (anything else there is ignored)


def benchmark(models: dict[str, str | Path], contexts: tuple[int, ...], settings: list[EngineSetting] | None = None,
              decode_tokens: int = DECODE_TOKENS, rounds: int = 8, threads: int | None = None, console=None,
              stop=dominated) -> dict[str, dict]:
    """{role: result} for GGUF `models` ({role: path}): each model's fastest setting per context (`fastest_per_context`,
    every setting's own result under `settings`), with `evals.cost.measure`'s keys.

    `stop(rows, best)` says why a setting should stop after its latest row (None: go on); `best` is the fastest other
    setting of the same model at that context (see `llamacpp.fastest_among`).
    """
    from ling_surgery.evals.cost import COMPUTED_CONTEXTS, context_row
    from ling_surgery.evals.llamacpp import gguf_costs, require_llama_cpp
    from ling_surgery.surgery.progress import training_progress
    from ling_surgery.surgery.sources import gguf_metadata

    llama_cpp = require_llama_cpp()
    settings = settings or [EngineSetting()]
    contexts = tuple(sorted(contexts))
    check_contexts(contexts, decode_tokens)
    if decode_tokens < rounds:
        raise SurgeryError(f"decode_tokens {decode_tokens} is fewer than rounds {rounds}: each round decodes one token or more")
    per_round = decode_tokens // rounds
    text_tokens = max(contexts) + len(contexts) * decode_tokens
    threads = threads or os.cpu_count()
    runs = [_Run(role, Path(path), setting) for role, path in models.items() for setting in settings]
    with ExitStack() as workers:
        for run in runs:
            run.worker = workers.enter_context(_Worker(run.path, run.setting, text_tokens + 8, threads, text_tokens))
            run.costs = gguf_costs(run.path, run.setting.cache_type)
        with training_progress("inference benchmark (llama.cpp, interleaved)", len(runs) * text_tokens, console) as bar:
            for context in contexts:
                alive = [run for run in runs if run.stopped is None]
                while any(run.cached < context for run in alive):  # prefill round-robin, a chunk at a time
                    for run in alive:
                        if run.cached < context:
                            to = min(run.cached + PREFILL_CHUNK, context)
                            reply = run.worker.ask("prefill", to=to, cache_bytes=to == context)
                            run.prefill_seconds += reply["seconds"]
                            run.prefill_tokens += to - run.cached
                            bar.advance(to - run.cached, context=context)
                            run.cached, run.cache_bytes = to, reply.get("cache_bytes", run.cache_bytes)
                seconds: dict[_Run, list[float]] = {run: [] for run in alive}
                for round_index in range(rounds):
                    for run in round_order(alive, round_index):
                        reply = run.worker.ask("decode", tokens=per_round)
                        seconds[run].append(reply["seconds"] / per_round)
                        run.peak = reply["peak_memory_bytes"]
                        bar.advance(per_round, context=context)
                for run in alive:
                    run.cached += per_round * rounds
                    prefill = run.prefill_seconds * context / run.prefill_tokens  # decoded tokens were timed as decode
                    run.rows.append(context_row(context, prefill, statistics.median(seconds[run]), run.cache_bytes,
                                                run.costs, run.peak))
                _print_context(console, context, alive)
                if context == contexts[-1]:
                    break
                # judge every setting before stopping any: the fastest must stay a reference
                verdicts = [(run, _verdict(run, alive, context, stop)) for run in alive]
                for run, verdict in verdicts:
                    if verdict:
                        run.stopped = verdict
                        run.worker.close()
                        bar.shrink(text_tokens - run.cached)
                        if console is not None:
                            console.print(f"{run.role} ({run.setting.label}): {run.stopped}")
    method = (f"interleaved: all models and settings prefill in {PREFILL_CHUNK}-token chunks taken in turn, then decode "
              f"{decode_tokens} tokens in {rounds} rounds visiting each in turn; decode = median round")
    results: dict[str, dict] = {}
    for role, path in models.items():
        meta = gguf_metadata(Path(path))  # one file per model, whatever the settings
        measured = []
        for run in (r for r in runs if r.role == role):
            measured.append({
                "model": run.path.name,
                "model_type": "gguf:" + meta["general.architecture"],
                "device": "cpu",
                "dtype": FILE_TYPES.get(meta.get("general.file_type"), str(meta.get("general.file_type"))),
                "threads": threads,
                "kernels": f"llama.cpp via llama-cpp-python {llama_cpp.__version__} (ggml CPU, {run.setting.label})",
                "setting": run.setting.label,
                "method": method,
                "parameters": run.worker.info["parameters"],
                "memory_after_load_bytes": run.worker.info["memory_after_load_bytes"],
                "kv_bytes_per_token": run.costs.kv_bytes_per_token,
                "state_bytes_per_sequence": run.costs.state_bytes_per_sequence,
                "computed": {str(c): run.costs.cache_bytes(c) for c in COMPUTED_CONTEXTS},
                "contexts": run.rows,
                "stopped": run.stopped,
            })
        results[role] = fastest_per_context(measured)
    return results


def round_order(alive: list, round_index: int) -> list:
    """Workers in the order of one decode round: as listed in even rounds, reversed in odd ones, so no worker always
    runs right after the same neighbour (or first, on a cold cache)."""
    return list(alive) if round_index % 2 == 0 else list(reversed(alive))


@dataclass(eq=False)
class _Run:
    """One model under one setting: its worker and what has been measured so far."""

    role: str
    path: Path
    setting: EngineSetting
    worker: "_Worker | None" = None
    costs: object = None
    cached: int = 0
    cache_bytes: int = 0
    peak: int = 0
    prefill_seconds: float = 0.0
    prefill_tokens: int = 0
    rows: list = field(default_factory=list)
    stopped: str | None = None

    def result(self) -> dict:
        return {"setting": self.setting.label, "contexts": self.rows}


class _Worker:
    """A `serve` process for one GGUF file under one setting; `ask` sends a command and waits for its reply."""

    def __init__(self, path: Path, setting: EngineSetting, n_ctx: int, threads: int, text_tokens: int):
        self.name = f"{path.name} ({setting.label})"
        command = [sys.executable, "-m", "ling_surgery.evals.llamacpp_bench", str(path), setting.as_arg(), str(n_ctx),
                   str(threads), str(text_tokens)]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, bufsize=1)
        self._errors: deque[str] = deque(maxlen=20)
        # drain stderr all along, so llama.cpp's logging can never fill the pipe and block the worker
        self._drain = threading.Thread(target=lambda: self._errors.extend(l.strip() for l in self._process.stderr if l.strip()),
                                       daemon=True)
        self._drain.start()
        self.info = self._read()

    def ask(self, op: str, **arguments) -> dict:
        try:
            self._process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker is gone; _read says why
        return self._read()

    def _read(self) -> dict:
        for line in self._process.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        self._process.wait()
        self._drain.join(timeout=5)
        raise SurgeryError(f"llama.cpp benchmark of {self.name} failed: {(list(self._errors) or ['no error output'])[-1]}")

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._process.stdin.close()  # end of commands: the worker exits
                self._process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> "_Worker":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self._process.poll() is None:
            self._process.kill()  # interrupted: do not wait for a 32k prefill to finish
        self.close()


def _verdict(run: _Run, alive: list[_Run], context: int, stop) -> str | None:
    """`stop`'s reason for `run` to stop after `context`, against the fastest other setting of its model there."""
    others = [other.result() for other in alive if other.role == run.role and other is not run]
    return stop(run.rows, fastest_among(others).get(context)) if others else None


def _print_context(console, context: int, alive: list[_Run]) -> None:
    if console is None:
        return
    best: dict[str, _Run] = {}
    for run in alive:
        if run.role not in best or run.rows[-1]["decode_ms_per_token"] < best[run.role].rows[-1]["decode_ms_per_token"]:
            best[run.role] = run
    parts = [f"{role} {run.rows[-1]['decode_ms_per_token']:.1f} ({run.setting.label})" for role, run in best.items()]
    console.print(f"{context} tokens: decode ms/token " + ", ".join(parts))


def serve(path: str, setting: EngineSetting, n_ctx: int, threads: int, text_tokens: int) -> None:
    """The worker: load the model, tokenize the benchmark text, then answer commands (one JSON object per stdin line)
    until stdin closes: `prefill` (up to token `to`; seconds, and with `cache_bytes` llama.cpp's own byte count of the
    sequence's cache) and `decode` (`tokens` single-token steps; seconds)."""
    import torch

    from ling_surgery.evals.cost import peak_memory_bytes
    from ling_surgery.evals.llamacpp import require_llama_cpp
    from ling_surgery.surgery.data import load_documents

    llama_cpp = require_llama_cpp()
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=PREFILL_CHUNK, n_threads=threads, logits_all=False,
                          verbose=False, **setting.llama_kwargs())

    cpu = torch.device("cpu")

    def reply(**values) -> None:
        print(REPLY + json.dumps(values), flush=True)

    baseline = peak_memory_bytes(cpu)
    text = "\n\n".join(load_documents("wikipedia")[: 4 * text_tokens // 100 + 10]).encode("utf-8")
    tokens = llm.tokenize(text, add_bos=False)
    while len(tokens) < text_tokens:
        tokens = tokens + tokens
    # Warm-up: the first evaluation pays for thread-pool start and page faults on the weights, which belong to no
    # context length; without it they land in the shortest context's row.
    llm.eval(tokens[:64])
    for k in range(4):
        llm.eval([tokens[64 + k]])
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    reply(parameters=int(llama_cpp.llama_model_n_params(llm.model)), memory_after_load_bytes=baseline)
    cached = 0
    for line in sys.stdin:
        command = json.loads(line)
        start = time.perf_counter()
        if command["op"] == "prefill":
            llm.eval(tokens[cached:command["to"]])
            cached = command["to"]
            seconds = time.perf_counter() - start
            measured = {"cache_bytes": int(llama_cpp.llama_state_seq_get_size(llm.ctx, 0))} if command["cache_bytes"] else {}
            reply(seconds=seconds, peak_memory_bytes=peak_memory_bytes(cpu), **measured)
        elif command["op"] == "decode":
            for _ in range(command["tokens"]):
                llm.eval([tokens[cached]])
                cached += 1
            reply(seconds=time.perf_counter() - start, peak_memory_bytes=peak_memory_bytes(cpu))
        else:
            raise SurgeryError(f"unknown benchmark command {command['op']!r}")


if __name__ == "__main__":
    try:
        serve(sys.argv[1], EngineSetting.from_arg(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    except Exception as error:  # one line for the parent's error message
        print(f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
        sys.exit(1)

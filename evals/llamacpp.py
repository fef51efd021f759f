"""llama.cpp as an evaluation engine, through llama-cpp-python (the `llamacpp` extra, which compiles llama.cpp).

`LlamaCppModel` has the scoring interface of `evals.scoring.LoadedModel`, so every task runs on a GGUF file exactly as
on a transformers model; `measure` is the inference benchmark with the same result keys as `evals.cost.measure`.
Models that are not GGUF files yet are exported first (`surgery/gguf_export.py`), teacher and upgraded model alike,
so both run in the same engine at the same dtype and thread count.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ling_surgery.evals.scoring import Scored
from ling_surgery.surgery.errors import SurgeryError

INSTALL = "pip install 'ling-surgery[llamacpp]' (it compiles llama.cpp: about 5 minutes on 2 cores)"


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise SurgeryError(f"the llama.cpp engine needs llama-cpp-python; run: {INSTALL}") from None
    return llama_cpp


def ensure_gguf(model: str, folder: Path, role: str, dtype: str = "f32") -> Path:
    """`model` as a GGUF file: a .gguf path as it is, anything else exported to `folder/<role>-<dtype>.gguf` once."""
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    from ling_surgery.surgery.gguf_export import export_gguf

    target = folder / f"{role}-{dtype}.gguf"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        export_gguf(model, target, dtype)
    return target


class _Tokenizer:
    """The slice of the transformers tokenizer interface the tasks use, over llama.cpp's own tokenizer."""

    def __init__(self, llm):
        self._llm = llm
        self.eos_token_id = llm.token_eos()

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self._llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._llm.detokenize(list(ids)).decode("utf-8", errors="replace")


class LlamaCppModel:
    """A GGUF model in llama.cpp with the scoring interface of `LoadedModel` (logits come from llama.cpp itself)."""

    def __init__(self, path: str | Path, n_ctx: int = 2048, threads: int | None = None,
                 setting: "EngineSetting | None" = None):
        llama_cpp = require_llama_cpp()
        setting = setting or EngineSetting()
        self.path = Path(path)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads or os.cpu_count(),
                                   logits_all=True, verbose=False, **setting.llama_kwargs())
        self.name = self.path.name
        self.model_type = "gguf:" + self.llm.metadata.get("general.architecture", "?")
        self.scoring_kernels = f"llama.cpp via llama-cpp-python {llama_cpp.__version__} (ggml CPU, {setting.label})"
        self.device = torch.device("cpu")
        self.tokenizer = _Tokenizer(self.llm)
        self.max_length = n_ctx

    @property
    def model(self):
        raise SurgeryError("this evaluation needs a transformers model; the llama.cpp engine scores and generates only")

    def parameters(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_model_n_params(self.llm.model))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def score(self, sequences, starts, batch_tokens: int = 0, max_length: int | None = None, progress=None) -> list[Scored]:
        results = []
        for full, start in zip(sequences, starts):
            seq = full[-self.max_length :]  # left-truncate over-long contexts, as the transformers path does
            start = max(1, start - (len(full) - len(seq)))
            self.llm.reset()
            self.llm.eval(seq)
            logits = torch.from_numpy(np.asarray(self.llm.scores[start - 1 : len(seq) - 1], dtype=np.float32))
            targets = torch.tensor(seq[start:])
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
            results.append(Scored(logprobs, logits.argmax(-1) == targets))
            if progress is not None:
                progress(1, len(seq))
        return results

    def generate(self, prompt: str, max_new_tokens: int = 256, stop: tuple[str, ...] = ("\n\n", "Question:")) -> tuple[str, int]:
        ids = self.encode(prompt)
        self.llm.reset()
        new, text = [], ""
        for token in self.llm.generate(ids, top_k=1, temp=0.0, reset=True):
            if token == self.tokenizer.eos_token_id or len(new) == max_new_tokens:
                break
            new.append(token)
            text = self.tokenizer.decode(new)
            if any(marker in text for marker in stop):
                break
        for marker in stop:
            text = text.split(marker)[0]
        return text, len(new)


# llama.cpp's cache types for K (and V): ggml type id and bytes per value (q8_0 packs 32 values in 34 bytes).
CACHE_TYPES = {"f16": (1, 2.0), "q8_0": (8, 34 / 32)}


@dataclass(frozen=True)
class EngineSetting:
    """One llama.cpp attention configuration: llama-bench's `-fa` and `-ctk/-ctv` (K and V take the same type)."""

    flash_attn: bool = True  # llama.cpp's own default (`--flash-attn auto`) turns it on for CPU backends
    cache_type: str = "f16"

    @property
    def label(self) -> str:
        return f"fa {'on' if self.flash_attn else 'off'}, {self.cache_type} cache"

    def llama_kwargs(self) -> dict:
        """The `llama_cpp.Llama(...)` arguments of this setting."""
        cache_type = CACHE_TYPES[self.cache_type][0]
        return {"flash_attn": self.flash_attn, "type_k": cache_type, "type_v": cache_type}

    def as_arg(self) -> str:
        return f"fa={int(self.flash_attn)},cache={self.cache_type}"

    @classmethod
    def from_arg(cls, arg: str) -> "EngineSetting":
        fields = dict(item.split("=", 1) for item in arg.split(","))
        return cls(flash_attn=fields["fa"] == "1", cache_type=fields["cache"])


def engine_settings(flash_attn: str = "on", cache_type: str = "f16") -> list[EngineSetting]:
    """Every combination of `--flash-attn on,off` and `--cache-type f16,q8_0` that llama.cpp can run.

    llama.cpp quantizes the V cache only inside flash attention, so `fa off` with `q8_0` is left out of a grid; asked
    for alone it is an error.
    """
    switches = {"on": True, "off": False}
    fa = [part.strip() for part in flash_attn.split(",") if part.strip()]
    types = [part.strip() for part in cache_type.split(",") if part.strip()]
    for value in fa:
        if value not in switches:
            raise SurgeryError(f"--flash-attn {value!r} is not supported; use on, off or on,off")
    for value in types:
        if value not in CACHE_TYPES:
            raise SurgeryError(f"--cache-type {value!r} is not supported; supported: {', '.join(CACHE_TYPES)}")
    if not fa or not types:
        raise SurgeryError("--flash-attn and --cache-type need at least one value each, e.g. --flash-attn on,off")
    grid = [EngineSetting(switches[f], t) for f in dict.fromkeys(fa) for t in dict.fromkeys(types)]
    runnable = [s for s in grid if s.flash_attn or s.cache_type == "f16"]
    if not runnable:
        raise SurgeryError(f"llama.cpp quantizes the V cache only with flash attention: --cache-type {cache_type} "
                           "needs --flash-attn on")
    return runnable


def check_contexts(contexts: tuple[int, ...], decode_tokens: int = 16) -> None:
    """The one-pass benchmark decodes `decode_tokens` after each context, so contexts must be further apart."""
    ordered = sorted(contexts)
    for shorter, longer in zip(ordered, ordered[1:]):
        if longer - shorter <= decode_tokens:
            raise SurgeryError(f"--contexts {shorter} and {longer} are too close for llama.cpp's one-pass benchmark: "
                               f"keep them more than {decode_tokens} tokens apart")


def gguf_costs(path: Path, cache_type: str = "f16"):
    """Cache bytes llama.cpp keeps for one sequence, from the file's metadata (KV/latent cache of `cache_type`,
    f32 recurrent states)."""
    from ling_surgery.surgery.plan import Costs
    from ling_surgery.surgery.sources import gguf_metadata

    meta = gguf_metadata(path)
    arch = meta["general.architecture"]
    layers = meta[f"{arch}.block_count"]
    value_bytes = CACHE_TYPES[cache_type][1]
    if arch == "bailingmoe3":
        kv = _gguf_array(path, f"{arch}.attention.head_count_kv")
        n_mla, n_kda = sum(kv), layers - sum(kv)
        heads, dk, kernel = meta[f"{arch}.attention.head_count"], meta[f"{arch}.kda.head_dim"], meta[f"{arch}.ssm.conv_kernel"]
        # MLA caches the latent + rope key only (no V cache: V is the latent, with or without flash attention)
        per_token = n_mla * meta[f"{arch}.attention.key_length"] * value_bytes
        state = n_kda * (heads * dk * dk * 4 + 3 * heads * dk * (kernel - 1) * 4)  # recurrent state and conv taps, f32
        return Costs(0, per_token, state)
    heads_kv = meta.get(f"{arch}.attention.head_count_kv", meta[f"{arch}.attention.head_count"])
    d = meta.get(f"{arch}.attention.key_length", meta[f"{arch}.embedding_length"] // meta[f"{arch}.attention.head_count"])
    return Costs(0, layers * 2 * heads_kv * d * value_bytes, 0)


def _gguf_array(path: Path, key: str) -> list[int]:
    from gguf import GGUFReader

    return [int(v) for v in GGUFReader(path).fields[key].contents()]


# A setting stops at a context where its decode is this much slower than another setting's there *and* has grown
# this much more since the first context: it is not the fastest there and, growing faster, cannot catch up at the
# longer contexts it would go on to, which are the expensive ones (prefill is quadratic in context). Growth matters
# because settings differ at long contexts only: a q8_0 cache is slower at 512 tokens and faster at 16k. The margin
# is wider than the run-to-run noise of a shared 2-core machine (about 10-25%).
DOMINATED_RATIO = 1.25


def measure(path: str | Path, contexts: tuple[int, ...], decode_tokens: int = 16, threads: int | None = None,
            on_row=None, setting: EngineSetting = EngineSetting(), fastest: dict | None = None) -> dict:
    """Prefill and decode speed, cache bytes (llama.cpp's own count for the sequence) and peak memory in llama.cpp.

    One pass over the text: prefill up to the first context, time `decode_tokens` single-token steps (the text's
    own next tokens), prefill on to the next context, and so on. A decode step is exactly what generation does at
    that depth, and the prefill figure is the tokens so far over the prefill time so far, as a fresh prefill of that
    context would report, at a fraction of the time of one prefill per context (32k on a 135M teacher: 12 minutes).

    `fastest` ({context: {"decode_ms_per_token", "growth_ms", "setting"}}, from settings measured before, see
    `fastest_so_far`) stops the pass at a context (not the first or last) where this setting is `DOMINATED_RATIO`
    times slower than the fastest there and its decode has grown that much more since the first context; the
    result says so in `stopped`.
    """
    import resource

    llama_cpp = require_llama_cpp()
    from ling_surgery.evals.cost import COMPUTED_CONTEXTS, context_row
    from ling_surgery.surgery.data import load_documents
    from ling_surgery.surgery.sources import gguf_metadata

    path = Path(path)
    threads = threads or os.cpu_count()
    contexts = tuple(sorted(contexts))
    check_contexts(contexts, decode_tokens)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(contexts) + len(contexts) * decode_tokens + 8, n_batch=512,
                          n_threads=threads, logits_all=False, verbose=False, **setting.llama_kwargs())
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    text = "\n\n".join(load_documents("wikipedia")[: 4 * max(contexts) // 100 + 10]).encode("utf-8")
    tokens = llm.tokenize(text, add_bos=False)
    while len(tokens) < max(contexts) + len(contexts) * decode_tokens:
        tokens = tokens + tokens
    costs = gguf_costs(path, setting.cache_type)
    meta = gguf_metadata(path)
    # Warm-up: the first evaluation pays for thread-pool start and page faults on the weights, which belong to no
    # context length; without it they land in the shortest context's row.
    llm.eval(tokens[:64])
    for k in range(4):
        llm.eval([tokens[64 + k]])
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    rows, cached, prefill_tokens, prefill_seconds, stopped = [], 0, 0, 0.0, None
    for context in contexts:
        start = time.perf_counter()
        llm.eval(tokens[cached:context])
        prefill_seconds += time.perf_counter() - start
        prefill_tokens += context - cached
        cached = context
        measured = int(llama_cpp.llama_state_seq_get_size(llm.ctx, 0))
        start = time.perf_counter()
        for k in range(decode_tokens):
            llm.eval([tokens[cached + k]])
        decode = (time.perf_counter() - start) / decode_tokens
        cached += decode_tokens  # the decoded tokens are context for the next row
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # prefill time of `context` tokens at the rate measured so far (the decoded tokens were timed as decode)
        rows.append(context_row(context, prefill_seconds * context / prefill_tokens, decode, measured, costs, peak,
                                on_row))
        if context != contexts[-1] and (stopped := dominated(rows, (fastest or {}).get(context))):
            break
    file_types = {0: "float32", 1: "float16", 7: "q8_0", 2: "q4_0"}
    return {
        "model": path.name,
        "model_type": "gguf:" + meta["general.architecture"],
        "device": "cpu",
        "dtype": file_types.get(meta.get("general.file_type"), str(meta.get("general.file_type"))),
        "threads": threads,
        "kernels": f"llama.cpp via llama-cpp-python {llama_cpp.__version__} (ggml CPU, {setting.label})",
        "setting": setting.label,
        "parameters": int(llama_cpp.llama_model_n_params(llm.model)),
        "memory_after_load_bytes": baseline,
        "kv_bytes_per_token": costs.kv_bytes_per_token,
        "state_bytes_per_sequence": costs.state_bytes_per_sequence,
        "computed": {str(c): costs.cache_bytes(c) for c in COMPUTED_CONTEXTS},
        "contexts": rows,
        "stopped": stopped,
    }


def dominated(rows: list[dict], best: dict | None) -> str | None:
    """Why a setting measured up to `rows[-1]` should stop (see `DOMINATED_RATIO`), or None to go on."""
    if best is None or len(rows) < 2:  # at the first context only the weights show, not the attention settings
        return None
    decode_ms = rows[-1]["decode_ms_per_token"]
    growth_ms = decode_ms - rows[0]["decode_ms_per_token"]
    if decode_ms > DOMINATED_RATIO * best["decode_ms_per_token"] and growth_ms > DOMINATED_RATIO * max(best["growth_ms"], 0.0):
        return (f"stopped after {rows[-1]['context']}: decode {decode_ms / best['decode_ms_per_token']:.2f}x slower than "
                f"{best['setting']}, and growing faster with context")
    return None


def fastest_so_far(results: list[dict]) -> dict[int, dict]:
    """{context: the fastest decode among `results`, how much it grew since its first context, and its setting}:
    what `measure(fastest=...)` compares to."""
    best: dict[int, dict] = {}
    for result in results:
        first = result["contexts"][0]["decode_ms_per_token"]
        for row in result["contexts"]:
            if row["context"] not in best or row["decode_ms_per_token"] < best[row["context"]]["decode_ms_per_token"]:
                best[row["context"]] = {"decode_ms_per_token": row["decode_ms_per_token"],
                                        "growth_ms": row["decode_ms_per_token"] - first, "setting": result["setting"]}
    return best


def fastest_per_context(results: list[dict]) -> dict:
    """One model measured under several settings → its fastest decode at each context, each row naming its setting.

    The result has `measure`'s keys (the cache numbers of the setting that wins at the longest context) plus
    `settings` ({label: that setting's whole result}), so both the headline and every measurement are kept.
    """
    if len(results) == 1:
        return results[0]
    rows = []
    contexts = sorted({row["context"] for result in results for row in result["contexts"]})
    for context in contexts:
        # settings stopped early (see `measure`'s `fastest`) have no row at the longer contexts
        at_context = [(result, row) for result in results for row in result["contexts"] if row["context"] == context]
        result, row = min(at_context, key=lambda pair: pair[1]["decode_ms_per_token"])
        rows.append({**row, "setting": result["setting"]})
    headline = next(r for r in results if r["setting"] == rows[-1]["setting"])
    labels = ", ".join(result["setting"] for result in results)
    return {**headline, "contexts": rows, "setting": f"fastest of: {labels}",
            "kernels": headline["kernels"].split(" (")[0] + f" (ggml CPU, fastest per context of: {labels})",
            "settings": {result["setting"]: result for result in results}}

"""llama.cpp as an evaluation engine, through llama-cpp-python (the `llamacpp` extra, which compiles llama.cpp).

`LlamaCppModel` has the scoring interface of `evals.scoring.LoadedModel`, so every task runs on a GGUF file exactly as
on a transformers model; the inference benchmark (`evals/llamacpp_bench.py`) reports the keys of `evals.cost.measure`.
Models that are not GGUF files yet are exported first (`surgery/gguf_export.py`), teacher and upgraded model alike,
so both run in the same engine at the same dtype and thread count.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ling_surgery.evals.scoring import Scored
from ling_surgery.surgery.errors import SurgeryError

# llama.cpp's AMX kernels, compiled in wherever the compiler targets a CPU with AMX (-march=native on Sapphire Rapids
# and later), crash llama-cpp-python 0.3.36 on quantized weights: ggml_backend_amx_mul_mat loads a half-initialised
# tile config (general protection fault in `ldtilecfg`; ggml-org/llama.cpp#20824, fix proposed in #26954). The other
# kernels (AVX-512, repacking) are unaffected, so the engine is built without AMX.
NO_AMX_BUILD = 'CMAKE_ARGS="-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"'
INSTALL = f"{NO_AMX_BUILD} pip install 'ling-surgery[llamacpp]' (it compiles llama.cpp: about 5 minutes on 2 cores)"


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise SurgeryError(f"the llama.cpp engine needs llama-cpp-python; run: {INSTALL}") from None
    if "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace"):
        raise SurgeryError("this llama-cpp-python was built with llama.cpp's AMX kernels, which crash on quantized models "
                           "(ggml-org/llama.cpp#20824); rebuild it without them: "
                           f"{NO_AMX_BUILD} pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36")
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

    @functools.cached_property
    def document_end_id(self) -> int | None:
        """The document-end token as `surgery.data` picks it from a transformers vocabulary, found by tokenising."""
        from ling_surgery.surgery.data import DOCUMENT_END_TOKENS

        for token in DOCUMENT_END_TOKENS:
            ids = self._llm.tokenize(token.encode("utf-8"), add_bos=False, special=True)
            if len(ids) == 1:
                return ids[0]
        return self.eos_token_id


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
        """Per sequence, as `scoring.score_tokens`. Sequences run in sorted order and each continues the KV cache of
        the prefix it shares with the one before (a question's options, a haystack's questions): in sorted order that
        runs every shared prefix once. A recurrent state (the upgraded models' KDA) cannot be rolled back to a prefix,
        so for those every sequence starts over."""
        results: list[Scored | None] = [None] * len(sequences)
        kept_sequences = [full[-self.max_length :] for full in sequences]  # left-truncate, as the transformers path
        for index in sorted(range(len(sequences)), key=lambda i: kept_sequences[i]):
            full, seq = sequences[index], kept_sequences[index]
            start = max(1, starts[index] - (len(full) - len(seq)))
            reused = self._cached_prefix(seq)
            self.llm.n_tokens = reused  # `eval` drops the cache from here on
            if reused < len(seq):
                self.llm.eval(seq[reused:])
            logits = torch.from_numpy(np.asarray(self.llm.scores[start - 1 : len(seq) - 1], dtype=np.float32))
            targets = torch.tensor(seq[start:])
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
            results[index] = Scored(logprobs, logits.argmax(-1) == targets)
            if progress is not None:
                progress(1, len(seq))
        return results

    def _cached_prefix(self, seq: list[int]) -> int:
        """How many leading tokens of `seq` the context already holds (0 for recurrent and hybrid models)."""
        import llama_cpp

        model = self.llm.model
        if llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model):
            self.llm.reset()  # clears the recurrent state too
            return 0
        held = self.llm.input_ids[: min(self.llm.n_tokens, len(seq))]
        differs = np.flatnonzero(held != np.asarray(seq[: len(held)]))
        return int(differs[0]) if len(differs) else len(held)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 256,
                 stop: tuple[str, ...] = ("\n\n", "Question:")) -> tuple[str, int]:
        ids = prompt if isinstance(prompt, list) else self.encode(prompt)
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


DECODE_TOKENS = 32  # single-token steps timed at each context of the benchmark


def check_contexts(contexts: tuple[int, ...], decode_tokens: int = DECODE_TOKENS) -> None:
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


def fastest_among(results: list[dict]) -> dict[int, dict]:
    """{context: the fastest decode among `results`, how much it grew since its first context, and its setting}:
    what `dominated` compares a setting to."""
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
        # settings stopped early (see `dominated`) have no row at the longer contexts
        at_context = [(result, row) for result in results for row in result["contexts"] if row["context"] == context]
        result, row = min(at_context, key=lambda pair: pair[1]["decode_ms_per_token"])
        rows.append({**row, "setting": result["setting"]})
    headline = next(r for r in results if r["setting"] == rows[-1]["setting"])
    labels = ", ".join(result["setting"] for result in results)
    return {**headline, "contexts": rows, "setting": f"fastest of: {labels}",
            "kernels": headline["kernels"].split(" (")[0] + f" (ggml CPU, fastest per context of: {labels})",
            "settings": {result["setting"]: result for result in results}}

"""llama.cpp as an evaluation engine, through llama-cpp-python (the `llamacpp` extra, which compiles llama.cpp).

`LlamaCppModel` has the scoring interface of `evals.scoring.LoadedModel`, so every task runs on a GGUF file exactly as
on a transformers model; `measure` is the inference benchmark with the same result keys as `evals.cost.measure`.
Models that are not GGUF files yet are exported first (`surgery/gguf_export.py`), teacher and upgraded model alike,
so both run in the same engine at the same dtype and thread count.
"""

from __future__ import annotations

import os
import time
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

    def __init__(self, path: str | Path, n_ctx: int = 2048, threads: int | None = None):
        llama_cpp = require_llama_cpp()
        self.path = Path(path)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads or os.cpu_count(),
                                   logits_all=True, verbose=False)
        self.name = self.path.name
        self.model_type = "gguf:" + self.llm.metadata.get("general.architecture", "?")
        self.scoring_kernels = f"llama.cpp via llama-cpp-python {llama_cpp.__version__} (ggml CPU)"
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


def gguf_costs(path: Path):
    """Cache bytes llama.cpp keeps for one sequence, from the file's metadata (f16 KV/latent cache, f32 states)."""
    from ling_surgery.surgery.plan import Costs
    from ling_surgery.surgery.sources import gguf_metadata

    meta = gguf_metadata(path)
    arch = meta["general.architecture"]
    layers = meta[f"{arch}.block_count"]
    f16 = 2
    if arch == "bailingmoe3":
        kv = _gguf_array(path, f"{arch}.attention.head_count_kv")
        n_mla, n_kda = sum(kv), layers - sum(kv)
        heads, dk, kernel = meta[f"{arch}.attention.head_count"], meta[f"{arch}.kda.head_dim"], meta[f"{arch}.ssm.conv_kernel"]
        per_token = n_mla * meta[f"{arch}.attention.key_length"] * f16  # MLA caches latent + rope key only
        state = n_kda * (heads * dk * dk * 4 + 3 * heads * dk * (kernel - 1) * 4)  # recurrent state and conv taps, f32
        return Costs(0, per_token, state)
    heads_kv = meta.get(f"{arch}.attention.head_count_kv", meta[f"{arch}.attention.head_count"])
    d = meta.get(f"{arch}.attention.key_length", meta[f"{arch}.embedding_length"] // meta[f"{arch}.attention.head_count"])
    return Costs(0, layers * 2 * heads_kv * d * f16, 0)


def _gguf_array(path: Path, key: str) -> list[int]:
    from gguf import GGUFReader

    return [int(v) for v in GGUFReader(path).fields[key].contents()]


def measure(path: str | Path, contexts: tuple[int, ...], decode_tokens: int = 16, threads: int | None = None,
            on_row=None) -> dict:
    """Prefill and decode speed, cache bytes (llama.cpp's own count for the sequence) and peak memory in llama.cpp."""
    import resource

    llama_cpp = require_llama_cpp()
    from ling_surgery.evals.cost import COMPUTED_CONTEXTS, context_row
    from ling_surgery.surgery.data import load_documents
    from ling_surgery.surgery.sources import gguf_metadata

    path = Path(path)
    threads = threads or os.cpu_count()
    # Flash attention on, as llama.cpp's own default (`--flash-attn auto`) runs it on CPU; llama-cpp-python would
    # otherwise turn it off. Measured on the converted embedded default at 16k context (q8_0): 44 → 34 ms/token; its
    # MLA layers share one latent K/V across all heads, which the fused kernel reads once.
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(contexts) + decode_tokens + 8, n_batch=512, n_threads=threads,
                          logits_all=False, flash_attn=True, verbose=False)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    text = "\n\n".join(load_documents("wikipedia")[: 4 * max(contexts) // 100 + 10]).encode("utf-8")
    tokens = llm.tokenize(text, add_bos=False)
    while len(tokens) < max(contexts) + decode_tokens:
        tokens = tokens + tokens
    costs = gguf_costs(path)
    meta = gguf_metadata(path)
    rows = []
    for context in sorted(contexts):
        llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        start = time.perf_counter()
        llm.eval(tokens[:context])
        prefill = time.perf_counter() - start
        measured = int(llama_cpp.llama_state_seq_get_size(llm.ctx, 0))
        start = time.perf_counter()
        for k in range(decode_tokens):
            llm.eval([tokens[context + k]])
        decode = (time.perf_counter() - start) / decode_tokens
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rows.append(context_row(context, prefill, decode, measured, costs, peak, on_row))
    file_types = {0: "float32", 1: "float16", 7: "q8_0", 2: "q4_0"}
    return {
        "model": path.name,
        "model_type": "gguf:" + meta["general.architecture"],
        "device": "cpu",
        "dtype": file_types.get(meta.get("general.file_type"), str(meta.get("general.file_type"))),
        "threads": threads,
        "kernels": f"llama.cpp via llama-cpp-python {llama_cpp.__version__} (ggml CPU, flash attention, f16 KV cache)",
        "parameters": int(llama_cpp.llama_model_n_params(llm.model)),
        "memory_after_load_bytes": baseline,
        "kv_bytes_per_token": costs.kv_bytes_per_token,
        "state_bytes_per_sequence": costs.state_bytes_per_sequence,
        "computed": {str(c): costs.cache_bytes(c) for c in COMPUTED_CONTEXTS},
        "contexts": rows,
    }

"""The teacher's top-k next-token log-probabilities, computed once before a stage and read from disk while it trains
(`stages.<pretrain>.teacher_topk: k`), so the teacher need not sit in accelerator memory while the student trains.

The loss they feed (`topk_kl_divergence`) is the KL between teacher and student coarse-grained to k + 1 outcomes:
each of the teacher's top k tokens, and "any other token" carrying the rest of the mass. By the data-processing
inequality (Cover & Thomas, Elements of Information Theory, Thm 2.8.1) it is at most the full KL and equals it when
the teacher's tail is empty (k = vocabulary); unlike renormalising the top k — which biases the student towards an
over-confident teacher (Anshumann et al. 2025, "Sparse Logit Sampling") — the student still puts on the other tokens
the mass the teacher does.

Format (version 1), one folder per key under the run folder's `teacher-logits/`:

    meta.json        {"format": 1, "key", "teacher", "k", "temperature", "seq_len", "precision", "first_window",
                      "windows", "batches_sha256"}
    logprobs.f32     (windows · seq_len, k) little-endian float32: log softmax(teacher logits / temperature) of the
                     teacher's top k tokens at each position, largest first
    indices.i32      (windows · seq_len, k) little-endian int32: those tokens' ids

Row block w holds the stage's window `first_window + w` (its copy windows as trained, `training.stage_batches`). The
key hashes the teacher, k, temperature, window length, precision (autocast, teacher dtype) and a SHA-256 of every training batch's tokens and positions,
so another teacher, text or copy-window setting computes again; opening checks every size against meta.json, and a
folder that fails is computed again, never trusted. A kill while computing leaves a `.partial-*` folder that the next
run removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ling_surgery.surgery.errors import SurgeryError

FORMAT = 1
LOGPROB_DTYPE, INDEX_DTYPE = np.dtype("<f4"), np.dtype("<i4")


@dataclass
class TeacherTopK:
    """A stage's stored teacher top-k (memory-mapped), read per micro-batch."""

    logprobs: np.ndarray  # (windows · seq_len, k)
    indices: np.ndarray
    first_window: int
    seq_len: int
    folder: Path

    @property
    def k(self) -> int:
        return self.logprobs.shape[1]

    def batch(self, window: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs, indices), each (rows, seq_len, k), of the `rows` windows from stage window `window`."""
        first = (window - self.first_window) * self.seq_len
        last = first + rows * self.seq_len
        if first < 0 or last > len(self.logprobs):
            raise SurgeryError(f"the teacher's top-k in {self.folder} hold no windows {window}–{window + rows - 1}; "
                               "remove that folder and run again")
        shape = (rows, self.seq_len, self.k)
        return (torch.from_numpy(np.array(self.logprobs[first:last])).view(shape),
                torch.from_numpy(np.array(self.indices[first:last]).astype(np.int64)).view(shape))


def topk_kl_divergence(teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor, student_logits: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) over the teacher's top k tokens plus one bucket for all others, × τ²
    (see the module doc). `teacher_logprobs` are log softmax(teacher / τ) at `teacher_indices`."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_indices)
    t = teacher_logprobs.float()
    p = t.exp()
    top = (p * (t - s)).sum(-1)
    # The rest: 1 − Σ top-k, clamped (a float sum can pass 1). A tail the teacher does not have adds nothing.
    rest_t = (1 - p.sum(-1)).clamp_min(0)
    rest_s = (1 - s.exp().sum(-1)).clamp_min(1e-30)
    tail = torch.where(rest_t > 0, rest_t * (rest_t.clamp_min(1e-30).log() - rest_s.log()), torch.zeros_like(rest_t))
    return (top + tail).mean() * temperature**2


def teacher_topk(teacher, batches, k: int, temperature: float, seq_len: int, first_window: int, windows: int,
                 teacher_name: str, root: Path, console=None, autocast=nullcontext,
                 precision: str = "fp32") -> TeacherTopK:
    """The teacher's top-k for a stage's `windows` windows from `first_window`, from `root/<key>` or computed there
    now. `batches()` yields the stage's micro-batches (window, input_ids, position_ids) in training order; it is read
    twice: once to key the text, once to compute. The teacher runs under `autocast()`, as it does in the loop;
    `precision` names that setting, and it and the teacher's dtype are part of the key (bf16 top-k are not fp32's).
    Over several processes the main one computes and the others read what it wrote."""
    from accelerate import PartialState

    digest = hashlib.sha256()
    for _, input_ids, position_ids in batches():
        digest.update(input_ids.numpy().astype("<i8").tobytes())
        digest.update(b"" if position_ids is None else position_ids.numpy().astype("<i8").tobytes())
    k = min(k, teacher.config.vocab_size)
    meta = {"format": FORMAT, "teacher": teacher_name, "k": k, "temperature": temperature, "seq_len": seq_len,
            "precision": f"{precision}, teacher {str(next(teacher.parameters()).dtype).replace('torch.', '')}",
            "first_window": first_window, "windows": windows, "batches_sha256": digest.hexdigest()}
    meta["key"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode("utf-8")).hexdigest()[:32]
    on_cpu = next(teacher.parameters()).device.type == "cpu"
    with PartialState(cpu=on_cpu).main_process_first():
        return _open_or_compute(teacher, batches, meta, root, console, autocast)


def _open_or_compute(teacher, batches, meta: dict, root: Path, console, autocast) -> TeacherTopK:
    from ling_surgery.surgery.distill import teacher_forward
    from ling_surgery.surgery.progress import training_progress

    key, k, temperature = meta["key"], meta["k"], meta["temperature"]
    first_window, seq_len, rows = meta["first_window"], meta["seq_len"], meta["windows"] * meta["seq_len"]
    folder = root / key
    stored = open_topk(folder, key)
    if stored is not None:
        if console is not None:
            console.print(f"teacher top-{k}: read from {folder}")
        return stored
    for stale in root.glob(f"{key}.partial-*"):  # a killed run's
        shutil.rmtree(stale, ignore_errors=True)
    partial = root / f"{key}.partial-{os.getpid()}"
    device = next(teacher.parameters()).device
    try:
        partial.mkdir(parents=True)
        values = np.memmap(partial / "logprobs.f32", dtype=LOGPROB_DTYPE, mode="w+", shape=(rows, k))
        indices = np.memmap(partial / "indices.i32", dtype=INDEX_DTYPE, mode="w+", shape=(rows, k))
        with training_progress(f"teacher top-{k}", rows, console) as progress, torch.no_grad():
            for window, input_ids, position_ids in batches():
                with autocast():
                    logits = teacher_forward(teacher, input_ids.to(device),
                                             None if position_ids is None else position_ids.to(device)).logits
                top = torch.topk(F.log_softmax(logits.float() / temperature, dim=-1), k, dim=-1)
                first = (window - first_window) * seq_len
                block = slice(first, first + input_ids.numel())
                values[block] = top.values.flatten(0, 1).cpu().numpy()
                indices[block] = top.indices.flatten(0, 1).cpu().numpy().astype(INDEX_DTYPE)
                progress.advance(input_ids.numel())
        values.flush()
        indices.flush()
        del values, indices
        (partial / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)  # failed the check above
        os.replace(partial, folder)
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise SurgeryError(f"cannot write the teacher's top-{k} to {root}: {err.strerror or err}; free space there, or "
                           "set teacher_topk: 0 to keep the teacher in the loop") from None
    if console is not None:
        console.print(f"teacher top-{k}: {rows:,} positions written to {folder} ({rows * k * 8 / 2**20:,.1f} MiB)")
    stored = open_topk(folder, key)
    if stored is None:
        raise SurgeryError(f"the teacher's top-k in {folder} do not read back; remove that folder and run again")
    return stored


def open_topk(folder: Path, key: str | None = None) -> TeacherTopK | None:
    """A stored teacher top-k, memory-mapped, or None when missing or not matching its meta.json."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT or (key is not None and meta.get("key") != key):
            return None
        rows, k = meta["windows"] * meta["seq_len"], meta["k"]
        arrays = []
        for name, dtype in (("logprobs.f32", LOGPROB_DTYPE), ("indices.i32", INDEX_DTYPE)):
            path = folder / name
            if rows * k == 0 or path.stat().st_size != rows * k * dtype.itemsize:
                return None
            arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(rows, k)))
        return TeacherTopK(arrays[0], arrays[1], meta["first_window"], meta["seq_len"], folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None

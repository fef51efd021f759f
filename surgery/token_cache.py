"""Documents tokenised once: a flat token array on disk, memory-mapped, shared by every run that reads the same text.

A source's documents are tokenised the first time a run reads them (through a `datasets.IterableDataset`, in batches)
and written to the token cache — `$LING_SURGERY_CACHE` or `~/.cache/ling-surgery` — under a key made of everything
the tokens depend on: the source (its files' paths, sizes and modification times; a hub dataset's name, subset and
how much of it was streamed), the text field, the held-out fraction and the tokenizer (its full serialised form).
Later runs open the arrays memory-mapped and read only the windows they train on, so a stream's RAM is its document
index (three int64 per document), not its tokens.

Format (version 1), one folder per key, written to a temporary folder and renamed into place:

    meta.json                 {"format": 1, "key": …, "description": …, "splits": {"train": {"documents", "tokens"}, …}}
    train.tokens              every train document's tokens one after another, little-endian uint32
    train.offsets.npy         int64 (documents + 1): document i is tokens[offsets[i] : offsets[i + 1]]
    heldout.tokens / heldout.offsets.npy   the same for the held-out documents

Opening checks every array against meta.json (sizes, monotone offsets ending at the token count); a cache that fails
is tokenised again, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ling_surgery.surgery.errors import SurgeryError

FORMAT = 1
SPLITS = ("train", "heldout")
TOKEN_DTYPE = np.dtype("<u4")


@dataclass
class DocumentTokens:
    """Documents as one flat token array (in RAM or memory-mapped) and where each begins."""

    tokens: np.ndarray  # (N,) uint32
    offsets: np.ndarray  # (D + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    @classmethod
    def tokenize(cls, docs: list[str], tokenizer, end_id: int | None, write_to: Path | None = None,
                 progress=None) -> "DocumentTokens":
        """Tokenise `docs` in batches through `datasets` (`data.document_ids` per document); the tokens go to the file
        `write_to` as they come (then memory-mapped) or stay in RAM. `progress(n_documents)` is called per batch."""
        import datasets

        from ling_surgery.surgery.data import batch_document_ids

        rows = datasets.IterableDataset.from_generator(_rows, gen_kwargs={"docs": docs}).map(
            lambda batch: {"input_ids": batch_document_ids(tokenizer, batch["text"], end_id)},
            batched=True, batch_size=1_000, remove_columns=["text"])
        lengths, chunks, pending = [], [], []
        sink = open(write_to, "wb") if write_to is not None else None
        try:
            for row in rows:
                pending.append(np.asarray(row["input_ids"], dtype=TOKEN_DTYPE))
                lengths.append(len(pending[-1]))
                if len(pending) == 1_000:
                    chunks.append(_flush(pending, sink))
                    if progress is not None:
                        progress(1_000)
            if pending:
                if progress is not None:
                    progress(len(pending))
                chunks.append(_flush(pending, sink))
        finally:
            if sink is not None:
                sink.close()
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if write_to is not None:
            return cls(_map(write_to, int(offsets[-1])), offsets)
        return cls(np.concatenate(chunks) if chunks else np.zeros(0, TOKEN_DTYPE), offsets)


def _rows(docs):
    for doc in docs:
        yield {"text": doc}


def _flush(pending: list, sink) -> np.ndarray | None:
    block = np.concatenate(pending) if pending else np.zeros(0, TOKEN_DTYPE)
    pending.clear()
    if sink is None:
        return block
    sink.write(block.tobytes())
    return None


def _map(path: Path, n_tokens: int) -> np.ndarray:
    if n_tokens == 0:  # an empty file cannot be memory-mapped
        return np.zeros(0, TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(n_tokens,))


def cache_root() -> Path:
    root = os.environ.get("LING_SURGERY_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "ling-surgery"


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything the tokenizer's output depends on: its serialised pipeline (vocabulary, merges, normalisers,
    post-processor — which adds BOS), or for a slow tokenizer its vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps([type(tokenizer).__name__, tokenizer.special_tokens_map, getattr(tokenizer, "add_bos_token", None),
                           getattr(tokenizer, "add_eos_token", None)], sort_keys=True, default=str)
    return hashlib.sha256((text + specials).encode("utf-8")).hexdigest()


def source_identity(source: str, max_chars: int | None, subset: str | None) -> dict:
    """What identifies a source's text without reading it: paths, sizes and modification times of its files (a hub
    dataset: its name, subset and how many characters were streamed)."""
    from ling_surgery.surgery.data import folder_files, locate_documents

    kind, where = locate_documents(source)
    if kind == "hub":
        return {"hub": str(where), "subset": subset, "max_chars": max_chars}
    files = folder_files(Path(where)) if kind == "folder" else [Path(where)]
    return {kind: source, "files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def split_tokens(source: str, text_field: str, subset: str | None, heldout_fraction: float, max_chars: int | None,
                 tokenizer, console=None) -> tuple[DocumentTokens, DocumentTokens, bool]:
    """(train, held-out, from_cache): a source's documents split (`data.split_heldout`) and tokenised, from the token
    cache, or read, tokenised and cached now."""
    from ling_surgery.surgery.data import document_end_id, load_documents, split_heldout
    from ling_surgery.surgery.progress import training_progress

    end_id = document_end_id(tokenizer)
    identity = {"format": FORMAT, "source": source_identity(source, max_chars, subset), "text_field": text_field,
                "heldout_fraction": heldout_fraction, "tokenizer": tokenizer_fingerprint(tokenizer), "end_id": end_id}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:32]
    folder = cache_root() / "tokens" / key
    cached = open_cached(folder, key)
    if cached is not None:
        return cached[0], cached[1], True
    splits = split_heldout(load_documents(source, text_field, max_chars, subset), heldout_fraction)
    for stale in folder.parent.glob(f"{key}.partial-*"):  # a killed tokenisation's (a live one's is left alone)
        if not _process_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    partial = folder.with_name(f"{key}.partial-{os.getpid()}")
    try:
        partial.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "key": key, "description": f"{source} (field {text_field!r})", "identity": identity,
                "splits": {}}
        with training_progress(f"tokenising {source}", sum(map(len, splits)), console, unit="docs") as bar:
            for split, docs in zip(SPLITS, splits):
                parts = DocumentTokens.tokenize(docs, tokenizer, end_id, partial / f"{split}.tokens", bar.advance)
                np.save(partial / f"{split}.offsets.npy", parts.offsets)
                meta["splits"][split] = {"documents": len(parts), "tokens": int(parts.offsets[-1])}
                del parts  # drops the memory map before the folder is renamed
        (partial / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists() and open_cached(folder, key) is None:
            shutil.rmtree(folder)  # damaged (checked above): out of the way
        try:
            os.replace(partial, folder)
        except OSError:  # another run cached the same text meanwhile: use theirs
            shutil.rmtree(partial, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise SurgeryError(f"cannot write the token cache {folder.parent}: {err.strerror or err}; free space there or set "
                           "LING_SURGERY_CACHE to another folder") from None
    cached = open_cached(folder, key)
    if cached is None:
        raise SurgeryError(f"the token cache {folder} does not read back; remove it and run again")
    return cached[0], cached[1], False


def open_cached(folder: Path, key: str | None = None) -> tuple[DocumentTokens, DocumentTokens] | None:
    """A cached source's (train, held-out) tokens, memory-mapped; None when the folder is missing or does not match
    its meta.json (a cache is derived data: one that fails a check is rebuilt, not trusted)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT or (key is not None and meta.get("key") != key):
            return None
        out = []
        for split in SPLITS:
            expect = meta["splits"][split]
            path = folder / f"{split}.tokens"
            offsets = np.load(folder / f"{split}.offsets.npy", allow_pickle=False)
            if (offsets.dtype != np.int64 or len(offsets) != expect["documents"] + 1 or offsets[0] != 0
                    or offsets[-1] != expect["tokens"] or np.any(np.diff(offsets) < 0)
                    or path.stat().st_size != expect["tokens"] * TOKEN_DTYPE.itemsize):
                return None
            out.append(DocumentTokens(_map(path, expect["tokens"]), offsets))
        return out[0], out[1]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _process_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's
        return True
    return True

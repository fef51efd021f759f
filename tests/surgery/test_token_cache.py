"""The token cache: documents tokenised once through `datasets`, memory-mapped, keyed by what the tokens depend on,
checked on every open, written atomically — and a stream over it equal to one over the text."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import bpe_tokenizer, char_tokenizer

from ling_surgery.surgery import token_cache
from ling_surgery.surgery.data import TokenStream, batch_document_ids, document_end_id, document_ids, split_heldout
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.token_cache import DocumentTokens, cache_root, split_tokens


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LING_SURGERY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": f"document {i}: " + " ".join(f"word{(i * 7 + j) % 23}" for j in range(3 + i % 9))} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path, [r["text"] for r in rows]


def test_a_batch_is_tokenised_as_each_document_alone():
    tok = bpe_tokenizer()
    texts = ["one two", "three four five", ""]
    end = document_end_id(tok)
    assert batch_document_ids(tok, texts, end) == [document_ids(tok, t, end) for t in texts] != []
    assert all(ids[-1] == end for ids in batch_document_ids(tok, texts, end))


def test_a_source_is_tokenised_once_then_read_memory_mapped_from_the_cache(cache, corpus):
    path, texts = corpus
    tok = bpe_tokenizer()
    train, heldout, hit = split_tokens(str(path), "text", None, 0.1, None, tok)
    assert not hit and len(list(cache.iterdir())) == 1
    again_train, again_heldout, hit = split_tokens(str(path), "text", None, 0.1, None, tok)
    assert hit and isinstance(again_train.tokens, np.memmap)
    # The cached documents are the text's split, tokenised as the stream tokenises them.
    expect_train, expect_heldout = split_heldout(texts, 0.1)
    end = document_end_id(tok)
    for part, docs in ((again_train, expect_train), (again_heldout, expect_heldout)):
        assert len(part) == len(docs) > 0
        assert [part.document(i).tolist() for i in range(len(part))] == [document_ids(tok, d, end) for d in docs]
    np.testing.assert_array_equal(train.offsets, again_train.offsets)


def test_a_stream_over_cached_tokens_equals_the_stream_over_the_text(cache, corpus):
    path, texts = corpus
    tok = bpe_tokenizer()
    cached, _, _ = split_tokens(str(path), "text", None, 0.1, None, tok)
    docs, _ = split_heldout(texts, 0.1)
    from_text = TokenStream.from_mixture([("a", docs, 0.5), ("b", docs[::-1], 0.5)], tok, max_tokens=900, seed=3)
    from_cache = TokenStream.from_mixture([("a", cached, 0.5), ("b", DocumentTokens.tokenize(docs[::-1], tok, document_end_id(tok)),
                                                                   0.5)], tok, max_tokens=900, seed=3)
    assert len(from_cache) == len(from_text) == 900
    assert torch.equal(from_cache.tokens, from_text.tokens) and torch.equal(from_cache.starts, from_text.starts)
    windows = from_cache.windows(64)
    assert windows.shape == (14, 64)
    assert torch.equal(windows[2:5], from_text.tokens[: 14 * 64].view(14, 64)[2:5])
    picks = torch.tensor([0, 899, 450, 17])
    assert torch.equal(from_cache[picks], from_text.tokens[picks]) and torch.equal(windows[-1], from_text.tokens[832:896])


def test_what_the_tokens_depend_on_is_in_the_key(cache, corpus):
    path, _ = corpus
    split_tokens(str(path), "text", None, 0.1, None, bpe_tokenizer())
    _, _, hit = split_tokens(str(path), "text", None, 0.1, None, char_tokenizer())  # another tokenizer
    assert not hit
    _, _, hit = split_tokens(str(path), "text", None, 0.2, None, bpe_tokenizer())  # another held-out split
    assert not hit
    path.write_text(json.dumps({"text": "rewritten"}) + "\n")  # the file changed
    os.utime(path, ns=(1, 1))
    train, heldout, hit = split_tokens(str(path), "text", None, 0.1, None, bpe_tokenizer())
    assert not hit and len(train) == len(heldout) == 1  # one document: its tail held out
    assert len(list(cache.iterdir())) == 4


@pytest.mark.parametrize("damage", ["truncated tokens", "offsets past the end", "meta for another key", "no meta"])
def test_a_damaged_cache_is_tokenised_again_not_trusted(cache, corpus, damage):
    path, _ = corpus
    tok = bpe_tokenizer()
    first, _, _ = split_tokens(str(path), "text", None, 0.1, None, tok)
    expect = [first.document(i).tolist() for i in range(len(first))]
    del first
    (folder,) = cache.iterdir()
    if damage == "truncated tokens":
        data = (folder / "train.tokens").read_bytes()
        (folder / "train.tokens").write_bytes(data[:-4])
    elif damage == "offsets past the end":
        offsets = np.load(folder / "train.offsets.npy")
        offsets[-1] += 1
        np.save(folder / "train.offsets.npy", offsets)
    elif damage == "meta for another key":
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "key": "0" * 32}))
    else:
        (folder / "meta.json").unlink()
    assert token_cache.open_cached(folder, folder.name) is None
    # The damaged folder is in the way of the rebuild's rename: the rebuild is used all the same.
    train, _, hit = split_tokens(str(path), "text", None, 0.1, None, tok)
    assert not hit and [train.document(i).tolist() for i in range(len(train))] == expect


def test_a_write_that_fails_is_one_line_and_leaves_no_partial_folder(cache, corpus, monkeypatch):
    path, _ = corpus

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DocumentTokens, "tokenize", disk_full)
    with pytest.raises(SurgeryError, match=r"cannot write the token cache .*No space left on device; free space there or "
                                           r"set LING_SURGERY_CACHE"):
        split_tokens(str(path), "text", None, 0.1, None, bpe_tokenizer())
    assert list(cache.iterdir()) == []


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LING_SURGERY_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("LING_SURGERY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "ling-surgery"

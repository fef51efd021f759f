"""Text as documents: special tokens per document, boundaries kept, held-out text never trained on, and bad data as
one line naming the file (and line)."""

import json

import pytest
import torch
from helpers import bpe_tokenizer

from ling_surgery.surgery.data import (
    TokenStream,
    document_end_id,
    load_documents,
    split_heldout,
)
from ling_surgery.surgery.errors import SurgeryError


class BosTokenizer:
    """A Llama-3-like tokenizer in miniature: adds BOS itself and ends documents with <|end_of_text|>."""

    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|eot_id|>": 2}
    eos_token_id = 2  # an instruct model's eos is its end of turn, not the end of a document

    def get_vocab(self):
        return dict(self.vocab)

    def __call__(self, text, add_special_tokens=True):
        ids = [10 + ord(c) % 50 for c in text]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}


def test_each_document_gets_its_tokenizers_special_tokens_and_the_stream_keeps_where_each_starts():
    docs = ["abc", "de", "fghi"]
    stream = TokenStream.from_documents(docs, BosTokenizer(), seed=0)
    starts = stream.starts.tolist()
    pieces = [stream.tokens[a:b].tolist() for a, b in zip(starts, starts[1:] + [len(stream.tokens)])]
    assert sorted(len(p) for p in pieces) == [4, 5, 6]  # BOS + text + document end, for every document
    assert all(p[0] == 0 and p[-1] == 1 for p in pieces)  # <|begin_of_text|> … <|end_of_text|>, not <|eot_id|>
    assert len(stream.tokens) == 15


def test_a_gpt2_style_tokenizer_ends_documents_with_endoftext():
    tok = bpe_tokenizer()
    end = document_end_id(tok)
    assert tok.convert_ids_to_tokens(end) in ("<|endoftext|>", tok.eos_token)
    stream = TokenStream.from_documents(["one two", "three"], tok)
    ends = [int(stream.tokens[s - 1]) for s in stream.starts.tolist()[1:]] + [int(stream.tokens[-1])]
    assert ends == [end, end]


def test_a_tokenizer_without_an_end_token_separates_documents_by_a_blank_line():
    class NoEnd(BosTokenizer):
        vocab = {"<|begin_of_text|>": 0}
        eos_token_id = None

    stream = TokenStream.from_documents(["ab", "cd"], NoEnd(), seed=0)
    blank = NoEnd()("\n\n", add_special_tokens=False)["input_ids"]
    assert document_end_id(NoEnd()) is None and stream.tokens[3:5].tolist() == blank and len(stream.tokens) == 10


def test_max_tokens_cuts_the_stream_and_windows_name_the_text_that_is_too_short():
    stream = TokenStream.from_documents(["abcdef"] * 10, BosTokenizer(), max_tokens=20, source="training text of 'x'")
    assert len(stream.tokens) == 20 and stream.starts.tolist() == [0, 8, 16]
    assert stream.windows(8).shape == (2, 8)
    with pytest.raises(SurgeryError, match="training text of 'x' holds 20 tokens, not enough for one window of 32"):
        stream.windows(32)


def test_a_txt_file_is_one_document_and_its_tail_is_held_out(tmp_path):
    path = tmp_path / "book.txt"
    paragraphs = [f"Paragraph {i} says something of its own." for i in range(40)]
    path.write_text("\n\n".join(paragraphs))
    docs = load_documents(str(path))
    assert docs == [path.read_text()]
    train, heldout = split_heldout(docs, 0.1)
    assert len(train) == len(heldout) == 1
    assert heldout[0].startswith("Paragraph 36") and train[0].endswith("Paragraph 35 says something of its own.")
    assert not set(train[0].split("\n\n")) & set(heldout[0].split("\n\n"))  # no paragraph on both sides


def test_many_documents_are_split_by_a_stable_hash():
    docs = [f"document number {i}" for i in range(400)]
    train, heldout = split_heldout(docs, 0.1)
    assert not set(train) & set(heldout) and len(train) + len(heldout) == 400 and 20 < len(heldout) < 60
    assert split_heldout(list(reversed(docs)), 0.1)[1] == list(reversed(heldout))


def test_a_folder_is_the_documents_of_its_files(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n" + json.dumps({"text": "third"}))
    (tmp_path / ".hidden.txt").write_text("never read")
    (tmp_path / "notes.csv").write_text("skipped")
    assert load_documents(str(tmp_path)) == ["first file", "second", "third"]
    (empty := tmp_path / "empty").mkdir()
    with pytest.raises(SurgeryError, match="holds no .txt"):
        load_documents(str(empty))


@pytest.mark.parametrize("name, content, message", [
    ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"), r"latin1.txt:1: not UTF-8 text \(byte 0xe9 at offset 3\)"),
    ("late.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"late.jsonl:2: not UTF-8 text"),
    ("empty.json", b"", r"empty.json is empty"),
    ("broken.jsonl", b'{"text": "ok"}\n\n{"text": "no end"\n', r"broken.jsonl:3: not valid JSON \(.*\); fix or remove"),
    ("broken.json", b'[{"text": "a"},\n {"text": ]', r"broken.json:2: not valid JSON"),
    ("scalar.json", b'"just a string"', r"scalar.json: holds a single JSON value"),
    ("field.jsonl", b'{"body": "x"}\n', r"field.jsonl: record 1 has no field 'text'; fields: body \(set data.text_field\)"),
    ("number.jsonl", b'{"text": "x"}\n7\n', r"number.jsonl: record 2 is a JSON int"),
    ("blank.txt", b"  \n\n ", r"holds no text"),
])
def test_bad_data_is_one_line_naming_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SurgeryError, match=message) as err:
        load_documents(str(path))
    assert "\n" not in str(err.value)


def test_stream_tensors_are_int64():
    stream = TokenStream.from_documents(["abc"], BosTokenizer())
    assert stream.tokens.dtype == torch.long and stream.starts.dtype == torch.long


def test_positions_restart_at_each_document_and_at_each_window():
    stream = TokenStream.of_tokens(torch.arange(20), starts=torch.tensor([0, 3, 11, 12]))
    positions = stream.positions(torch.tensor([0, 1, 2]), 6)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2],  # document 2 starts at token 3
                                  [0, 1, 2, 3, 4, 0],  # window 1 begins inside document 2; document 3 at token 11
                                  [0, 1, 2, 3, 4, 5]]  # token 12 starts the last document, window 2 begins there
    ids, pos = next(stream.batches(6, 2, start=2))
    assert torch.equal(ids, torch.stack([torch.arange(12, 18), torch.arange(0, 6)]))  # wraps around
    assert torch.equal(pos, torch.stack([positions[2], positions[0]]))
    assert next(stream.batches(6, 2, documents=False))[1] is None
    assert TokenStream.of_tokens(torch.arange(12)).positions(torch.tensor([1]), 6).tolist() == [list(range(6))]


class WordTokenizer:
    """One token per word (ids from a growing table), documents ended by id 1."""

    eos_token_id = 1

    def __init__(self):
        self.table = {"<end>": 1}

    def get_vocab(self):
        return {"<|endoftext|>": 1}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.table.setdefault(w, len(self.table) + 1) for w in text.split()]}


def _source(name, n_docs, words=5):
    return [" ".join(f"{name}{d}w{i}" for i in range(words)) for d in range(n_docs)]


def test_a_mixture_holds_each_sources_share_in_every_prefix():
    tok = WordTokenizer()
    sources = [("a", _source("a", 400), 0.7), ("b", _source("b", 400, words=11), 0.3)]
    stream = TokenStream.from_mixture(sources, tok, max_tokens=3000, seed=0)
    assert len(stream.tokens) == 3000
    assert stream.shares() == pytest.approx({"a": 0.7, "b": 0.3}, abs=0.01)
    names = {v: k[0] for k, v in tok.table.items()}
    ends = torch.cat([stream.starts[1:], torch.tensor([len(stream.tokens)])])
    for prefix in (300, 1000, 2000):  # tokens of a's documents (their end tokens included) among the first `prefix`
        share = sum(min(end, prefix) - start for start, end in zip(stream.starts.tolist(), ends.tolist())
                    if start < prefix and names[int(stream.tokens[start])] == "a") / prefix
        assert share == pytest.approx(0.7, abs=12 / prefix + 0.005)  # within one document (12 tokens) of the share


def test_text_that_runs_out_is_an_error_naming_the_source_unless_epochs_allow_another_pass():
    tok = WordTokenizer()
    sources = [("wiki", _source("a", 100), 0.5), ("chat", _source("b", 10), 0.5)]  # chat: 60 tokens
    with pytest.raises(SurgeryError, match=r"'chat' runs out after 60 tokens .* set data.epochs: 2"):
        TokenStream.from_mixture(sources, tok, max_tokens=400, needed=200, label="training text")
    two = TokenStream.from_mixture(sources, tok, max_tokens=400, needed=110, epochs=2)
    assert len(two.tokens) >= 110
    first_pass = TokenStream.from_mixture([("chat", _source("b", 10), 1.0)], tok, epochs=2)
    docs = first_pass.tokens.view(20, 6)[:, 0].tolist()
    assert sorted(docs[:10]) == sorted(docs[10:]) and docs[:10] != docs[10:]  # the second pass is reshuffled


def test_a_single_source_keeps_its_seeded_order():
    tok = WordTokenizer()
    docs = _source("a", 50)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(3)).tolist()
    stream = TokenStream.from_documents(docs, tok, seed=3)
    expected = [tok.table[f"a{d}w0"] for d in order]
    assert stream.tokens.view(50, 6)[:, 0].tolist() == expected


def test_chitchat_is_a_packaged_corpus_of_conversations():
    docs = load_documents("chitchat")
    assert len(docs) > 7000 and all(docs) and sum("\n" in d for d in docs) > 3000  # one line per turn


def test_a_later_stream_starts_after_the_documents_an_earlier_one_read_whatever_the_mixture():
    tok = WordTokenizer()
    wiki, chat = _source("a", 300), _source("b", 300)
    first = TokenStream.from_mixture([("wiki", wiki, 1.0)], tok, max_tokens=600, seed=5)
    read = first.documents_read(600)
    assert read == {"wiki": 100}  # 6-token documents
    later = TokenStream.from_mixture([("chat", chat, 0.5), ("wiki", wiki, 0.5)], tok, max_tokens=600, seed=5, skip=read)
    first_docs = {int(t) for t in first.tokens[first.starts]}
    later_wiki = {int(t) for t, s in zip(later.tokens[later.starts], later.document_sources) if s == 1}
    assert later_wiki and not (later_wiki & first_docs)  # no document read twice
    alone = TokenStream.from_mixture([("wiki", wiki, 1.0)], tok, max_tokens=1200, seed=5)
    assert {int(t) for t in alone.tokens[alone.starts][100:150]} == later_wiki  # the same order, continued
    assert later.documents_read(600) == {"chat": 50, "wiki": 150}  # cumulative: skipped ones included

"""The llama.cpp engine: scoring and the inference benchmark on GGUF files, teacher and upgraded model side by side."""

import importlib.util
import sys

import pytest
import torch
from helpers import bpe_tokenizer, gguf_ready_student, gguf_ready_teacher
from rich.console import Console

from ling_surgery.evals.suite import run_eval
from ling_surgery.surgery.errors import SurgeryError


def test_missing_llama_cpp_is_a_one_line_error_with_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if the extra were absent
    with pytest.raises(SurgeryError, match=r"needs llama-cpp-python; run: pip install 'ling-surgery\[llamacpp\]'"):
        run_eval({"model": str(tmp_path / "m.gguf")}, ["wikipedia"], engine="llamacpp", console=Console(quiet=True))
    with pytest.raises(SurgeryError, match="--engine 'vllm' is not supported; supported: transformers, llamacpp"):
        run_eval({"model": "x"}, [], engine="vllm", console=Console(quiet=True))


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python not installed (pip install 'ling-surgery[llamacpp]')")
def test_llama_cpp_engine_scores_and_benchmarks_gguf_files(tmp_path):
    from ling_surgery.surgery.gguf_export import write_gguf

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    files = {}
    for role, model in (("teacher", gguf_ready_teacher(tok)), ("student", gguf_ready_student(tok))):
        files[role] = tmp_path / f"{role}.gguf"
        write_gguf(model, tok, files[role], "f32")
        # the same perplexity through transformers, on the same windows, for the parity check below
        model.save_pretrained(tmp_path / role)
        tok.save_pretrained(tmp_path / role)
    gguf_report = run_eval({r: str(p) for r, p in files.items()}, ["wikipedia"], limit=1, contexts=(64, 192),
                           engine="llamacpp", output=tmp_path / "bench", console=Console(quiet=True))
    hf_report = run_eval({r: str(tmp_path / r) for r in files}, ["wikipedia"], limit=1, contexts=(),
                         console=Console(quiet=True))
    for role in ("teacher", "student"):
        in_llama_cpp = gguf_report["tasks"]["wikipedia"][role]["perplexity"]
        in_transformers = hf_report["tasks"]["wikipedia"][role]["perplexity"]
        assert in_llama_cpp == pytest.approx(in_transformers, rel=0.01), role  # same model, same text, two engines
        rows = gguf_report["inference"][role]["contexts"]
        assert [r["context"] for r in rows] == [64, 192]
        for row in rows:
            assert row["cache_bytes_measured"] == pytest.approx(row["cache_bytes_computed"], rel=0.10), (role, row)
            assert row["decode_ms_per_token"] > 0 and row["prefill_tokens_per_second"] > 0
    assert gguf_report["models"]["student"]["model_type"] == "gguf:bailingmoe3"
    assert (tmp_path / "bench" / "inference.png").is_file()

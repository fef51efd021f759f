"""The llama.cpp engine: scoring and the inference benchmark on GGUF files, teacher and upgraded model side by side."""

import importlib.util
import json
import sys

import pytest
import torch
from helpers import bpe_tokenizer, family_tokenizer, gguf_ready_student, gguf_ready_teacher
from rich.console import Console

from ling_surgery.evals.suite import run_eval
from ling_surgery.surgery.errors import SurgeryError


def test_missing_llama_cpp_is_a_one_line_error_with_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if the extra were absent
    with pytest.raises(SurgeryError, match=r"needs llama-cpp-python; run: CMAKE_ARGS=.*-mno-amx-int8.* pip install "
                                           r"'ling-surgery\[llamacpp\]'"):
        run_eval({"model": str(tmp_path / "m.gguf")}, ["wikipedia"], engine="llamacpp", console=Console(quiet=True))
    with pytest.raises(SurgeryError, match="--engine 'vllm' is not supported; supported: transformers, llamacpp"):
        run_eval({"model": "x"}, [], engine="vllm", console=Console(quiet=True))


def test_a_llama_cpp_build_with_the_crashing_amx_kernels_is_refused_with_the_rebuild_command(monkeypatch):
    from types import SimpleNamespace

    from ling_surgery.evals.llamacpp import require_llama_cpp

    def build(features):
        return SimpleNamespace(llama_print_system_info=lambda: f"CPU : AVX512 = 1 | {features} | REPACK = 1 |".encode())

    monkeypatch.setitem(sys.modules, "llama_cpp", build("AMX_INT8 = 1"))
    with pytest.raises(SurgeryError, match=r"built with llama.cpp's AMX kernels.*-mno-amx-int8.* pip install "
                                           r"--force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36$"):
        require_llama_cpp()
    monkeypatch.setitem(sys.modules, "llama_cpp", build("AVX512_VNNI = 1"))
    assert require_llama_cpp() is sys.modules["llama_cpp"]


def test_engine_settings_are_llama_bench_style_grids_with_one_line_errors():
    from ling_surgery.evals.llamacpp import EngineSetting, engine_settings

    assert engine_settings() == [EngineSetting(True, "f16")]
    # fa off cannot hold a quantized V cache, so the grid leaves that combination out
    assert [s.label for s in engine_settings("on,off", "f16,q8_0")] == ["fa on, f16 cache", "fa on, q8_0 cache",
                                                                       "fa off, f16 cache"]
    assert EngineSetting.from_arg(EngineSetting(False, "q8_0").as_arg()) == EngineSetting(False, "q8_0")
    with pytest.raises(SurgeryError, match="quantizes the V cache only with flash attention: --cache-type q8_0 needs"):
        engine_settings("off", "q8_0")
    with pytest.raises(SurgeryError, match="--flash-attn 'auto' is not supported; use on, off or on,off"):
        engine_settings("auto")
    with pytest.raises(SurgeryError, match="--cache-type 'q4_0' is not supported; supported: f16, q8_0"):
        engine_settings("on", "q4_0")
    with pytest.raises(SurgeryError, match="llama.cpp settings; add --engine llamacpp"):
        run_eval({"model": "x"}, [], engine_settings=engine_settings("off"), console=Console(quiet=True))
    with pytest.raises(SurgeryError, match="--contexts 512 and 520 are too close"):
        run_eval({"model": "x.gguf"}, [], contexts=(512, 520), engine="llamacpp", console=Console(quiet=True))


def test_each_model_is_compared_at_its_fastest_setting_per_context():
    from ling_surgery.evals.llamacpp import fastest_per_context

    def result(setting, decodes):
        rows = [{"context": c, "decode_ms_per_token": d, "cache_bytes_measured": 2 * c} for c, d in zip((512, 4096), decodes)]
        return {"setting": setting, "kernels": f"llama.cpp via llama-cpp-python 0.3 (ggml CPU, {setting})", "contexts": rows,
                "computed": {"4096": len(setting)}}

    on, off = result("fa on, f16 cache", [10.0, 30.0]), result("fa off, f16 cache", [9.0, 40.0])
    best = fastest_per_context([on, off])
    assert [(r["decode_ms_per_token"], r["setting"]) for r in best["contexts"]] == [(9.0, "fa off, f16 cache"),
                                                                                   (30.0, "fa on, f16 cache")]
    assert best["computed"] == on["computed"]  # the cache numbers of the setting that wins at the longest context
    assert best["settings"] == {"fa on, f16 cache": on, "fa off, f16 cache": off}
    assert best["kernels"].endswith("fastest per context of: fa on, f16 cache, fa off, f16 cache)")
    assert fastest_per_context([on]) is on


def test_dominated_settings_stop_only_when_slower_and_growing_faster():
    from ling_surgery.evals.llamacpp import dominated

    def rows(*decodes):
        return [{"context": c, "decode_ms_per_token": d} for c, d in zip((512, 4096, 16384), decodes)]

    best = {"decode_ms_per_token": 30.0, "growth_ms": 12.0, "setting": "fa off, f16 cache"}
    # teacher, fa on: 107 ms at 4096 against 30, grown by 75 against 12 → stop
    assert dominated(rows(32.0, 107.0), best) == ("stopped after 4096: decode 3.57x slower than fa off, f16 cache, "
                                                  "and growing faster with context")
    # slower at short context only (a q8_0 cache: dequantizing costs at 512, reading half the bytes pays at 16k)
    assert dominated(rows(23.0), best | {"decode_ms_per_token": 18.0}) is None  # never at the first context
    assert dominated(rows(40.0, 45.0), best) is None  # 1.5x slower but grew by 5 against 12: it may still catch up
    assert dominated(rows(20.0, 36.0), best) is None  # grew faster but only 1.2x slower: within the noise
    assert dominated(rows(20.0, 107.0), None) is None  # nothing measured before it


def test_decode_rounds_alternate_the_order_of_the_workers():
    from ling_surgery.evals.llamacpp_bench import round_order

    workers = ["teacher fa off", "teacher fa on", "student fa on"]
    assert [round_order(workers, r) for r in range(3)] == [workers, workers[::-1], workers]


def test_a_setting_stopped_early_competes_only_where_it_was_measured():
    from ling_surgery.evals.llamacpp import fastest_among, fastest_per_context

    def result(setting, decodes, stopped=None):
        rows = [{"context": c, "decode_ms_per_token": d} for c, d in zip((512, 4096, 16384), decodes)]
        return {"setting": setting, "kernels": f"llama.cpp (ggml CPU, {setting})", "contexts": rows, "stopped": stopped}

    off = result("fa off, f16 cache", [9.0, 20.0, 60.0])
    assert fastest_among([off]) == {c: {"decode_ms_per_token": d, "growth_ms": d - 9.0, "setting": "fa off, f16 cache"}
                                     for c, d in ((512, 9.0), (4096, 20.0), (16384, 60.0))}
    on = result("fa on, f16 cache", [8.0, 90.0], stopped="stopped after 4096: decode 4.50x slower than fa off, f16 cache")
    assert fastest_among([off, on])[512]["setting"] == "fa on, f16 cache"
    best = fastest_per_context([off, on])
    assert [(r["context"], r["setting"]) for r in best["contexts"]] == [
        (512, "fa on, f16 cache"), (4096, "fa off, f16 cache"), (16384, "fa off, f16 cache")]
    assert best["stopped"] is None  # the headline is the setting that went the whole way


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python not installed (pip install 'ling-surgery[llamacpp]')")
def test_llama_cpp_engine_scores_and_benchmarks_gguf_files(tmp_path):
    from ling_surgery.evals.llamacpp import engine_settings
    from ling_surgery.evals.llamacpp_bench import benchmark
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
    settings = engine_settings("on,off", "f16,q8_0")
    gguf_report = run_eval({r: str(p) for r, p in files.items()}, ["wikipedia"], limit=1, contexts=(64, 192),
                           engine="llamacpp", output=tmp_path / "bench", console=Console(quiet=True),
                           engine_settings=settings)
    hf_report = run_eval({r: str(tmp_path / r) for r in files}, ["wikipedia"], limit=1, contexts=(),
                         console=Console(quiet=True))
    for role in ("teacher", "student"):
        in_llama_cpp = gguf_report["tasks"]["wikipedia"][role]["perplexity"]
        in_transformers = hf_report["tasks"]["wikipedia"][role]["perplexity"]
        assert in_llama_cpp == pytest.approx(in_transformers, rel=0.01), role  # same model, same text, two engines
        measured = gguf_report["inference"][role]
        assert set(measured["settings"]) == {s.label for s in settings}
        for label, result in measured["settings"].items():
            rows = result["contexts"]
            # a setting may stop after 64 tokens if it is already 1.25x slower than another one there
            assert [r["context"] for r in rows] == ([64] if result["stopped"] else [64, 192]), result["stopped"]
            for row in rows:  # llama.cpp's own byte count of the sequence, f16 or q8_0 cache, agrees with the formula
                assert row["cache_bytes_measured"] == pytest.approx(row["cache_bytes_computed"], rel=0.10), (role, label, row)
                assert row["decode_ms_per_token"] > 0 and row["prefill_tokens_per_second"] > 0
        for row in measured["contexts"]:
            assert row["decode_ms_per_token"] == min(r["decode_ms_per_token"] for result in measured["settings"].values()
                                                     for r in result["contexts"] if r["context"] == row["context"])
    # a setting that `stop` rules out stops there (its worker closes); the others go on to the last context
    def stop_q8_0_after_128(rows, best):  # `best`: the other setting of the same model at this context
        return "ruled out" if rows[-1]["context"] == 128 and best["setting"] == "fa on, f16 cache" else None

    from ling_surgery.evals.llamacpp import EngineSetting
    settings = [EngineSetting(True, "q8_0"), EngineSetting(True, "f16")]
    lockstep = benchmark({"student": files["student"]}, (64, 128, 192), settings, stop=stop_q8_0_after_128)["student"]
    assert [r["context"] for r in lockstep["settings"]["fa on, q8_0 cache"]["contexts"]] == [64, 128]
    assert lockstep["settings"]["fa on, q8_0 cache"]["stopped"] == "ruled out"
    assert [r["context"] for r in lockstep["contexts"]] == [64, 128, 192] and lockstep["stopped"] is None
    assert lockstep["method"].startswith("interleaved")
    # a file llama.cpp cannot load: a one-line error naming it, and no worker left behind
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(SurgeryError, match=r"llama.cpp benchmark of broken.gguf \(fa on, f16 cache\) failed: "):
        benchmark({"teacher": files["teacher"], "student": broken}, (64, 128))
    assert gguf_report["models"]["student"]["model_type"] == "gguf:bailingmoe3"
    assert (tmp_path / "bench" / "inference.png").is_file()


def test_an_inference_only_report_names_each_setting_and_why_one_stopped(tmp_path):
    from ling_surgery.evals.eval_report import eval_markdown, write_eval_report
    from ling_surgery.evals.llamacpp import fastest_per_context

    def result(setting, decodes, stopped=None):
        rows = [{"context": c, "decode_ms_per_token": d, "prefill_tokens_per_second": 100.0, "cache_bytes_measured": c,
                 "cache_bytes_computed": c, "peak_memory_bytes": 2**30} for c, d in zip((512, 4096, 16384), decodes)]
        return {"setting": setting, "kernels": f"llama.cpp via llama-cpp-python 0.3 (ggml CPU, {setting})", "device": "cpu",
                "dtype": "q8_0", "threads": 2, "contexts": rows, "stopped": stopped, "computed": {"8192": 1, "32768": 4}}

    off, on = "fa off, f16 cache", "fa on, f16 cache"
    report = {"models": {"teacher": {"ref": "smollm2-135m"}, "student": {"ref": "runs/x"}}, "tasks": {}, "seconds": 1.0,
              "settings": {"engine": "llamacpp", "device": "cpu", "seed": 0, "limit": None},
              "inference": {"teacher": fastest_per_context([result(off, [18.0, 30.0, 96.0]),
                                                            result(on, [20.0, 80.0], "stopped after 4096: decode 2.67x slower")]),
                            "student": fastest_per_context([result(off, [18.0, 26.0, 40.0]), result(on, [19.0, 20.0, 27.0])])}}
    text = eval_markdown(report)
    assert "| task (metric)" not in text  # no empty quality table
    assert "  - fa on, f16 cache: stopped after 4096: decode 2.67x slower" in text
    assert "| decode ms/token @ 16384 |  | 96.0 (fa off, f16 cache) | 27.0 (fa on, f16 cache) | 0.28× |" in text
    write_eval_report(tmp_path, report)
    assert (tmp_path / "inference.png").is_file() and not (tmp_path / "quality.png").exists()


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_llama_cpp_scoring_reuses_shared_prefixes_without_changing_scores(tmp_path, role):
    """Sequences sharing a prefix continue its KV cache (the teacher); the hybrid's recurrent state cannot be rolled
    back and starts over. Either way every score equals that sequence scored alone."""
    pytest.importorskip("llama_cpp")
    from ling_surgery.evals.llamacpp import LlamaCppModel
    from ling_surgery.surgery.gguf_export import write_gguf

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    model = gguf_ready_teacher(tok) if role == "teacher" else gguf_ready_student(tok)
    write_gguf(model, tok, tmp_path / "model.gguf", "f32")
    lm = LlamaCppModel(tmp_path / "model.gguf", n_ctx=256)
    stem = lm.encode("the quick brown fox jumps over the lazy dog and the cat sleeps in the sun all day")
    sequences = [stem + lm.encode(" where is the fox"), stem[:9], stem + lm.encode(" where is the dog"), stem,
                 lm.encode("a different start entirely"), stem + lm.encode(" where is the fox")]
    starts = [len(stem), 2, len(stem) - 4, 1, 1, 3]
    together = lm.score(sequences, starts)
    for sequence, start, shared in zip(sequences, starts, together):
        lm.llm.reset()  # from an empty context
        alone = lm.score([sequence], [start])[0]
        torch.testing.assert_close(shared.logprobs, alone.logprobs, atol=1e-4, rtol=1e-4)
        assert torch.equal(shared.greedy, alone.greedy)
    if role == "teacher":  # the last sequence scored alone continued the previous one's cache
        lm.score([stem], [1])
        assert lm._cached_prefix(sequences[0]) == len(stem)


def test_recall_grid_runs_in_llama_cpp_up_to_its_context(tmp_path):
    """`eval --engine llamacpp --tasks passkey`: the grid is scored there (lengths beyond n_ctx skipped), the shown
    items are generated by llama.cpp, and its teacher-forced scores are the transformers ones on the same prompts."""
    pytest.importorskip("llama_cpp")
    from ling_surgery.evals.evaluate import recall_task
    from ling_surgery.evals.llamacpp import LlamaCppModel
    from ling_surgery.evals.recall import HaystackBuilder
    from ling_surgery.evals.scoring import LoadedModel
    from ling_surgery.evals.tasks import load_task
    from ling_surgery.surgery.gguf_export import write_gguf

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    model = gguf_ready_teacher(tok)
    write_gguf(model, tok, tmp_path / "teacher.gguf", "f32")
    gguf = LlamaCppModel(tmp_path / "teacher.gguf", n_ctx=512)
    task = load_task("passkey", 1, lengths=(384, 512, 768), depths=(0.0, 1.0))
    result = recall_task(gguf, task, Console(quiet=True))
    assert result["skipped_lengths"] == [768] and result["n"] == 4
    assert len(result["samples"]) == 2 and all(s["question"].startswith("passkey, 384 tokens") for s in result["samples"])
    hf = LoadedModel("teacher", model.eval(), tok, torch.device("cpu"))
    builder = HaystackBuilder(hf.encode, lambda i: tok.decode([i]), task.haystack)
    items = [builder.item(d) for d in task.docs if d["length"] <= 512]
    sequences, starts = [i.prompt + i.answer for i in items], [len(i.prompt) for i in items]
    for in_llama_cpp, in_transformers in zip(gguf.score(sequences, starts), hf.score_shared(sequences, starts)):
        torch.testing.assert_close(in_llama_cpp.logprobs, in_transformers.logprobs, atol=2e-3, rtol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python not installed (pip install 'ling-surgery[llamacpp]')")
def test_bench_inference_runs_a_qwen3_teacher_and_its_upgrade_in_llama_cpp(tmp_path, monkeypatch, capsys):
    """`ling-surgery bench inference TEACHER STUDENT --engine llamacpp` for a family other than SmolLM's: both model
    folders are exported (the teacher as llama.cpp's qwen3, with Qwen's tokenizer) and measured side by side."""
    from ling_surgery.cli.app import main

    tok = family_tokenizer("qwen2")
    torch.manual_seed(0)
    teacher = gguf_ready_teacher(tok, "qwen3")
    for role, model in (("teacher", teacher), ("student", gguf_ready_student(tok, teacher=teacher))):
        model.save_pretrained(tmp_path / role)
        tok.save_pretrained(tmp_path / role)
    monkeypatch.setattr(sys, "argv", ["ling-surgery", "bench", "inference", str(tmp_path / "teacher"),
                                      str(tmp_path / "student"), "--engine", "llamacpp", "--contexts", "64,128",
                                      "--output", str(tmp_path / "bench")])
    try:
        main()
    except SystemExit as exit:
        assert exit.code in (0, None), capsys.readouterr().err[-2000:]
    from gguf import GGUFReader

    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    archs = {path.name.split("-")[0]: GGUFReader(path).fields["general.architecture"].contents()
             for path in (tmp_path / "bench" / "gguf").glob("*.gguf")}
    assert archs == {"teacher": "qwen3", "student": "bailingmoe3"}, archs
    for role in ("teacher", "student"):
        rows = report["inference"][role]["contexts"]
        assert [r["context"] for r in rows] == [64, 128] and all(r["decode_ms_per_token"] > 0 for r in rows), role
    assert (tmp_path / "bench" / "inference.png").is_file()

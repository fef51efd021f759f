"""GGUF export: every tensor and required key is present with the layout llama.cpp loads; transforms are exact;
and, where llama-cpp-python is installed (the `llamacpp` extra), llama.cpp's logits match transformers'."""

import importlib.util
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from helpers import GGUF_READY_PLAN, GGUF_READY_SHAPE, bpe_tokenizer, gguf_ready_student, gguf_ready_teacher, tiny_model

from ling_surgery.surgery.architectures import get_arch
from ling_surgery.surgery.config import Recipe
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.gguf_export import rotate_half_to_adjacent, write_gguf
from ling_surgery.surgery.init_maps import build_student, init_student_state
from ling_surgery.surgery.targets import layer_plan, target_config

def _fields(reader):
    return {name: field.contents() for name, field in reader.fields.items()}


def test_bailingmoe3_file_has_every_tensor_and_key(tmp_path):
    tok = bpe_tokenizer()
    model = gguf_ready_student(tok)
    summary = write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user creates
    reader = GGUFReader(tmp_path / "m.gguf")
    fields = _fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    n_mla = model.config.layer_types.count("full_attention")
    n_kda = 4 - n_mla
    assert summary["arch"] == "bailingmoe3" and len(tensors) == 3 + 5 * 4 + 13 * n_kda + 7 * n_mla
    assert fields["general.architecture"] == "bailingmoe3"
    assert fields["bailingmoe3.attention.head_count_kv"] == [0, 1, 0, 1]
    assert fields["bailingmoe3.kda.head_dim"] == 64 and fields["bailingmoe3.leading_dense_block_count"] == 4
    assert fields["bailingmoe3.expert_gating_func"] == 2 and "bailingmoe3.expert_count" not in fields
    assert fields["bailingmoe3.attention.key_length"] == 64 + 32 and fields["bailingmoe3.rope.dimension_count"] == 32
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and len(fields["tokenizer.ggml.tokens"]) == len(tok)
    assert fields["tokenizer.ggml.token_type"][:3] == [3, 3, 3] and fields["tokenizer.ggml.merges"]
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    state = model.state_dict()
    # ggml stores shapes reversed: numpy (rows, cols) is ne [cols, rows].
    assert list(tensors["blk.0.ssm_conv1d_q.weight"].shape) == [4, 1, 128, 1]
    assert list(tensors["blk.1.attn_k_b.weight"].shape) == [32, 64, 2]
    a_log = state["model.layers.0.self_attn.forget_gate.A_log"].numpy()
    np.testing.assert_array_equal(tensors["blk.0.ssm_a"].data.reshape(-1), np.exp(a_log))
    conv = state["model.layers.0.self_attn.conv1d.weight"].numpy()
    rebuilt = np.concatenate([tensors[f"blk.0.ssm_conv1d_{p}.weight"].data.reshape(128, 1, 4) for p in "qkv"])
    np.testing.assert_array_equal(rebuilt, conv)
    kv_b = state["model.layers.1.self_attn.kv_b_proj.weight"].numpy().reshape(2, 32 + 64, 64)
    np.testing.assert_array_equal(tensors["blk.1.attn_k_b.weight"].data, kv_b[:, :32].transpose(0, 2, 1))
    np.testing.assert_array_equal(tensors["blk.1.attn_v_b.weight"].data, kv_b[:, 32:])


def test_quantized_file_keeps_f32_where_llama_cpp_needs_it(tmp_path):
    tok = bpe_tokenizer()
    write_gguf(gguf_ready_student(tok), tok, tmp_path / "q.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "q.gguf").tensors}
    for name in ("blk.0.ssm_a", "blk.0.ssm_conv1d_v.weight", "blk.0.ssm_dt.bias", "blk.0.ssm_norm.weight",
                 "blk.1.attn_kv_a_norm.weight", "output_norm.weight",
                 "blk.1.attn_kv_a_mqa.weight"):  # latent rows in the norm's linear regime are too small for f16
        assert types[name] == GGMLQuantizationType.F32, name
    for name in ("token_embd.weight", "output.weight", "blk.0.ssm_f_a.weight", "blk.1.attn_k_b.weight"):
        assert types[name] == GGMLQuantizationType.Q8_0, name


def test_4_bit_keeps_the_output_matrix_at_8_bits(tmp_path):
    """As llama.cpp's quantizer does: `output.weight`, or the tied `token_embd.weight` that serves as the output."""
    tok = bpe_tokenizer()
    write_gguf(gguf_ready_student(tok), tok, tmp_path / "student.gguf", "q4_0")
    types = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "student.gguf").tensors}
    assert types["output.weight"] == GGMLQuantizationType.Q8_0
    assert types["token_embd.weight"] == types["blk.0.ssm_f_a.weight"] == GGMLQuantizationType.Q4_0
    teacher = tiny_model("llama", vocab_size=len(tok), **{**GGUF_READY_SHAPE, "tie_word_embeddings": True})
    write_gguf(teacher, tok, tmp_path / "teacher.gguf", "q4_0")
    types = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "teacher.gguf").tensors}
    assert "output.weight" not in types and types["token_embd.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q4_0


def test_llama_teacher_file(tmp_path):
    tok = bpe_tokenizer()
    teacher = gguf_ready_teacher(tok)
    write_gguf(teacher, tok, tmp_path / "t.gguf", "f16")
    reader = GGUFReader(tmp_path / "t.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert _fields(reader)["llama.attention.head_count_kv"] == 1 and len(tensors) == 3 + 9 * 4
    q = teacher.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"].data, rotate_half_to_adjacent(q, 2).astype(np.float16))


def test_permutation_turns_rotate_half_rope_into_adjacent_pair_rope():
    """RoPE on (j, j + d/2) pairs of a row, then permuted, equals RoPE on (2j, 2j + 1) pairs of the permuted row."""
    d, heads = 8, 2
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) * 3.0  # angles of one position
    x = torch.randn(heads * d, 1, dtype=torch.float64)

    def rotate_half(v):
        v = v.view(heads, d)
        a, b = v[:, : d // 2], v[:, d // 2 :]
        cos, sin = theta.cos(), theta.sin()
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=1).reshape(-1, 1)

    def adjacent(v):
        v = v.view(heads, d // 2, 2)
        cos, sin = theta.cos(), theta.sin()
        return torch.stack([v[..., 0] * cos - v[..., 1] * sin, v[..., 1] * cos + v[..., 0] * sin], -1).reshape(-1, 1)

    permuted = torch.from_numpy(rotate_half_to_adjacent(x.numpy(), heads))
    torch.testing.assert_close(torch.from_numpy(rotate_half_to_adjacent(rotate_half(x).numpy(), heads)), adjacent(permuted))


def test_bad_exports_are_one_line_errors(tmp_path):
    from helpers import char_tokenizer

    tok = bpe_tokenizer()
    student = gguf_ready_student(tok)
    with pytest.raises(SurgeryError, match=r"--dtype 'q4_k' is not supported; supported: f32, f16, q8_0, q4_0"):
        write_gguf(student, tok, tmp_path / "a.gguf", "q4_k")
    with pytest.raises(SurgeryError, match="needs a byte-level BPE tokenizer"):
        write_gguf(student, char_tokenizer(), tmp_path / "b.gguf", "f32")
    qwen = tiny_model("qwen2", vocab_size=len(tok))
    with pytest.raises(SurgeryError, match="model_type 'qwen2' is not supported"):
        write_gguf(qwen, tok, tmp_path / "c.gguf", "f32")
    narrow = Recipe.model_validate({"plan": {**GGUF_READY_PLAN, "mla": {"kv_lora_rank": 64, "qk_rope_head_dim": 48}}})
    teacher = gguf_ready_teacher(tok)
    config = target_config(teacher.config, layer_plan(narrow, 4), narrow)
    model = build_student(init_student_state(teacher.state_dict(), get_arch("llama"), teacher.config, config, None,
                                             narrow.stages[0]), config)
    with pytest.raises(SurgeryError, match=r"--dtype q8_0 cannot hold blk.1.attn_k_b.weight: its rows have 16 values"):
        write_gguf(model, tok, tmp_path / "d.gguf", "q8_0")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))  # nothing half-written


needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python not installed (pip install 'ling-surgery[llamacpp]')")


@needs_llama_cpp
@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa off", "fa on"])
@pytest.mark.parametrize("which", ["student", "non-periodic student", "teacher"])
def test_llama_cpp_logits_match_transformers(tmp_path, which, flash_attn):
    """Whole prompt, token by token and in chunks: max |Δlogit| small against the logit scale, argmax 100%, greedy equal;
    with and without flash attention (two attention kernels, and for MLA two cache layouts). The non-periodic layout
    (a measured placement, MLA layers 0 and 1) runs because the file gives llama.cpp the layout per layer."""
    from llama_cpp import Llama

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    if which == "teacher":
        model = gguf_ready_teacher(tok)
    elif which == "student":
        model = gguf_ready_student(tok)
    else:
        with pytest.warns(UserWarning, match="not periodic"):
            model = gguf_ready_student(tok, {**GGUF_READY_PLAN, "layer_group_size": None, "full_attention_layers": [0, 1]})
        assert GGUFReader is not None and model.config.layer_types[:3] == ["full_attention"] * 2 + ["linear_attention"]
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # clear margins between logits, so argmax ties cannot flip on rounding
    path = tmp_path / f"{which}.gguf"
    write_gguf(model, tok, path, "f32")
    if which == "non-periodic student":
        assert _fields(GGUFReader(path))["bailingmoe3.attention.head_count_kv"] == [1, 1, 0, 0]
    ids = tok("The quick brown fox jumps over the lazy dog. In 1984, 12345 people counted 3.14 apples!")["input_ids"] * 3
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=2, logits_all=True, flash_attn=flash_attn,
                verbose=False)
    assert llm.tokenize(tok.decode(ids).encode(), add_bos=False, special=True) == ids  # same tokenisation
    scale = expected.std()
    for name, pieces in (("whole", [ids]), ("one by one", [[t] for t in ids]), ("chunks of 7", [ids[i : i + 7] for i in range(0, len(ids), 7)])):
        llm.reset()  # also clears the recurrent (KDA) memory of hybrid models
        for piece in pieces:
            llm.eval(piece)
        got = np.asarray(llm.scores[: len(ids)])
        assert np.abs(got - expected).max() < 0.02 * scale, name
        top2 = np.sort(expected, -1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 0.04 * scale  # argmax must agree wherever rounding cannot flip it
        assert clear.mean() > 0.75 and (got.argmax(-1) == expected.argmax(-1))[clear].all(), name
    with torch.no_grad():
        greedy = model.generate(torch.tensor([ids[:12]]), max_new_tokens=16, do_sample=False, pad_token_id=2)[0, 12:].tolist()
    llm.reset()
    out = []
    for token in llm.generate(ids[:12], top_k=1, temp=0.0, reset=True):
        out.append(token)
        if len(out) == 16:
            break
    assert out == greedy

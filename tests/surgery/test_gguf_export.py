"""GGUF export: every tensor and required key is present with the layout llama.cpp loads; transforms are exact;
and, where llama-cpp-python is installed (the `llamacpp` extra), llama.cpp's logits match transformers'."""

import importlib.util
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from helpers import (GGUF_READY_PLAN, GGUF_READY_SHAPE, TOKENIZER_FAMILIES, TOKENIZER_PROBE, bpe_tokenizer, family_tokenizer,
                     gguf_ready_student, gguf_ready_teacher, tiny_model)

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
    assert "llama.rope.scaling.type" not in _fields(reader) and "rope_freqs.weight" not in tensors  # default RoPE
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
    with pytest.raises(SurgeryError, match="needs a BPE tokenizer; this one is 'WordLevel'"):
        write_gguf(student, char_tokenizer(), tmp_path / "b.gguf", "f32")
    gemma = tiny_model("gemma", vocab_size=len(tok))
    with pytest.raises(SurgeryError, match="model_type 'gemma' is not supported"):
        write_gguf(gemma, tok, tmp_path / "c.gguf", "f32")
    narrow = Recipe.model_validate({"plan": {**GGUF_READY_PLAN, "mla": {"kv_lora_rank": 64, "qk_rope_head_dim": 48}}})
    teacher = gguf_ready_teacher(tok)
    config = target_config(teacher.config, layer_plan(narrow, 4), narrow)
    model = build_student(init_student_state(teacher.state_dict(), get_arch("llama"), teacher.config, config, None,
                                             narrow.stages[0]), config)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))  # nothing half-written
    # rows of 16 values (dn = 64 − 48) fill no q8_0 block: those tensors go in f16, as llama.cpp's quantizer does
    summary = write_gguf(model, tok, tmp_path / "d.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "d.gguf").tensors}
    assert summary["f16_fallback"] == ["blk.1.attn_k_b.weight", "blk.3.attn_k_b.weight"]
    assert types["blk.1.attn_k_b.weight"] == GGMLQuantizationType.F16
    assert types["blk.1.attn_v_b.weight"] == GGMLQuantizationType.Q8_0


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
    assert out[: len(greedy)] == greedy and (len(greedy) == 16 or greedy[-1] == tok.eos_token_id)  # HF stops at EOS


# Each family's teacher as its llama.cpp architecture sees it: (model_type, tokenizer family, config overrides).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # pairs 0–3 unscaled, 4+ scaled
FAMILIES = {
    "smollm": ("llama", "smollm", {}),
    "llama3": ("llama", "llama3", {"rope_parameters": LLAMA3_ROPE}),
    "qwen2": ("qwen2", "qwen2", {}),
    "qwen3": ("qwen3", "qwen2", {}),
    "mistral": ("mistral", "mistral", {}),
    "qwen3_moe": ("qwen3_moe", "qwen2", {}),
    "qwen2_moe": ("qwen2_moe", "qwen2", {}),  # gated shared expert; its upgrade pads the shared width 48 to 2 × 32
    "mixtral": ("mixtral", "mistral", {}),
    "olmoe": ("olmoe", "gpt2", {"num_key_value_heads": 2}),  # llama.cpp's olmoe and dots1: multi-head only
    "dots1": ("dots1", "qwen2", {"num_key_value_heads": 2}),  # sigmoid router, 2 shared experts, a dense first layer, scaling 2
    "glm4_moe": ("glm4_moe", "gpt2", {"attention_bias": True, "use_qk_norm": True}),  # + 2 groups, 1 used
}
EXPECTED_TOKENIZER = {  # tokenizer.ggml.model, .pre, .add_bos_token
    "gpt2": ("gpt2", "gpt-2", False), "smollm": ("gpt2", "smollm", False), "llama3": ("gpt2", "llama-bpe", True),
    "qwen2": ("gpt2", "qwen2", False), "mistral": ("llama", None, True),
}


def routing_ties(model, ids) -> set[int]:
    """Positions where some MoE router's k-th and (k+1)-th scores are within 1e-3: rounding may pick the other expert
    there, in either engine, so only there may the logits differ (later positions see the change through attention
    too, so the position itself is what counts)."""
    scores = []
    hooks = [m.register_forward_hook(lambda _, __, out: scores.append(out[0] if isinstance(out, tuple) else out))
             for name, m in model.named_modules() if name.endswith("mlp.gate")]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    ties = set()
    k = getattr(model.config, "num_experts_per_tok", 1)
    for logits in scores:
        route = logits.float().sigmoid() if model.config.model_type == "bailing_hybrid" else logits.float().softmax(-1)
        top = route.reshape(len(ids), -1).topk(k + 1, -1).values
        ties |= {int(i) for i in torch.nonzero(top[:, k - 1] - top[:, k] < 1e-3).flatten()}
    return ties


def family_teacher(family: str):
    model_type, tokenizer_family, overrides = FAMILIES[family]
    tok = family_tokenizer(tokenizer_family)
    return gguf_ready_teacher(tok, model_type, **overrides), tok


@pytest.mark.parametrize("family", TOKENIZER_FAMILIES)
def test_tokenizer_metadata_names_each_family(tmp_path, family):
    tok = family_tokenizer(family)
    write_gguf(gguf_ready_teacher(tok), tok, tmp_path / "t.gguf", "f32")
    fields = _fields(GGUFReader(tmp_path / "t.gguf"))
    model, pre, add_bos = EXPECTED_TOKENIZER[family]
    assert (fields["tokenizer.ggml.model"], fields.get("tokenizer.ggml.pre"), fields["tokenizer.ggml.add_bos_token"]) \
        == (model, pre, add_bos)
    assert fields["tokenizer.ggml.tokens"] == tok.convert_ids_to_tokens(list(range(len(tok))))
    if model == "llama":  # SentencePiece-style: merge order as scores, byte-fallback pieces typed BYTE
        types, scores = fields["tokenizer.ggml.token_type"], fields["tokenizer.ggml.scores"]
        assert types[:3] == [2, 3, 3] and types[3:259] == [6] * 256 and fields["tokenizer.ggml.add_space_prefix"]
        tokens = fields["tokenizer.ggml.tokens"]
        merged = [i for i, t in enumerate(tokens) if types[i] == 1 and len(t) > 1]  # what merges make
        assert merged and all(scores[i] < 0 for i in merged) and scores[tok.convert_tokens_to_ids("a")] == 0


def test_tokenizers_llama_cpp_cannot_reproduce_are_refused(tmp_path):
    from tokenizers import pre_tokenizers

    teacher = gguf_ready_teacher(family_tokenizer("gpt2"))
    cases = [
        ("gpt2", lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Whitespace()),
         r"pre-tokenizer \(Whitespace\) has no llama.cpp equivalent"),
        ("qwen2", lambda t: setattr(t.model, "ignore_merges", True),
         r"pre-tokenizer \(Split \+ ByteLevel, ignore_merges\) has no llama.cpp equivalent"),
        ("mistral", lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Metaspace(split=True)),
         "this Metaspace tokenizer splits words"),
        ("mistral", lambda t: setattr(t.model, "byte_fallback", False), "has no byte fallback"),
    ]
    for family, change, message in cases:
        tok = family_tokenizer(family)
        change(tok.backend_tokenizer)
        with pytest.raises(SurgeryError, match=message):
            write_gguf(teacher, tok, tmp_path / "x.gguf", "f32")
    assert not list(tmp_path.iterdir())
    llama3 = family_tokenizer("llama3")  # the Llama-3 split with merges applied is llama.cpp's smaug-bpe
    llama3.backend_tokenizer.model.ignore_merges = False
    write_gguf(teacher, llama3, tmp_path / "smaug.gguf", "f32")
    assert _fields(GGUFReader(tmp_path / "smaug.gguf"))["tokenizer.ggml.pre"] == "smaug-bpe"


def test_rope_scaling_is_written_as_llama_cpp_reads_it(tmp_path):
    """llama3: per-pair `rope_freqs` factors = default / scaled frequency (llama graph); linear: scaling keys; an upgraded
    model (bailingmoe3 reads no factors) exports only when its RoPE pairs are all unscaled, else a one-line refusal."""
    teacher, tok = family_teacher("llama3")
    write_gguf(teacher, tok, tmp_path / "llama3.gguf", "f16")
    reader = GGUFReader(tmp_path / "llama3.gguf")
    factors = {t.name: t for t in reader.tensors}["rope_freqs.weight"]
    assert factors.tensor_type == GGMLQuantizationType.F32
    inv_freq = teacher.model.rotary_emb.inv_freq.double().numpy()
    default = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(factors.data, default / inv_freq, rtol=1e-6)
    assert factors.data[0] == 1 and factors.data[-1] == pytest.approx(8.0)  # high frequencies kept, low ones ÷ 8
    linear = gguf_ready_teacher(tok, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    write_gguf(linear, tok, tmp_path / "linear.gguf", "f32")
    reader = GGUFReader(tmp_path / "linear.gguf")
    fields = _fields(reader)
    assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == pytest.approx(4.0)
    assert "rope_freqs.weight" not in {t.name for t in reader.tensors}
    with pytest.raises(SurgeryError, match=r"reads no per-frequency RoPE factors.*only the first 8 are unscaled, so an "
                                           r"upgrade with plan.mla.qk_rope_head_dim ≤ 8 exports exactly"):
        write_gguf(gguf_ready_student(tok, teacher=teacher), tok, tmp_path / "student.gguf", "f32")
    narrow = {**GGUF_READY_PLAN, "mla": {"kv_lora_rank": 64, "qk_rope_head_dim": 8}}
    write_gguf(gguf_ready_student(tok, narrow, teacher), tok, tmp_path / "student.gguf", "f32")
    reader = GGUFReader(tmp_path / "student.gguf")
    assert "bailingmoe3.rope.scaling.type" not in _fields(reader) and len(reader.tensors) == 3 + 5 * 4 + 13 * 2 + 7 * 2


DEEPSEEK_MLA = dict(kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64, num_key_value_heads=2,
                    head_dim=32)  # transformers reads the RoPE width from head_dim
FAMILIES.update({
    "deepseek_v3": ("deepseek_v3", "smollm", DEEPSEEK_MLA),  # MLA copied into the upgrade; sigmoid MoE, dense first
    "deepseek_v3 rotate-half": ("deepseek_v3", "smollm", {**DEEPSEEK_MLA, "rope_interleave": False}),
    "deepseek_v3 q-LoRA": ("deepseek_v3", "smollm", {**DEEPSEEK_MLA, "q_lora_rank": 64}),  # teacher only
})
RUNS = [(family, role) for family in FAMILIES for role in ("teacher", "student") if (family, role) !=
        ("deepseek_v3 q-LoRA", "student")] + [("smollm", "all-MLA student")]


def test_moe_files_carry_router_keys_and_stacked_experts(tmp_path):
    tok = family_tokenizer("gpt2")
    torch.manual_seed(0)
    student = gguf_ready_student(tok, teacher=gguf_ready_teacher(tok, "glm4_moe"))
    write_gguf(student, tok, tmp_path / "student.gguf", "q8_0")
    reader = GGUFReader(tmp_path / "student.gguf")
    fields, tensors = _fields(reader), {t.name: t for t in reader.tensors}
    keys = {k.split(".", 1)[1]: v for k, v in fields.items() if k.startswith("bailingmoe3.")}
    assert {k: keys[k] for k in ("expert_count", "expert_used_count", "expert_feed_forward_length",
                                 "expert_shared_feed_forward_length", "expert_shared_count", "leading_dense_block_count",
                                 "expert_group_count", "expert_group_used_count", "expert_weights_norm",
                                 "expert_gating_func")} == {
        "expert_count": 8, "expert_used_count": 2, "expert_feed_forward_length": 32,
        "expert_shared_feed_forward_length": 32, "expert_shared_count": 1, "leading_dense_block_count": 1,
        "expert_group_count": 2, "expert_group_used_count": 1, "expert_weights_norm": True, "expert_gating_func": 2}
    assert keys["expert_weights_scale"] == pytest.approx(1.5)
    assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_exps.weight" not in tensors  # the dense lead
    assert list(tensors["blk.1.ffn_gate_exps.weight"].shape) == [128, 32, 8]  # ggml order: (H, I, E)
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == GGMLQuantizationType.F32  # routers never quantized
    assert tensors["blk.1.ffn_down_exps.weight"].tensor_type == GGMLQuantizationType.Q8_0
    state = student.state_dict()
    gate_up = state["model.layers.2.mlp.experts.gate_up_proj"].numpy()
    write_gguf(student, tok, tmp_path / "f32.gguf", "f32")
    f32 = {t.name: t for t in GGUFReader(tmp_path / "f32.gguf").tensors}
    np.testing.assert_array_equal(f32["blk.2.ffn_up_exps.weight"].data, gate_up[:, 32:])
    np.testing.assert_array_equal(f32["blk.2.exp_probs_b.bias"].data,
                                  state["model.layers.2.mlp.gate.e_score_correction_bias"].numpy())


def test_moe_layouts_llama_cpp_cannot_run_are_refused(tmp_path):
    tok = family_tokenizer("qwen2")
    cases = [
        (gguf_ready_teacher(tok, "qwen3_moe", norm_topk_prob=False), "always renormalises the top-k routing weights"),
        (gguf_ready_teacher(tok, "qwen2_moe", norm_topk_prob=True), "never renormalises the top-k routing weights"),
        (gguf_ready_teacher(tok, "qwen3_moe", mlp_only_layers=[2]), "makes every layer MoE"),
        (gguf_ready_teacher(tok, "qwen2_moe", shared_expert_intermediate_size=0), "needs a shared expert"),
        (gguf_ready_teacher(tok, "olmoe"), "sizes keys and values for one head per query head"),
    ]
    student = gguf_ready_student(tok, teacher=gguf_ready_teacher(tok, "qwen3_moe"))
    student.config.mlp_layer_types = ["sparse", "dense", "sparse", "sparse"]
    cases.append((student, "dense MLP layers after its first MoE layer"))
    for model, message in cases:
        with pytest.raises(SurgeryError, match=message):
            write_gguf(model, tok, tmp_path / "x.gguf", "f32")
    assert not list(tmp_path.iterdir())


@needs_llama_cpp
@pytest.mark.parametrize("family, role", RUNS, ids=[f"{f}-{r}".replace(" ", "_") for f, r in RUNS])
def test_every_family_runs_in_llama_cpp_as_in_transformers(tmp_path, family, role):
    """Tokenisation of a multilingual/code/number string identical (BOS as the tokenizer adds it); logits of the whole
    prompt and token by token within 2% of the logit scale (MoE: except where a router's choice is a near-tie) with
    argmax equal where rounding cannot flip it; greedy text identical. Llama-3 runs with llama3-scaled RoPE (its upgrade
    keeps the 8 unscaled RoPE dims)."""
    from llama_cpp import Llama

    torch.manual_seed(0)
    model_type, tokenizer_family, overrides = FAMILIES[family]
    tok = family_tokenizer(tokenizer_family)
    model = gguf_ready_teacher(tok, model_type, **overrides)
    if role == "student":
        plan = {**GGUF_READY_PLAN, "mla": {"kv_lora_rank": 64, "qk_rope_head_dim": 8}} if family == "llama3" else None
        model = gguf_ready_student(tok, plan, model)
    elif role == "all-MLA student":  # the all-mla target: a deepseek_v3 model, every layer MLA
        model = gguf_ready_student(tok, {"mla": {"kv_lora_rank": 64, "qk_rope_head_dim": 32}}, model, "all-mla")
        assert model.config.model_type == "deepseek_v3"
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # clear margins between logits, so argmax ties cannot flip on rounding
    path = tmp_path / f"{family}-{role}.gguf"
    write_gguf(model, tok, path, "f32")
    llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=2, logits_all=True, verbose=False)
    ids = tok(TOKENIZER_PROBE)["input_ids"]
    assert llm.tokenize(TOKENIZER_PROBE.encode(), add_bos=True, special=True) == ids
    assert llm.detokenize(ids[1:] if EXPECTED_TOKENIZER[tokenizer_family][2] else ids).decode() \
        .strip() == TOKENIZER_PROBE.strip()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    ties = routing_ties(model, ids)
    scale = expected.std()
    for name, pieces in (("whole", [ids]), ("one by one", [[t] for t in ids])):
        llm.reset()
        for piece in pieces:
            llm.eval(piece)
        got = np.asarray(llm.scores[: len(ids)])
        off = np.flatnonzero(np.abs(got - expected).max(-1) >= 0.02 * scale)
        assert set(off) <= ties and len(off) <= 0.05 * len(ids), (name, off, ties)
        top2 = np.sort(expected, -1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 0.04 * scale
        assert clear.mean() > 0.75 and (got.argmax(-1) == expected.argmax(-1))[clear].all(), name
    with torch.no_grad():
        greedy = model.generate(torch.tensor([ids[:12]]), max_new_tokens=16, do_sample=False,
                                pad_token_id=tok.pad_token_id)[0, 12:].tolist()
    out = []
    for token in llm.generate(ids[:12], top_k=1, temp=0.0, reset=True):
        out.append(token)
        if len(out) == 16:
            break
    assert out[: len(greedy)] == greedy and (len(greedy) == 16 or greedy[-1] == tok.eos_token_id)  # HF stops at EOS

"""Init maps: exact copies, full tensor accounting, a lossless MLA case that matches the teacher, bias folds."""

import pytest
import torch
from helpers import tiny_model, tiny_recipe

from ling_surgery.surgery.architectures import get_arch
from ling_surgery.surgery.config import InitStage
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.init_maps import (
    LayerStats,
    absorb_bias,
    build_student,
    init_student_state,
    mla_energy_kept,
    shared_rope_key,
)
from ling_surgery.surgery.plan import make_plan
from ling_surgery.surgery.taps import collect_stats
from ling_surgery.surgery.targets import layer_plan, target_config


def _convert(teacher, recipe, stats=None):
    target = target_config(teacher.config, layer_plan(recipe, teacher.config.num_hidden_layers), recipe)
    arch = get_arch(teacher.config.model_type)
    state = init_student_state(teacher.state_dict(), arch, teacher.config, target, stats, recipe.stages[0])
    return build_student(state, target), target


def test_shared_tensors_are_exact_copies_and_every_tensor_is_accounted(model_type, token_batches):
    teacher = tiny_model(model_type)
    stats = collect_stats(teacher, get_arch(model_type), token_batches)
    student, _ = _convert(teacher, tiny_recipe(), stats=stats)
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(s["lm_head.weight"], t["model.embed_tokens.weight"])  # tied source → untied copy
    assert s["lm_head.weight"].data_ptr() != s["model.embed_tokens.weight"].data_ptr()
    assert torch.equal(s["model.norm.weight"], t["model.norm.weight"])
    for i in range(4):
        for name in ("input_layernorm", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert torch.equal(s[f"model.layers.{i}.{name}.weight"], t[f"model.layers.{i}.{name}.weight"]), name
    # KDA q/k/v come from the teacher (k/v with GQA heads repeated) when there is no bias or qk-norm to fold.
    if model_type in ("llama", "mistral"):
        k = t["model.layers.0.self_attn.k_proj.weight"].view(2, 16, 64)
        torch.testing.assert_close(s["model.layers.0.self_attn.k_proj.weight"], k.repeat_interleave(2, 0).reshape(64, 64))
        assert torch.equal(s["model.layers.0.self_attn.q_proj.weight"], t["model.layers.0.self_attn.q_proj.weight"])


def test_leftover_teacher_tensor_raises():
    teacher = tiny_model("llama")
    target = target_config(teacher.config, make_plan(4, 2), tiny_recipe())
    state = dict(teacher.state_dict())
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    with pytest.raises(SurgeryError, match="unaccounted"):
        init_student_state(state, get_arch("llama"), teacher.config, target, None, InitStage())


def test_missing_teacher_tensor_raises():
    teacher = tiny_model("llama")
    target = target_config(teacher.config, make_plan(4, 2), tiny_recipe())
    state = dict(teacher.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(SurgeryError, match="no tensor"):
        init_student_state(state, get_arch("llama"), teacher.config, target, None, InitStage())


@pytest.mark.parametrize("target", ["hybrid-linear", "all-mla"])
def test_lossless_mla_init_matches_teacher(target):
    """MQA teacher, all layers MLA, all RoPE dims kept, full-rank latent: the upgrade is exact (gated or not)."""
    teacher = tiny_model("llama", num_key_value_heads=1)
    with torch.no_grad():
        teacher.model.embed_tokens.weight.mul_(50)  # keep rms(h) ≫ the norms' eps, which the latent norm re-applies
        for layer in teacher.model.layers:
            layer.input_layernorm.weight.fill_(1.0)  # the latent RMSNorm is exact when ‖x‖ is constant
    mla = {"mla": {"kv_lora_rank": 64, "qk_rope_head_dim": 16}}
    plan = mla if target == "all-mla" else {"layer_group_size": 1, **mla}
    recipe = tiny_recipe(target=target, plan=plan, stages=[{"kind": "init", "svd": "weight"}])
    student, config = _convert(teacher, recipe)
    assert config.model_type == {"hybrid-linear": "bailing_hybrid", "all-mla": "deepseek_v3"}[target]
    ids = torch.randint(3, 128, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("latent_norm", ["linear", "per_token"])
def test_latent_norm_in_its_linear_regime_keeps_every_tokens_scale(latent_norm):
    """Lossless MLA (MQA, full rank, all RoPE dims) with per-token input norms that vary, as in real models: the
    linear-regime latent norm still matches the teacher; normalising every token's latent does not."""
    teacher = tiny_model("llama", num_key_value_heads=1)
    mla = {"mla": {"kv_lora_rank": 32, "qk_rope_head_dim": 16}}
    recipe = tiny_recipe(target="all-mla", plan=mla, stages=[{"kind": "init", "svd": "weight", "latent_norm": latent_norm}])
    student, config = _convert(teacher, recipe)
    assert config.rms_norm_eps == 1e-6  # what transformers' latent norm uses, and what the engines will read
    ids = torch.randint(3, 128, (2, 40))
    with torch.no_grad():
        error = (student(input_ids=ids).logits - teacher(input_ids=ids).logits).abs().max().item()
    if latent_norm == "linear":
        assert error < 1e-3
        norm = student.model.layers[0].self_attn.kv_a_layernorm
        latent = student.model.layers[0].self_attn.kv_a_proj_with_mqa.weight[:32]
        assert norm.weight.min() > 10 and latent.abs().max() < 1e-3  # scaled into the regime, and back out
    else:
        assert error > 1e-2


def test_energy_kept_is_one_when_lossless_and_falls_with_the_rank():
    teacher = tiny_model("llama")  # GQA: 2 KV heads, so the shared RoPE key is lossy
    for rank, expect_lossless in ((64, True), (8, False)):
        recipe = tiny_recipe(target="all-mla", plan={"mla": {"kv_lora_rank": rank, "qk_rope_head_dim": 8}})
        target = target_config(teacher.config, layer_plan(recipe, 4), recipe)
        kept = mla_energy_kept(teacher.state_dict(), get_arch("llama"), teacher.config, target, None)
        assert sorted(kept) == [0, 1, 2, 3]
        v = torch.tensor([kept[i]["v"] for i in kept])
        assert v.shape == (4, 2) and (v <= 1 + 1e-9).all()
        assert torch.allclose(v, torch.ones_like(v)) == expect_lossless
        rope = torch.tensor([kept[i]["k_rope"] for i in kept])
        # The best rank one of two heads keeps at least half the total energy, so some head keeps half of its own.
        assert (rope < 1 - 1e-3).any() and (rope.max(1).values >= 0.5).all()


def test_shared_rope_key_is_exact_for_one_group_and_best_rank_one_otherwise():
    g = torch.Generator().manual_seed(0)
    eye = torch.eye(8, dtype=torch.float64)
    re, im = torch.randn(1, 3, 8, generator=g, dtype=torch.float64), torch.randn(1, 3, 8, generator=g, dtype=torch.float64)
    s_re, s_im, alpha = shared_rope_key(re, im, eye, eye)
    rebuilt = alpha[0][:, None] * torch.complex(s_re, s_im)
    torch.testing.assert_close(rebuilt, torch.complex(re[0], im[0]))


def test_absorb_bias_is_the_least_squares_fold():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=g, dtype=torch.float64) + torch.tensor([2.0, 0, 0, 1, 0, 0], dtype=torch.float64)
    w, b = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    stats = LayerStats(x.T @ x / len(x), x.mean(0), torch.ones(1))
    folded = absorb_bias(w, b, stats)
    err_folded = (x @ folded.T - (x @ w.T + b)).pow(2).mean()
    err_dropped = (x @ w.T - (x @ w.T + b)).pow(2).mean()
    assert err_folded < 0.5 * err_dropped
    # It is the least-squares optimum: perturbing it only increases the error.
    worse = (x @ (folded + 0.01 * torch.randn(3, 6, generator=g, dtype=torch.float64)).T - (x @ w.T + b)).pow(2).mean()
    assert worse > err_folded


def test_biases_need_calibration():
    teacher = tiny_model("qwen2")
    with pytest.raises(SurgeryError, match="calibration"):
        _convert(teacher, tiny_recipe())

import pytest
from helpers import tiny_model, tiny_recipe

from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.plan import engine_layer_types, make_plan, student_costs, teacher_costs, vllm_refusal
from ling_surgery.surgery.targets import target_config


def test_periodic_plan_keeps_the_last_layer_of_each_group():
    plan = make_plan(30, 6)
    assert plan.full_attention == (5, 11, 17, 23, 29)
    assert plan.group_size == 6 and plan.layer_types.count("full_attention") == 5


def test_group_size_that_does_not_divide_lists_the_ones_that_do():
    with pytest.raises(SurgeryError, match=r"does not divide num_hidden_layers 30; use one of \[2, 3, 5, 6"):
        make_plan(30, 7)


def test_explicit_layers_out_of_range():
    with pytest.raises(SurgeryError, match="out of range"):
        make_plan(4, None, [1, 4])


def test_a_layout_without_mla_layers_is_refused():
    with pytest.raises(SurgeryError, match="at least one MLA layer"):
        make_plan(4, None, [])


def test_explicit_periodic_list_is_recognised_and_irregular_warns():
    assert make_plan(6, None, [2, 5]).group_size == 3
    with pytest.warns(UserWarning, match="not periodic"):
        plan = make_plan(6, None, [0, 5])
    assert plan.group_size is None and plan.full_attention == (0, 5)


def test_engines_read_the_layout_from_the_group_size_alone():
    # every g-th layer and the trailing remainder (llama.cpp's converter and vLLM's _is_kda_layer)
    assert [i for i, t in enumerate(engine_layer_types(7, 3)) if t == "full_attention"] == [2, 5, 6]


def test_vllm_refuses_a_non_periodic_export_with_the_reason():
    teacher = tiny_model("llama")
    recipe = tiny_recipe(plan={"layer_group_size": 2, "mla": {"kv_lora_rank": 24, "qk_rope_head_dim": 8}})
    assert vllm_refusal(target_config(teacher.config, make_plan(4, 2), recipe)) is None
    with pytest.warns(UserWarning, match="not periodic"):
        measured = make_plan(4, None, [1, 2])
    reason = vllm_refusal(target_config(teacher.config, measured, recipe))
    assert "MLA layers [1, 2] are not periodic" in reason and "plan.layer_group_size" in reason
    assert "export --format gguf" in reason and "\n" not in reason


def test_target_config_and_costs():
    teacher = tiny_model("llama")
    recipe = tiny_recipe(plan={"layer_group_size": 2, "mla": {"kv_lora_rank": 24, "qk_rope_head_dim": 8}})
    target = target_config(teacher.config, make_plan(4, 2), recipe)
    assert target.num_key_value_heads == target.num_attention_heads == 4
    assert target.linear_head_dim == target.v_head_dim == 16 and target.qk_nope_head_dim == 8
    assert target.mlp_layer_types == ["dense"] * 4 and not target.tie_word_embeddings
    # θ' = θ^(dr/d) keeps the kept pairs' frequencies
    assert target.rope_parameters["rope_theta"] == pytest.approx(10000.0 ** 0.5)
    t, s = teacher_costs(teacher.config, 2), student_costs(target, 2)
    assert t.kv_bytes_per_token == 4 * 2 * 2 * 16 * 2
    assert s.kv_bytes_per_token == 2 * (24 + 8) * 2
    assert s.state_bytes_per_sequence == 2 * (4 * 16 * 16 * 4 + 3 * 4 * 16 * 3 * 2)


def test_rope_dims_larger_than_head_dim_rejected():
    teacher = tiny_model("llama")
    recipe = tiny_recipe(plan={"layer_group_size": 2, "mla": {"qk_rope_head_dim": 32}})
    with pytest.raises(SurgeryError, match="exceeds the source head_dim 16"):
        target_config(teacher.config, make_plan(4, 2), recipe)


def test_kda_mixers_on_an_all_mla_target_rejected():
    teacher = tiny_model("llama")
    stages = [{"kind": "init"}, {"kind": "logit_distill", "trainable": ["kda_mixers", "mlp"]}]
    recipe = tiny_recipe(target="all-mla", plan={"mla": {"kv_lora_rank": 24, "qk_rope_head_dim": 8}}, stages=stages)
    with pytest.raises(SurgeryError, match="stages.logit_distill.trainable names kda_mixers, but target all-mla has no KDA"):
        target_config(teacher.config, make_plan(4, 1), recipe)


def test_all_mla_target_config_and_costs():
    teacher = tiny_model("llama")
    recipe = tiny_recipe(target="all-mla", plan={"mla": {"kv_lora_rank": 24, "qk_rope_head_dim": 8}})
    target = target_config(teacher.config, make_plan(4, 1), recipe)
    assert target.model_type == "deepseek_v3" and target.q_lora_rank is None
    assert target.first_k_dense_replace == 4 and not target.tie_word_embeddings
    costs = student_costs(target, 2)
    assert costs.kv_bytes_per_token == 4 * (24 + 8) * 2 and costs.state_bytes_per_sequence == 0

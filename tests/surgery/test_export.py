"""Export: a stock bailing_hybrid folder that reloads bit-exactly in a process that never imports ling_surgery."""

import json

import pytest
import torch
from helpers import char_tokenizer, tiny_model, tiny_recipe

from ling_surgery.surgery.architectures import get_arch
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.export import MANIFEST, check_output_dir, save_model, verify_export, write_folder
from ling_surgery.surgery.init_maps import build_student, init_student_state
from ling_surgery.surgery.targets import layer_plan, target_config


def _student(**recipe_sections):
    teacher = tiny_model("llama")
    recipe = tiny_recipe(**recipe_sections)
    target = target_config(teacher.config, layer_plan(recipe, 4), recipe)
    state = init_student_state(teacher.state_dict(), get_arch("llama"), teacher.config, target, None, recipe.stages[0])
    model = build_student(state, target)
    with torch.no_grad():  # move off the symmetric init so a wrong reload cannot pass by accident
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def student():
    return _student()


def test_round_trip_is_bit_exact_and_cache_matches(student, tmp_path):
    out = save_model(student, char_tokenizer(), tmp_path / "out", {"test": True})
    check = verify_export(out, student, torch.randint(3, 100, (1, 40)))
    assert check["bit_exact"] and check["max_abs_diff"] == 0.0
    assert check["greedy_cache_matches"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BailingMoeV3ForCausalLM"] and config["model_type"] == "bailing_hybrid"
    assert config["head_dim"] == 16 and config["first_k_dense_replace"] == 4 and config["no_kda_lora"]
    assert config["layer_group_size"] == 2 and not config["tie_word_embeddings"]
    assert (out / MANIFEST).is_file() and (out / "tokenizer.json").is_file()


def test_all_mla_round_trip_is_bit_exact_deepseek_v3(tmp_path):
    model = _student(target="all-mla", plan={"mla": {"kv_lora_rank": 32, "qk_rope_head_dim": 8}})
    out = save_model(model, char_tokenizer(), tmp_path / "out", {})
    check = verify_export(out, model, torch.randint(3, 100, (1, 40)))
    assert check["bit_exact"] and check["greedy_cache_matches"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["q_lora_rank"] is None
    assert config["first_k_dense_replace"] == 4


def test_replacing_a_folder_keeps_the_old_one_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "ckpt"
    write_folder(target, lambda tmp: (tmp / "a.txt").write_text("old"))

    def broken(tmp):
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_folder(target, broken, replace=True)
    assert (target / "a.txt").read_text() == "old"
    write_folder(target, lambda tmp: (tmp / "a.txt").write_text("new"), replace=True)
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old folders left


def test_existing_output_is_refused_and_left_alone(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SurgeryError, match="already exists"):
        check_output_dir(tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_unwritable_parent(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SurgeryError, match="cannot create"):
        check_output_dir(blocker / "sub" / "out")


def test_failure_before_commit_leaves_nothing(student, tmp_path):
    def boom(folder):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        save_model(student, char_tokenizer(), tmp_path / "out", {}, before_commit=boom)
    assert list(tmp_path.iterdir()) == []


def vllm_loads(config: dict) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors vLLM's BailingMoeV3ForCausalLM loads, with the shapes its parameters take, derived from
    config.json the way it builds the model (vllm/model_executor/models/bailing_moe_v3.py at 1310e2a): KDA or MLA by
    its layer rule, dense or MoE by `first_k_dense_replace`, KDA heads of `head_dim`, the shared expert
    `moe_shared_expert_intermediate_size × num_shared_experts` wide, the MLA gate head-wise, no biases (`use_bias`).
    Names are the checkpoint's (vLLM maps `.attention.` to `.self_attn.` and stacks q/k/v/b and gate/up itself); vLLM
    skips a checkpoint tensor it has no parameter for, and a parameter no tensor fills is left uninitialised."""
    hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    group = config["layer_group_size"]
    shapes = {"model.word_embeddings.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (config["vocab_size"], hidden)}
    assert config["gated_attention_proj_granularity_type"] == "head_wise" and config["no_kda_lora"]
    assert not config["use_bias"] and config.get("q_lora_rank") is None
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
        if not ((i + 1) % group == 0 or i >= layers // group * group):  # KDA
            d, k = config["head_dim"], config["short_conv_kernel_size"]
            for name in ("q_proj", "k_proj", "v_proj", "f_proj", "g_proj"):
                shapes[f"{p}.attention.{name}.weight"] = (heads * d, hidden)
            for name in ("q_conv1d", "k_conv1d", "v_conv1d"):
                shapes[f"{p}.attention.{name}.weight"] = (heads * d, 1, k)
            shapes.update({f"{p}.attention.b_proj.weight": (heads, hidden), f"{p}.attention.A_log": (heads,),
                           f"{p}.attention.dt_bias": (heads * d,), f"{p}.attention.o_norm.weight": (d,),
                           f"{p}.attention.o_proj.weight": (hidden, heads * d)})
        else:  # MLA
            dn, dr, dv, r = (config[k] for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank"))
            shapes.update({f"{p}.attention.q_proj.weight": (heads * (dn + dr), hidden),
                           f"{p}.attention.kv_a_proj_with_mqa.weight": (r + dr, hidden),
                           f"{p}.attention.kv_a_layernorm.weight": (r,),
                           f"{p}.attention.kv_b_proj.weight": (heads * (dn + dv), r),
                           f"{p}.attention.g_proj.weight": (heads, hidden),
                           f"{p}.attention.dense.weight": (hidden, heads * dv)})
        if config["num_experts"] is not None and i >= config["first_k_dense_replace"]:
            experts, width = config["num_experts"], config["moe_intermediate_size"]
            shared = config["moe_shared_expert_intermediate_size"] * config["num_shared_experts"]
            shapes.update({f"{p}.mlp.gate.weight": (experts, hidden), f"{p}.mlp.gate.expert_bias": (experts,)})
            for e in range(experts):
                shapes.update({f"{p}.mlp.experts.{e}.gate_proj.weight": (width, hidden),
                               f"{p}.mlp.experts.{e}.up_proj.weight": (width, hidden),
                               f"{p}.mlp.experts.{e}.down_proj.weight": (hidden, width)})
            mlp, width = f"{p}.mlp.shared_experts", shared
        else:
            mlp, width = f"{p}.mlp", config["intermediate_size"]
        shapes.update({f"{mlp}.gate_proj.weight": (width, hidden), f"{mlp}.up_proj.weight": (width, hidden),
                       f"{mlp}.down_proj.weight": (hidden, width)})
    return shapes


@pytest.mark.parametrize("source", ["llama", "glm4_moe", "qwen2_moe"])
def test_exported_folder_is_what_vllm_loads(source, tmp_path):
    """Every tensor vLLM's loader reads is in the saved folder under its name and shape, and nothing else is; the
    routing vLLM hard-codes (sigmoid, renormalised, grouped) is what config.json says; transformers reloads the same
    folder bit-exactly. (vLLM itself cannot run KDA on a CPU; research/vllm-cpu.md.)"""
    from helpers import family_tokenizer, gguf_ready_student, gguf_ready_teacher
    from safetensors import safe_open

    tok = family_tokenizer("qwen2")
    torch.manual_seed(0)
    model = gguf_ready_student(tok, teacher=gguf_ready_teacher(tok, source))
    out = save_model(model, tok, tmp_path / "out", {})
    config = json.loads((out / "config.json").read_text())
    with safe_open(out / "model.safetensors", "pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    expected = vllm_loads(config)
    assert saved.keys() - expected.keys() == set() and expected.keys() - saved.keys() == set()
    assert {n: s for n, s in saved.items() if expected[n] != s} == {}
    assert config["score_function"] == "sigmoid" and config["norm_topk_prob"]  # vLLM: sigmoid, renormalize=True
    assert [config["layer_group_size"], config["num_hidden_layers"]] == [2, 4]
    assert config["rope_parameters"] == model.config.rope_parameters and config.get("rope_scaling") is None
    check = verify_export(out, model, torch.randint(3, 100, (1, 40)))
    assert check["bit_exact"] and check["greedy_cache_matches"]

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

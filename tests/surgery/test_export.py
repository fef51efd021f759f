"""Export: a stock bailing_hybrid folder that reloads bit-exactly in a process that never imports ling_surgery."""

import json

import pytest
import torch
from helpers import char_tokenizer, tiny_model

from ling_surgery.surgery.architectures import get_arch
from ling_surgery.surgery.config import ConvertConfig
from ling_surgery.surgery.convert import verify_export
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.export import MANIFEST, check_output_dir, export_checkpoint
from ling_surgery.surgery.init_maps import build_student, init_student_state
from ling_surgery.surgery.plan import make_plan, target_config


@pytest.fixture(scope="module")
def student():
    teacher = tiny_model("llama")
    cfg = ConvertConfig.model_validate({"plan": {"layer_group_size": 2}, "mla": {"kv_lora_rank": 32, "qk_rope_head_dim": 8}})
    target = target_config(teacher.config, make_plan(4, 2), cfg)
    model = build_student(init_student_state(teacher.state_dict(), get_arch("llama"), teacher.config, target, None, cfg), target)
    with torch.no_grad():  # move off the symmetric init so a wrong reload cannot pass by accident
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def test_round_trip_is_bit_exact_and_cache_matches(student, tmp_path):
    out = export_checkpoint(student, char_tokenizer(), tmp_path / "out", {"test": True})
    check = verify_export(out, student, torch.randint(3, 100, (1, 40)))
    assert check["bit_exact"] and check["max_abs_diff"] == 0.0
    assert check["greedy_cache_matches"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BailingMoeV3ForCausalLM"] and config["model_type"] == "bailing_hybrid"
    assert config["head_dim"] == 16 and config["first_k_dense_replace"] == 4 and config["no_kda_lora"]
    assert config["layer_group_size"] == 2 and not config["tie_word_embeddings"]
    assert (out / MANIFEST).is_file() and (out / "tokenizer.json").is_file()


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
        export_checkpoint(student, char_tokenizer(), tmp_path / "out", {}, before_commit=boom)
    assert list(tmp_path.iterdir()) == []

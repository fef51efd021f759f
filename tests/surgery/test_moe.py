"""MoE maps: copies are exact for DeepSeek-V3-style routers, softmax routers keep every top-k choice, the pure routing
functions match transformers' routers."""

import pytest
import torch
from transformers import BailingHybridConfig
from transformers.models.bailing_hybrid.modeling_bailing_hybrid import BailingHybridMoE, BailingHybridTopkRouter

from ling_surgery.surgery import moe
from ling_surgery.surgery.architectures import MOE_SPECS, SIGMOID, MoEShape, moe_shape, target_routing
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.init_maps import Ledger
from helpers import MOE_TINY, tiny_moe_model

SIGMOID_TYPES = ["deepseek_v3", "glm4_moe", "dots1"]
SOFTMAX_TYPES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]
LAYER = 1  # an MoE layer in every tiny source (DeepSeek-style ones keep layer 0 dense)


def shape_of(model):
    return moe_shape(MOE_SPECS[model.config.model_type], model.config)


def target_block(shape: MoEShape, tensors: dict, hidden: int = 64) -> BailingHybridMoE:
    """transformers' own target MoE block with the mapped tensors loaded strictly."""
    target = target_routing(shape)
    config = BailingHybridConfig(
        hidden_size=hidden, moe_intermediate_size=shape.expert_width, num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k, n_group=target.n_group, topk_group=target.topk_group,
        norm_topk_prob=target.renormalise, routed_scaling_factor=target.scaling, n_shared_experts=shape.target_shared_experts,
    )
    config._experts_implementation = "grouped_mm"  # what from_config picks for whole models (sources included)
    block = BailingHybridMoE(config).eval()
    block.load_state_dict(tensors, strict=True)
    return block


def map_layer(model, inputs=None):
    spec, shape = MOE_SPECS[model.config.model_type], shape_of(model)
    prefix = f"model.layers.{LAYER}"
    state = {k: v for k, v in model.state_dict().items() if k.startswith(f"{prefix}.mlp.")}
    ledger = Ledger(state)
    tensors = moe.init_moe(ledger, prefix, spec, shape, inputs)
    ledger.check_all_consumed()  # every tensor of the source block is accounted for
    return spec, shape, state, tensors


def with_constant_feature(n: int, hidden: int = 64, seed: int = 1) -> torch.Tensor:
    """Inputs sharing one direction, as trained residual streams do (massive-activation dims)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g)
    x[:, 0] += 6.0
    return x


def test_sigmoid_route_matches_transformers_router():
    torch.manual_seed(0)
    config = BailingHybridConfig(hidden_size=32, num_local_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                                 norm_topk_prob=True, routed_scaling_factor=2.5)
    router = BailingHybridTopkRouter(config)
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        router.e_score_correction_bias.normal_(0, 0.2)
    x = torch.randn(200, 32)
    _, weights, idx = router(x)
    shape = MoEShape(SIGMOID, 16, 3, 8, 0, False, True, 2.5, 4, 2, (True,))
    mine_idx, mine_w = moe.sigmoid_route(x @ router.weight.T, router.e_score_correction_bias, shape)
    order, mine_order = idx.argsort(-1), mine_idx.argsort(-1)
    assert torch.equal(idx.gather(1, order), mine_idx.gather(1, mine_order))
    torch.testing.assert_close(weights.gather(1, order), mine_w.gather(1, mine_order), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("model_type", SOFTMAX_TYPES)
def test_softmax_route_matches_source_router(model_type):
    model = tiny_moe_model(model_type)
    router = model.model.layers[LAYER].mlp.gate
    shape = shape_of(model)
    x = torch.randn(100, 64)
    _, scores, idx = router(x)
    mine_idx, mine_w = moe.softmax_route(x @ router.weight.T, shape.top_k, shape.renormalise)
    assert torch.equal(idx, mine_idx)
    torch.testing.assert_close(scores.float(), mine_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("model_type", SIGMOID_TYPES)
def test_sigmoid_router_families_copy_bit_exactly(model_type):
    model = tiny_moe_model(model_type)
    _, shape, _, tensors = map_layer(model)
    assert tensors["gate.e_score_correction_bias"].abs().min() > 0  # the selection bias is carried, not zeroed
    block = target_block(shape, tensors)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        assert torch.equal(block(x), model.model.layers[LAYER].mlp(x))


@pytest.mark.parametrize("model_type", SOFTMAX_TYPES)
def test_softmax_routers_keep_every_choice(model_type):
    model = tiny_moe_model(model_type)
    x = torch.randn(512, 64)
    _, shape, state, tensors = map_layer(model, x)
    block = target_block(shape, tensors)
    with torch.no_grad():
        _, _, source_idx = model.model.layers[LAYER].mlp.gate(x)
        _, _, target_idx = block.gate(x)
    assert torch.equal(source_idx.sort(-1).values, target_idx.sort(-1).values)
    source, gate = moe.source_block(state, f"model.layers.{LAYER}", MOE_SPECS[model_type])
    fidelity = moe.routing_fidelity(source, tensors, shape, x, gate)
    assert fidelity["topk_agreement"] == 1.0
    assert 0 < fidelity["weight_l1"] < 2 and 0 < fidelity["block_relative_error"] < 1


@pytest.mark.parametrize("model_type", SOFTMAX_TYPES)
def test_fitted_router_shift_reproduces_routing_weights(model_type):
    """Where inputs share a direction, W + 1vᵀ puts σ in its exponential regime: renormalised weights match the source's
    to ~e^-16 (v = 0 is far off); unnormalised ones are renormalised and scaled, closer than without calibration."""
    model = tiny_moe_model(model_type)
    calibration, held_out = with_constant_feature(2048), with_constant_feature(512, seed=2)
    _, shape, state, tensors = map_layer(model, calibration)
    _, _, _, plain = map_layer(model, None)
    source, gate = moe.source_block(state, f"model.layers.{LAYER}", MOE_SPECS[model_type])
    fitted = moe.routing_fidelity(source, tensors, shape, held_out, gate)
    unfitted = moe.routing_fidelity(source, plain, shape, held_out, gate)
    assert fitted["topk_agreement"] == 1.0
    if shape.renormalise:
        assert fitted["weight_l1"] < 1e-4 and fitted["block_relative_error"] < 1e-4 and unfitted["weight_l1"] > 0.1
    else:
        assert fitted["weight_l1"] < 0.7 * unfitted["weight_l1"]
        assert fitted["block_relative_error"] < 0.7 * unfitted["block_relative_error"]
    # the target module computes what routing_fidelity measured
    block = target_block(shape, tensors)
    with torch.no_grad():
        routed = block.experts(held_out, *reversed(block.gate(held_out)[1:]))
    idx, w = moe.sigmoid_route(held_out @ tensors["gate.weight"].T, tensors["gate.e_score_correction_bias"],
                               target_routing(shape))
    expected = moe.experts_output(tensors["experts.gate_up_proj"], tensors["experts.down_proj"], idx, w, held_out)
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-6)


def test_source_without_shared_expert_ships_an_exact_zero_one():
    model = tiny_moe_model("mixtral")
    _, shape, _, tensors = map_layer(model)
    assert shape.shared_width == 0 and shape.target_shared_experts == 1
    assert not tensors["shared_experts.down_proj.weight"].any()  # contributes exactly 0 ...
    assert tensors["shared_experts.gate_proj.weight"].abs().sum() > 0  # ... yet gets a gradient once trained


def test_shared_expert_width_is_zero_padded_exactly():
    model = tiny_moe_model("qwen2_moe")
    _, shape, state, tensors = map_layer(model, None)
    assert (shape.shared_width, shape.target_shared_experts) == (48, 2)
    x = torch.randn(64, 64, dtype=torch.float64)
    prefix = f"model.layers.{LAYER}.mlp.shared_expert"
    source = moe.mlp_output(*(state[f"{prefix}.{n}.weight"].double() for n in ("gate_proj", "up_proj", "down_proj")), x)
    target = moe.mlp_output(*(tensors[f"shared_experts.{n}.weight"].double() for n in ("gate_proj", "up_proj", "down_proj")), x)
    torch.testing.assert_close(target, 0.5 * source)  # σ(g·x) → its no-calibration constant 1/2


def test_experts_of_unequal_size_are_refused():
    model = tiny_moe_model("qwen3_moe")
    spec, shape = MOE_SPECS["qwen3_moe"], shape_of(model)
    state = dict(model.state_dict())
    name = f"model.layers.{LAYER}.mlp.experts.down_proj"
    state[name] = state[name][..., :24]
    with pytest.raises(SurgeryError, match="unequal size"):
        moe.init_moe(Ledger(state), f"model.layers.{LAYER}", spec, shape)


def test_dense_layers_and_what_the_engines_load():
    qwen = tiny_moe_model("qwen2_moe", mlp_only_layers=[0])
    assert shape_of(qwen).sparse == (False, True, True, True) and shape_of(qwen).engine_loadable
    assert not shape_of(tiny_moe_model("qwen2_moe", mlp_only_layers=[2])).engine_loadable
    assert not shape_of(tiny_moe_model("qwen3_moe", decoder_sparse_step=2)).engine_loadable
    deepseek = shape_of(tiny_moe_model("deepseek_v3"))
    assert (deepseek.leading_dense, deepseek.n_group, deepseek.topk_group, deepseek.scaling) == (1, 2, 1, 2.5)
    assert shape_of(tiny_moe_model("mixtral")).renormalise and not shape_of(tiny_moe_model("olmoe")).renormalise


def test_router_groups_must_fit_the_experts():
    config = dict(MOE_TINY["deepseek_v3"], num_hidden_layers=2, n_group=3)
    with pytest.raises(SurgeryError, match="n_group 3"):
        moe_shape(MOE_SPECS["deepseek_v3"], config)


# --- whole conversions --------------------------------------------------------------------------------------------

CONVERTIBLE = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "dots1", "deepseek_v3", "glm4_moe"]


def convert_tiny(teacher, plan: dict | None = None, batches=None, target: str = "hybrid-linear", init: dict | None = None):
    """Init maps with the plan values the recipe leaves unset derived from the source, as `convert` does."""
    from ling_surgery.surgery.architectures import get_arch
    from ling_surgery.surgery.config import Recipe
    from ling_surgery.surgery.init_maps import build_student, init_student_state
    from ling_surgery.surgery.sources import SourceShape
    from ling_surgery.surgery.targets import check_shapes, target_config
    from ling_surgery.surgery.taps import collect_stats

    arch = get_arch(teacher.config.model_type)
    stats = collect_stats(teacher, arch, batches or [torch.randint(3, 100, (2, 32), generator=torch.Generator().manual_seed(i))
                                                     for i in range(4)])
    recipe = Recipe.model_validate({"target": target, "plan": {"layer_group_size": 2} if plan is None else plan,
                                    **({"stages": [{"kind": "init", **init}]} if init else {})})
    layer_plan, resolved, _ = check_shapes(recipe, SourceShape.from_config(teacher.config))
    target = target_config(teacher.config, layer_plan, resolved)
    state = init_student_state(teacher.state_dict(), arch, teacher.config, target, stats, resolved.stages[0])
    return build_student(state, target), stats


@pytest.mark.parametrize("model_type", CONVERTIBLE)
def test_moe_source_converts_with_defaults_and_reloads_exactly(model_type, tmp_path):
    import json

    from helpers import char_tokenizer

    from ling_surgery.surgery.export import save_model, verify_export

    teacher = tiny_moe_model(model_type)
    student, stats = convert_tiny(teacher)
    shape = shape_of(teacher)
    for i, sparse in enumerate(shape.sparse):
        if not sparse:
            continue
        x = stats[i].moe_inputs[:256]
        source, target = teacher.model.layers[i].mlp, student.model.layers[i].mlp
        with torch.no_grad():
            if shape.router == SIGMOID:  # the same block, bit for bit
                assert torch.equal(target(x[None]), source(x[None])), i
            else:
                assert torch.equal(target.gate(x)[2].sort(-1).values, source.gate(x)[2].sort(-1).values), i
    out = save_model(student, char_tokenizer(), tmp_path / "out", {})
    check = verify_export(out, student, torch.randint(3, 100, (1, 40)))  # reloaded in a fresh process
    assert check["bit_exact"] and check["greedy_cache_matches"]
    config = json.loads((out / "config.json").read_text())
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (8, 2, 32)
    assert config["num_shared_experts"] == shape.target_shared_experts
    assert config["moe_shared_expert_intermediate_size"] == 32  # × num_shared_experts, as vLLM reads it
    assert config["first_k_dense_replace"] == shape.leading_dense and config["score_function"] == "sigmoid"
    assert config["norm_topk_prob"] is True and config["use_bias"] is False
    routing = target_routing(shape)
    assert (config["n_group"], config["topk_group"], config["routed_scaling_factor"]) == (
        routing.n_group, routing.topk_group, routing.scaling)


def test_a_layout_the_engines_cannot_load_is_refused_unless_asked(tmp_path):
    from ling_surgery.surgery.config import Recipe
    from ling_surgery.surgery.errors import RecipeError
    from ling_surgery.surgery.sources import SourceShape
    from ling_surgery.surgery.targets import check_shapes

    teacher = tiny_moe_model("qwen2_moe", mlp_only_layers=[2])
    shape = SourceShape.from_config(teacher.config)
    with pytest.raises(RecipeError, match=r"dense MLP layers \[2\] are not all leading.*plan.moe_layout: source"):
        check_shapes(Recipe.model_validate({"plan": {"layer_group_size": 2}}), shape)
    with pytest.raises(RecipeError, match="target all-mla"):
        check_shapes(Recipe.model_validate({"target": "all-mla", "plan": {"moe_layout": "source"}}), shape)
    student, _ = convert_tiny(teacher, {"layer_group_size": 2, "moe_layout": "source"})
    assert student.config.mlp_layer_types == ["sparse", "sparse", "dense", "sparse"]


def test_an_moe_source_without_a_supported_router_is_refused():
    from ling_surgery.surgery.architectures import check_source
    from ling_surgery.surgery.sources import SourceShape

    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
              "num_local_experts": 8}
    with pytest.raises(SurgeryError, match="8 experts, but its MoE router is not supported; MoE sources supported: "):
        check_source(SourceShape.from_config(config))


# --- training MoE students ------------------------------------------------------------------------------------------

def moe_setup(model_type: str = "qwen3_moe", **ctx_fields):
    """A tiny MoE teacher, its converted student and a run context on a repetitive token stream."""
    from ling_surgery.surgery.architectures import get_arch
    from ling_surgery.surgery.context import RunContext
    from ling_surgery.surgery.data import TokenStream

    teacher = tiny_moe_model(model_type)
    stream = TokenStream.of_tokens(torch.randint(3, 40, (64,), generator=torch.Generator().manual_seed(0)).repeat(40))
    student, _ = convert_tiny(teacher, batches=[stream.windows(32)[:4]])
    return student, RunContext(teacher, get_arch(model_type), stream, 32, torch.device("cpu"), 8, **ctx_fields)


def biases(model):
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "dots1"])
def test_an_moe_student_distills_with_balanced_load_reported(model_type):
    from ling_surgery.surgery.config import LogitDistillStage
    from ling_surgery.surgery.distill import logit_distill

    student, ctx = moe_setup(model_type)
    before = biases(student)
    stage = LogitDistillStage(tokens=30 * 64, batch_size=2, lr=3e-3, trainable=["all"], router_bias_rate=1e-2)
    student, result = logit_distill(student, stage, ctx)
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    sparse = [str(i) for i, kind in enumerate(student.config.mlp_layer_types) if kind == "sparse"]
    load = result["expert_load"]
    assert list(load) == sparse
    for layer in sparse:  # every token of every step, top-k slots each
        assert load[layer]["routed"] == 30 * 64 * 2 == sum(load[layer]["counts"])
        assert load[layer]["max_over_mean"] >= 1 >= load[layer]["min_over_mean"]
    after = biases(student)
    for name, bias in after.items():  # moved in steps of the rate, outside the gradient
        steps = (bias - before[name]) / 1e-2
        assert steps.abs().max() > 0 and torch.allclose(steps, steps.round(), atol=1e-3), name


def test_frozen_routers_keep_their_selection_biases():
    from ling_surgery.surgery.config import LogitDistillStage
    from ling_surgery.surgery.distill import logit_distill

    student, ctx = moe_setup("dots1")
    before = biases(student)
    stage = LogitDistillStage(tokens=4 * 64, batch_size=2, lr=3e-3, trainable=["mixers", "norms"])
    student, result = logit_distill(student, stage, ctx)
    assert result["expert_load"] and all(torch.equal(b, before[n]) for n, b in biases(student).items())


def test_a_resumed_moe_stage_ends_bit_equal_biases_included(tmp_path):
    from helpers import dies_after_saving

    from ling_surgery.surgery.checkpoint import TrainingState
    from ling_surgery.surgery.config import LogitDistillStage
    from ling_surgery.surgery.distill import logit_distill

    stage = LogitDistillStage(tokens=6 * 64, batch_size=2, lr=3e-3, trainable=["all"], router_bias_rate=1e-2)
    unbroken, ctx = moe_setup()
    _, full = logit_distill(unbroken, stage, ctx)
    broken, ctx = moe_setup()
    ctx.state, ctx.save_every = dies_after_saving(TrainingState(tmp_path / "state.pt", "fp"), step=4), 2
    with pytest.raises(KeyboardInterrupt):
        logit_distill(broken, stage, ctx)
    resumed, ctx = moe_setup()
    ctx.state, ctx.save_every = TrainingState(tmp_path / "state.pt", "fp"), 2
    _, result = logit_distill(resumed, stage, ctx)
    assert result["losses"] == full["losses"] and result["expert_load"] == full["expert_load"]
    for (name, a), b in zip(unbroken.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_moe_student_trains_under_bf16_autocast():
    """The path every CUDA run takes: routers, experts and the selection-bias update under CPU bf16 autocast."""
    from ling_surgery.surgery.config import LogitDistillStage
    from ling_surgery.surgery.distill import logit_distill

    stage = LogitDistillStage(tokens=4 * 64, batch_size=2, lr=3e-3, trainable=["all"])
    student, ctx = moe_setup(bf16_autocast=True)
    _, autocast = logit_distill(student, stage, ctx)
    student, ctx = moe_setup()
    _, fp32 = logit_distill(student, stage, ctx)
    assert autocast["losses"] != fp32["losses"]  # autocast did run in bf16 ...
    assert autocast["losses"] == pytest.approx(fp32["losses"], rel=0.1)  # ... the same function up to its rounding


def test_the_plan_shows_total_and_active_parameters_and_plans_memory(tmp_path):
    from rich.console import Console

    from ling_surgery.surgery.config import Recipe
    from ling_surgery.surgery.convert import plan_conversion
    from ling_surgery.surgery.plan import skipped_expert_params

    tiny_moe_model("qwen2_moe").save_pretrained(tmp_path / "src")
    conversion = plan_conversion(Recipe.model_validate({"source": {"model": str(tmp_path / "src")},
                                                        "plan": {"layer_group_size": 2}}))
    console = Console(width=200, record=True)
    console.print(conversion.table())
    text = console.export_text()
    # 4 MoE layers × 6 experts a token skips × 3 × 64 × 32: 0.3 M parameters, 0.15 M active
    assert skipped_expert_params(conversion.source_config) == 4 * 6 * 3 * 64 * 32
    assert "active parameters / token" in text and "0.1 M" in text
    assert "logit_distill" in text  # the memory plan counts the MoE tensors too


# --- DeepSeek attention stays MLA exactly -------------------------------------------------------------------------

@pytest.mark.parametrize("target, plan", [("hybrid-linear", {"layer_group_size": 1}), ("all-mla", {})])
def test_an_all_mla_conversion_of_deepseek_reproduces_it_bit_for_bit(target, plan):
    """Every layer MLA: attention copied (gated: g_proj 0, o_proj doubled), MoE copied, dense lead layer copied — the
    golden test of the whole mapping."""
    teacher = tiny_moe_model("deepseek_v3")
    student, _ = convert_tiny(teacher, plan, target=target)
    x = torch.randint(3, 100, (2, 40))
    with torch.no_grad():
        assert torch.equal(student(x).logits, teacher(x).logits)


def test_a_rotate_half_deepseek_source_is_made_interleaved():
    teacher = tiny_moe_model("deepseek_v3", rope_interleave=False)
    student, _ = convert_tiny(teacher, {"layer_group_size": 1})
    x = torch.randint(3, 100, (2, 40))
    with torch.no_grad():  # the same scores summed in another order
        torch.testing.assert_close(student(x).logits, teacher(x).logits, rtol=1e-5, atol=1e-5)


def test_deepseek_kda_layers_start_from_its_nope_queries_keys_and_values():
    from ling_surgery.surgery.init_maps import Ledger, mla_source_heads

    teacher = tiny_moe_model("deepseek_v3")
    prefix = "model.layers.0.self_attn"
    state = {k: v for k, v in teacher.state_dict().items() if k.startswith(prefix)}
    q, k, v, o = mla_source_heads(Ledger(state), prefix, None, teacher.config)
    x = torch.randn(5, 64, dtype=torch.float64)
    attn = teacher.model.layers[0].self_attn
    latent = x @ state[f"{prefix}.kv_a_proj_with_mqa.weight"].double()[:32].T  # no norm: rms 1 without calibration
    kv = (latent * state[f"{prefix}.kv_a_layernorm.weight"].double()) @ state[f"{prefix}.kv_b_proj.weight"].double().T
    kv = kv.view(5, 4, 32)
    torch.testing.assert_close((x @ k.T).view(5, 4, 16), kv[..., :16])
    torch.testing.assert_close((x @ v.T).view(5, 4, 16), kv[..., 16:])
    queries = (x @ attn.q_proj.weight.double().T).view(5, 4, 24)[..., :16]
    torch.testing.assert_close((x @ q.T).view(5, 4, 16), queries)


def test_deepseek_sources_with_query_lora_or_another_mla_shape_are_refused():
    from ling_surgery.surgery.architectures import check_source
    from ling_surgery.surgery.config import Recipe
    from ling_surgery.surgery.errors import RecipeError
    from ling_surgery.surgery.sources import SourceShape
    from ling_surgery.surgery.targets import check_shapes

    config = dict(MOE_TINY["deepseek_v3"], model_type="deepseek_v3", num_hidden_layers=2, hidden_size=64,
                  num_attention_heads=4, q_lora_rank=16)
    with pytest.raises(SurgeryError, match="q_lora_rank 16 .* not supported"):
        check_source(SourceShape.from_config(config))
    shape = SourceShape.from_config(tiny_moe_model("deepseek_v3").config)
    with pytest.raises(RecipeError, match="differs from the source's own MLA"):
        check_shapes(Recipe.model_validate({"plan": {"layer_group_size": 2, "mla": {"kv_lora_rank": 16}}}), shape)


# --- the router map alone, end to end -----------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["dots1", "mixtral", "olmoe"])
def test_router_swap_measures_the_router_map_alone(model_type):
    from ling_surgery.surgery.architectures import get_arch
    from ling_surgery.surgery.taps import collect_stats

    teacher = tiny_moe_model(model_type)
    windows = torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = collect_stats(teacher, get_arch(model_type), [windows])
    swap = moe.router_swap(teacher, get_arch(model_type), shape_of(teacher), stats, windows)
    if model_type == "dots1":  # DeepSeek-V3's router: the same function
        assert swap["kl"] == 0 and swap["perplexity_swapped"] == swap["perplexity_source"]
    else:
        assert 0 < swap["kl"] < 1e-3
    from dataclasses import replace

    without = [replace(s, moe_inputs=None) for s in stats]
    assert moe.router_swap(teacher, get_arch(model_type), shape_of(teacher), without, windows) is None


def test_plan_measure_prints_the_moe_map_of_a_moe_source(tmp_path):
    from helpers import tiny_overrides, tiny_source_with_text
    from rich.console import Console

    from ling_surgery.surgery.config import load_recipe
    from ling_surgery.surgery.convert import plan_conversion
    from ling_surgery.surgery.placement import measure_plan

    source = tiny_source_with_text(tmp_path, "mixtral")
    recipe = load_recipe("ci-smoke", tiny_overrides(*source) + ["plan.layer_group_size=null", "plan.placement=measured",
                                                                "plan.full_attention_count=2"])
    console = Console(record=True, width=160)
    measure_plan(plan_conversion(recipe), console)
    text = console.export_text()
    assert "MoE blocks after init" in text and "100.00%" in text and "routers swapped: KL" in text


def test_what_vllm_would_serve_differently_is_named():
    from ling_surgery.surgery.plan import vllm_refusal

    renormalised, _ = convert_tiny(tiny_moe_model("deepseek_v3"))
    assert vllm_refusal(renormalised.config) is None
    unnormalised, _ = convert_tiny(tiny_moe_model("dots1", norm_topk_prob=False))
    assert "always renormalises" in vllm_refusal(unnormalised.config)
    interleaved, _ = convert_tiny(tiny_moe_model("qwen3_moe", mlp_only_layers=[2]),
                                  {"layer_group_size": 2, "moe_layout": "source"})
    assert "dense MLPs only for the leading layers" in vllm_refusal(interleaved.config)


# --- GLM-4.5: partial rotary, q/k/v biases, optional q/k norms --------------------------------------------------

def test_partial_rotary_keeps_the_rotated_pairs_exactly():
    """MQA GLM, all layers MLA, every rotated pair kept (dr = R = 8 of 16 channels), full-rank latent: the MLA init
    matches the teacher, so the pairs (j, j + R/2) and θ' = θ^(dr/R) are right."""
    teacher = tiny_moe_model("glm4_moe", num_key_value_heads=1)
    with torch.no_grad():
        teacher.model.embed_tokens.weight.mul_(50)  # keep rms(h) ≫ the norms' eps, which the latent norm re-applies
        for layer in teacher.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
    plan = {"layer_group_size": 1, "mla": {"kv_lora_rank": 24, "qk_rope_head_dim": 8}}
    student, _ = convert_tiny(teacher, plan, init={"svd": "weight"})
    assert student.config.rope_parameters["rope_theta"] == pytest.approx(10000.0)  # θ^(8/8): the rotated pairs' own
    ids = torch.randint(3, 100, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=1e-4, rtol=1e-4)


def test_glm_with_biases_and_qk_norms_converts_and_more_rope_than_it_rotates_is_refused():
    from ling_surgery.surgery.config import Recipe
    from ling_surgery.surgery.errors import RecipeError
    from ling_surgery.surgery.sources import SourceShape
    from ling_surgery.surgery.targets import check_shapes

    teacher = tiny_moe_model("glm4_moe", attention_bias=True, use_qk_norm=True)
    student, _ = convert_tiny(teacher)  # every teacher tensor accounted for, biases and norms folded
    x = torch.randint(3, 100, (1, 24))
    with torch.no_grad():
        assert torch.isfinite(student(x).logits).all()
    shape = SourceShape.from_config(teacher.config)
    assert (shape.rotary_dim, shape.qkv_bias, shape.o_bias) == (8, True, False)
    with pytest.raises(RecipeError, match="qk_rope_head_dim 16 exceeds the source's 8 rotated channels per head"):
        check_shapes(Recipe.model_validate({"plan": {"layer_group_size": 2, "mla": {"qk_rope_head_dim": 16}}}), shape)


def test_activation_checkpointing_counts_each_token_once():
    from ling_surgery.surgery.config import LogitDistillStage
    from ling_surgery.surgery.distill import logit_distill

    stage = LogitDistillStage(tokens=4 * 64, batch_size=2, lr=3e-3, trainable=["all"], activation_checkpointing=True)
    student, ctx = moe_setup()
    _, result = logit_distill(student, stage, ctx)
    assert {layer["routed"] for layer in result["expert_load"].values()} == {4 * 64 * 2}  # not twice: recomputed

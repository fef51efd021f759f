"""The memory plan: its parameter arithmetic is the models' own, its activation table matches a fresh count of what
the training path saves, its peak matches a real CPU run within 20%, and validate / run refuse what cannot fit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import MOE_TINY, TINY
from ling_surgery.surgery.config import LogitDistillStage, LoraSettings, Recipe
from ling_surgery.surgery.errors import RecipeError
from ling_surgery.surgery.memory_plan import (ACTIVATIONS, GIB, Hardware, MemoryPlan, StudentDims, student_tensors,
                                              teacher_parameters, trainable_parameters)
from ling_surgery.surgery.sources import SourceShape
from ling_surgery.surgery.targets import check_shapes, target_config

ROOT = Path(__file__).resolve().parents[2]


def _conversion(model_type="llama", target="hybrid-linear", **dims):
    source = AutoConfig.for_model(model_type, **{**TINY, **MOE_TINY.get(model_type, {}), **dims})
    recipe = Recipe.model_validate({"target": target, "plan": {"layer_group_size": 2} if target == "hybrid-linear" else {}})
    plan, resolved, _ = check_shapes(recipe, SourceShape.from_config(source))
    return source, resolved, plan, target_config(source, plan, resolved)


@pytest.mark.parametrize("target", ["hybrid-linear", "all-mla"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe", "mixtral", "dots1", "deepseek_v3", "glm4_moe"])
def test_student_tensors_are_the_models_own(target, model_type):
    source, recipe, plan, config = _conversion(model_type, target=target)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    real = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert student_tensors(StudentDims.of_config(config)) == real
    assert student_tensors(StudentDims.of_config(json.loads(config.to_json_string()))) == real  # as config.json has it
    assert student_tensors(StudentDims.of_conversion(SourceShape.from_config(source), recipe, plan.layer_types)) == real


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("llama", {"attention_bias": True}), ("mistral", {}),
                                              ("qwen2", {}), ("qwen3", {"tie_word_embeddings": False}),
                                              *((t, MOE_TINY[t]) for t in ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe",
                                                                           "dots1", "deepseek_v3", "glm4_moe")),
                                              ("glm4_moe", {**MOE_TINY["glm4_moe"], "attention_bias": True,
                                                            "use_qk_norm": True})])
def test_teacher_parameters_count_the_model(model_type, extra):
    config = AutoConfig.for_model(model_type, **{**TINY, **extra})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert teacher_parameters(SourceShape.from_config(config)) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("groups", [["mixers"], ["kda_mixers", "mlp", "norms"], ["all"]])
def test_trainable_parameters_match_training_and_lora(groups):
    from ling_surgery.surgery.sft import with_lora
    from ling_surgery.surgery.training import select_trainable

    *_, config = _conversion()
    dims = StudentDims.of_config(config)
    model = AutoModelForCausalLM.from_config(config)
    select_trainable(model, groups)
    full = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable_parameters(student_tensors(dims), groups, dims.layer_types, None) == full
    lora = with_lora(AutoModelForCausalLM.from_config(config), LoraSettings(r=4), groups)
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert trainable_parameters(student_tensors(dims), groups, dims.layer_types, 4) == adapters


def _saved_bytes_per_token(config, bf16: bool, tokens=(2, 96), chunk=16) -> dict[str, float]:
    """Bytes per token each layer (mixer + MLP) keeps for the backward on the fast path, counted afresh."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ling_surgery.surgery.kda import student_logits

    where, seen, counts = ["embed"], set(), {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = AutoModelForCausalLM.from_config(config)
        params = {id(p.untyped_storage()) for p in model.parameters()}
        for i, layer in enumerate(model.model.layers):
            layer.input_layernorm.register_forward_pre_hook(lambda *_, i=i: where.__setitem__(0, i))
        model.model.norm.register_forward_pre_hook(lambda *_: where.__setitem__(0, "head"))

        def pack(t):
            storage = t.untyped_storage()
            # autocast's bf16 weight copies are planned apart (2 B per trainable parameter), not per token
            weight_copy = t.dim() == 2 and t.dtype == torch.bfloat16 and tokens[0] * tokens[1] not in t.shape
            if id(storage) not in params and id(storage) not in seen and not weight_copy:
                seen.add(id(storage))
                counts[where[0]] = counts.get(where[0], 0) + storage.nbytes()
            return t

        ids = torch.randint(0, config.vocab_size, tokens)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            student_logits(model, ids, chunk_size=chunk)
    return {k: v / (tokens[0] * tokens[1]) for k, v in counts.items()}


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("dims", [dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                                       intermediate_size=160),
                                  dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                                       intermediate_size=320)])
def test_activation_table_matches_a_fresh_count(dims, bf16):
    *_, config = _conversion(**dims)
    measured = _saved_bytes_per_token(config, bf16)
    table, planned = ACTIVATIONS["bf16" if bf16 else "fp32"], StudentDims.of_config(config)
    for i, kind in enumerate(planned.layer_types):
        assert table.layer(kind, planned, 16) == pytest.approx(measured[i], rel=0.05), (i, kind)


# A real CPU stage in a fresh process: resident memory before the stage vs. its peak. glibc's dynamic mmap threshold
# keeps freed blocks mapped (resident memory then runs ~35% above the live tensors), so the threshold is fixed here and
# the process's peak shows what the stage holds.
MEASURE = r"""
import gc, json, os, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
from ling_surgery.evals.train_bench import _PeakMemory
from ling_surgery.surgery.architectures import get_arch
from ling_surgery.surgery.config import InitStage, Recipe, AttentionTransferStage, LogitDistillStage, PretrainStage
from ling_surgery.surgery.context import RunContext
from ling_surgery.surgery.data import TokenStream
from ling_surgery.surgery.memory_plan import Hardware, MemoryPlan, StudentDims, teacher_parameters
from ling_surgery.surgery.sources import SourceShape
from ling_surgery.surgery.stages import STAGES
from ling_surgery.surgery.targets import check_shapes, target_config

kind, engine, batch, seq = sys.argv[1], sys.argv[2], 8, 256
torch.manual_seed(0)
source = AutoConfig.for_model("llama", vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                              tie_word_embeddings=True)
recipe = Recipe.model_validate({"plan": {"layer_group_size": 2}})
plan, recipe, _ = check_shapes(recipe, SourceShape.from_config(source))
config = target_config(source, plan, recipe)
teacher = AutoModelForCausalLM.from_config(source).eval().requires_grad_(False)
stream = TokenStream.of_tokens(torch.randint(3, 4096, (12 * batch * seq,)))
ctx = RunContext(teacher=teacher, arch=get_arch("llama"), train=stream, seq_len=seq, device=torch.device("cpu"),
                 source_config=source, target_config=config, engine=engine)
student, _ = STAGES["init"](teacher, InitStage(calibration_tokens=0), ctx)
stages = {"attention_transfer": AttentionTransferStage, "logit_distill": LogitDistillStage, "pretrain": PretrainStage}
extra = {"pretrain": {"kl_weight": 0.0, "ce_weight": 1.0}}.get(kind, {})
stage = stages[kind](tokens=3 * batch * seq, batch_size=batch, recall_mix=0.0, warmup_steps=0, **extra)
if engine == "zero3":  # DeepSpeed's one-time setup of a process (on CPU ~48 MB: its shared-memory collectives' buffers
    import deepspeed    # and the like) is the process's, not the stage's: a warm-up engine first
    tiny = torch.nn.Linear(4, 4)
    warm, *_ = deepspeed.initialize(model=tiny, optimizer=torch.optim.AdamW(tiny.parameters()), config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True})
    warm.backward(warm(torch.ones(1, 4)).sum())
    warm.step()
    warm.destroy()
    del warm, tiny
gc.collect()
rss = lambda: next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
before, peak = rss(), _PeakMemory(torch.device("cpu"))
peak.reset()
STAGES[kind](student, stage, ctx)
processes = int(os.environ.get("WORLD_SIZE", "1"))
memory = MemoryPlan((stage,), StudentDims.of_config(config), teacher_parameters(SourceShape.from_config(source)), seq,
                    32, Hardware(processes, engine=engine)).stage(stage)
whole = 4 * sum(p.numel() for p in student.parameters())  # the weights each process held before the stage
result = json.dumps({"measured": peak.peak() - before, "planned": memory.peak - whole - memory.teacher})
if "MEASURE_OUT" in os.environ:  # one file per process
    Path(os.environ["MEASURE_OUT"], f"rank{os.environ['RANK']}.json").write_text(result)
print(result)
"""


@pytest.mark.parametrize("kind", ["logit_distill", "attention_transfer", "pretrain"])
def test_planned_peak_matches_a_real_cpu_stage(kind):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure peak memory")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", MEASURE, kind, "ddp"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # what the stage adds over the weights already loaded: optimizer state, gradients, activations
    assert result["planned"] == pytest.approx(result["measured"], rel=0.2), result


def _llama_8b(tmp_path) -> str:
    folder = tmp_path / "llama-3.1-8b"
    folder.mkdir()
    (folder / "config.json").write_text((ROOT / "recipes/hub-configs/meta-llama--Llama-3.1-8B.json").read_text())
    return str(folder)


OLD_8B_RECIPE = """
source: {model: MODEL}
plan: {layer_group_size: 8, mla: {kv_lora_rank: 512, qk_rope_head_dim: 64}}
data: {seq_len: 2048}
stages:
  - {kind: init}
  - {kind: attention_transfer, tokens: 100000000, batch_size: 8, lr: 1.0e-3, trainable: [mixers]}
  - {kind: logit_distill, tokens: 200000000, batch_size: 8, lr: 1.0e-4, trainable: [all]}
runtime: {device: cuda, device_memory_gib: 80}
"""


def test_validate_refuses_the_old_8b_recipe_with_its_arithmetic(tmp_path):
    from ling_surgery.surgery.validate import validate_recipe

    path = tmp_path / "old.yaml"
    path.write_text(OLD_8B_RECIPE.replace("MODEL", _llama_8b(tmp_path)))
    with pytest.raises(RecipeError) as err:
        validate_recipe(str(path))
    logit = next(p for p in err.value.problems if p.startswith("stages.logit_distill"))
    # 9.67B parameters × (4 weights + 4 gradients + 8 AdamW) B = 144 GiB before activations and the 15 GiB teacher
    assert "9.67B trainable" in logit and "weights 36.0 + gradients 36.0 + optimizer 72.0" in logit
    assert "teacher 15.0" in logit and "runtime.device_memory_gib is 80" in logit
    assert any(p.startswith("stages.attention_transfer") and "would fit:" in p for p in err.value.problems)


@pytest.mark.parametrize("name", ["llama-3.1-8b-gpu", "llama-3.1-8b-8gpu", "qwen3-1.7b-gpu"])
def test_shipped_gpu_recipes_fit_their_device(name):
    from ling_surgery.surgery.sources import read_shape, resolve_source
    from ling_surgery.surgery.validate import validate_recipe

    recipe, _ = validate_recipe(name)  # a hub source read from the copy of its config.json the recipes ship
    shape = read_shape(resolve_source(recipe.source.model))
    plan, resolved, _ = check_shapes(recipe, shape)
    memory = MemoryPlan.of_shape(shape, resolved, plan.layer_types)
    assert memory.hw == Hardware(8 if "8gpu" in name else 1, "cuda", 80, True, "fsdp2" if "8gpu" in name else "ddp")
    assert all(m.peak <= 0.9 * 80 * GIB for m in memory.per_stage())
    # and the header's arithmetic is the plan's
    header = (ROOT / "recipes" / f"{name}.yaml").read_text()
    for m in memory.per_stage():
        assert f"= {m.peak / GIB:.1f} GiB" in header, m.stage
    # the same recipe with every weight of logit_distill trained and no checkpointing is refused
    with pytest.raises(RecipeError, match="stages.logit_distill needs"):
        validate_recipe(name, ["stages.logit_distill.trainable=[all]", "stages.logit_distill.activation_checkpointing=false"])


def test_devices_split_the_batch_and_ddp_adds_buckets():
    *_, config = _conversion()
    dims = StudentDims.of_config(config)
    stage = LogitDistillStage(tokens=4096, batch_size=8, seq_len=64)
    one = MemoryPlan((stage,), dims, 10**6, 64, 16, Hardware(1)).stage(stage)
    four = MemoryPlan((stage,), dims, 10**6, 64, 16, Hardware(4)).stage(stage)
    assert four.tokens * 4 == one.tokens == 8 * 64
    assert four.activations == pytest.approx(one.activations / 4)
    assert (one.engine, four.engine) == (0, four.gradients)
    accumulated = MemoryPlan((stage,), dims, 10**6, 64, 16, Hardware(1)).stage(stage.model_copy(update={"grad_accumulation": 2}))
    assert accumulated.peak == pytest.approx(one.weights + one.teacher + one.optimizer + one.gradients + one.activations)


def test_run_checks_the_plan_itself_before_writing(tmp_path):
    """`run` plans for where it runs (validate checks the recipe; run checks again with the launched processes), and a
    refusal writes nothing."""
    from helpers import tiny_overrides, tiny_source_with_text
    from ling_surgery.surgery.config import load_recipe
    from ling_surgery.surgery.run import run

    model, data = tiny_source_with_text(tmp_path)
    out = tmp_path / "run"
    recipe = load_recipe("ci-smoke", [*tiny_overrides(model, data), f"export.output={out}",
                                      "runtime.device_memory_gib=0.001"])
    with pytest.raises(RecipeError, match="runtime.device_memory_gib is 0.001 on 1 device"):
        run(recipe, fresh=True)
    assert not out.exists()


def test_fsdp2_shards_weights_gradients_and_optimizer_state():
    *_, config = _conversion()
    dims = StudentDims.of_config(config)
    stage = LogitDistillStage(tokens=4096, batch_size=8, seq_len=64, trainable=["all"])
    ddp, fsdp2 = (MemoryPlan((stage,), dims, 10**6, 64, 16, Hardware(4, engine=e)).stage(stage) for e in ("ddp", "fsdp2"))
    assert (fsdp2.weights, fsdp2.gradients, fsdp2.optimizer) == pytest.approx(
        (ddp.weights / 4, ddp.gradients / 4, ddp.optimizer / 4))
    assert fsdp2.activations == ddp.activations and fsdp2.teacher == ddp.teacher  # the teacher is replicated
    # FSDP2's units are the decoder layers, gathered twice (computing, prefetched) plus one's gradient, and the root
    # (embeddings, final norm, LM head) with its gradients
    model = AutoModelForCausalLM.from_config(config)
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    root = sum(p.numel() for p in model.parameters()) - sum(layers)
    assert fsdp2.engine == 4 * (3 * max(layers) + 2 * root) and ddp.engine == ddp.gradients
    # one process shards nothing
    single = MemoryPlan((stage,), dims, 10**6, 64, 16, Hardware(1, engine="fsdp2")).stage(stage)
    assert single.weights == ddp.weights and single.engine == 0
    # ZeRO-3 shards alike and keeps an fp32 master copy of its partition of the trainable weights
    zero3 = MemoryPlan((stage,), dims, 10**6, 64, 16, Hardware(4, engine="zero3")).stage(stage)
    assert zero3.weights == pytest.approx(2 * fsdp2.weights)  # trainable: all
    assert (zero3.gradients, zero3.optimizer, zero3.engine) == (fsdp2.gradients, fsdp2.optimizer, fsdp2.engine)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero3"])
def test_planned_peak_matches_each_of_two_processes(engine, tmp_path):
    """Two CPU processes (torchrun, gloo): what each holds over the whole model it loaded — a replica with DDP's
    buckets, or 1/2 of the weights, gradients and AdamW state plus the gathered units under FSDP2 (and ZeRO-3's fp32
    master copy of its partition)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure peak memory")
    from test_distributed import _free_port

    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    port = _free_port()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1", "MEASURE_OUT": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), str(script), "logit_distill", engine], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for result in (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)):
        assert result["planned"] == pytest.approx(result["measured"], rel=0.2), result


def test_a_sharded_teacher_holds_its_shard_two_layers_and_its_root():
    from ling_surgery.surgery.memory_plan import teacher_root

    source, recipe, plan, config = _conversion()
    shape = SourceShape.from_config(source)
    stage = LogitDistillStage(tokens=4096, batch_size=8, seq_len=64)
    dims, total = StudentDims.of_config(config), teacher_parameters(shape)
    layout = (teacher_root(shape), shape.num_layers)
    replicated, sharded = (MemoryPlan((stage,), dims, total, 64, 16, Hardware(4, engine="fsdp2", shard_teacher=s),
                                      layout).stage(stage) for s in (False, True))
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(source)
    layer = sum(p.numel() for p in teacher.model.layers[0].parameters())
    assert replicated.teacher == 4 * total
    assert sharded.teacher == pytest.approx(4 * (total / 4 + 2 * layer + layout[0]))

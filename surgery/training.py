"""The training loop of every stage that trains with its own loop: attention_transfer, logit_distill and pretrain.

One loop on `accelerate.Accelerator`, on one process or data-parallel over N (each trains its share of every batch):
packed windows from the run's token stream (documents kept apart, `TokenStream.positions`), optional copy windows,
gradient accumulation, warm-up then a cosine or WSD schedule, gradient clipping, AdamW on the stage's trainable groups
(or LoRA adapters), per-row rates for MLA latents in their linear regime, and in-stage checkpoints written atomically
for `--resume` — weights, optimizer, schedule, RNG and data position — so a killed stage resumed ends bit-equal to an
unbroken one. A stage supplies only its loss: `loss_fn(input_ids, position_ids, window) -> scalar` (`window`:
the stage window index of the micro-batch's first row).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from rich.console import Console

from ling_surgery.surgery.context import RunContext
from ling_surgery.surgery.defaults import logit_distill_trainable
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.kda import student_logits
from ling_surgery.surgery.moe import ExpertLoad, load_table
from ling_surgery.surgery.parameter_groups import TRAINABLE_GROUPS
from ling_surgery.surgery.plan import KDA, mixer_types
from ling_surgery.surgery.progress import training_progress
from ling_surgery.surgery.synthetic import copy_rows, mix_copy_windows


@dataclass
class StageResult:
    name: str
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    trainable_params: int = 0
    losses: list[float] = field(default_factory=list)
    expert_load: dict = field(default_factory=dict)  # MoE students: moe.ExpertLoad.summary()

    def summary(self) -> dict:
        head = self.losses[: max(1, len(self.losses) // 10)]
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return {
            "tokens": self.tokens,
            "steps": self.steps,
            "seconds": round(self.seconds, 1),
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds else None,
            "trainable_params": self.trainable_params,
            "loss_first": round(sum(head) / len(head), 5) if self.losses else None,
            "loss_last": round(sum(tail) / len(tail), 5) if self.losses else None,
            "losses": [round(x, 5) for x in self.losses],
            **({"expert_load": self.expert_load} if self.expert_load else {}),
        }


def select_trainable(model: torch.nn.Module, groups: list[str]) -> list[torch.nn.Parameter]:
    """Freeze everything but the named groups; every group must match at least one parameter."""
    chosen, types = [], mixer_types(model.config)
    for group in groups:
        if not any(TRAINABLE_GROUPS[group](n, types) for n, _ in model.named_parameters()):
            raise SurgeryError(f"trainable group {group!r} matches no parameter of the student")
    for name, param in model.named_parameters():
        keep = any(TRAINABLE_GROUPS[g](name, types) for g in groups)
        param.requires_grad_(keep)
        if keep:
            chosen.append(param)
    return chosen


def latent_row_rates(student, input_ids: torch.Tensor, chunk_size: int) -> dict[str, torch.Tensor]:
    """Per-row learning-rate multipliers for MLA down-projections whose latent RMSNorm works in its linear regime.

    There (`init_maps.latent_norm_init`) the latent rows of `kv_a_proj_with_mqa` are ~1e-5 of the map they carry
    and the norm's weight scales them back: AdamW's steps, ~lr per element whatever the weight's size, would throw
    them out of the regime in one step. Scaling each row's step by sqrt(ε + ms)/w — the ratio between the row and
    the map it carries — gives it the relative step any other weight gets. Measured once per stage on its first
    window with the stage's starting weights, so a resumed stage gets the same rates. Layers whose latent mean square
    is above ε normalise as usual and train as usual.
    """
    from ling_surgery.surgery.init_maps import LATENT_NORM_EPS

    norms = {f"model.layers.{i}.self_attn": layer.self_attn.kv_a_layernorm for i, layer in enumerate(student.model.layers)
             if hasattr(layer.self_attn, "kv_a_layernorm")}
    if not norms:
        return {}
    mean_square: dict[str, float] = {}

    def record(name):
        def hook(module, args):
            mean_square[name] = args[0].float().pow(2).mean().item()
        return hook

    handles = [norm.register_forward_pre_hook(record(name)) for name, norm in norms.items()]
    try:
        with torch.no_grad():
            student_logits(student, input_ids, chunk_size)
    finally:
        for handle in handles:
            handle.remove()
    rates = {}
    for name, norm in norms.items():
        if mean_square[name] < LATENT_NORM_EPS:
            latent = ((LATENT_NORM_EPS + mean_square[name]) ** 0.5 / norm.weight.detach().float().abs()).clamp(max=1.0)
            rows = student.get_submodule(f"{name}.kv_a_proj_with_mqa").weight.shape[0]
            rates[f"{name}.kv_a_proj_with_mqa.weight"] = torch.cat([latent, latent.new_ones(rows - len(latent))])
    return rates


def clip_gradients(params, row_rates: dict, max_norm: float, clip=torch.nn.utils.clip_grad_norm_):
    """Clip the global gradient norm, with latent rows in their linear regime measured at their natural scale.

    Those rows are ~1e-5 of the map they carry (`latent_row_rates`), so their gradients are ~1e5 too large: left
    as they are they set the global norm alone, and clipping to it scaled every other gradient to ~nothing (KDA
    mixers trained beside such MLA layers moved 10-20x less in attention transfer). Their gradients are multiplied
    by the row rates first: AdamW's step does not depend on a constant per-element scale of the gradient, and the
    rates scale the step afterwards as before. `clip` is the engine's clipping (`Accelerator.clip_grad_norm_`); returns
    the global norm it measured."""
    with torch.no_grad():
        for p, rate in row_rates.items():
            if p.grad is not None:
                p.grad.mul_(rate)
    return clip(params, max_norm)


def lr_factor(step: int, total: int, stage) -> float:
    """The learning-rate multiplier of optimizer step `step` of `total`: linear warm-up over `warmup_steps`, then

    - cosine: from 1 down to `min_lr_ratio` at the last step;
    - wsd (warmup-stable-decay; MiniCPM, Hu et al. 2024 §4.1): 1 until the last `decay_fraction` of the steps, then
      linearly down to `min_lr_ratio` — a run can be continued from before its decay;
    - constant: 1.
    """
    warmup, floor = stage.warmup_steps, stage.min_lr_ratio
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if stage.schedule == "constant":
        return 1.0
    if stage.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_steps = max(1, round(stage.decay_fraction * total))
    into_decay = step - (total - decay_steps) + 1
    return 1.0 if into_decay <= 0 else 1 - (1 - floor) * min(1.0, into_decay / decay_steps)


def autocast(ctx: RunContext):
    # bf16 autocast when the run asks for it (runtime.dtype, auto: CUDA only; most CPUs run bf16 far slower than fp32).
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16) if ctx.bf16_autocast else nullcontext()


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """`value` (no gradient) averaged over the data-parallel processes; itself in one process. For a loss's
    normaliser that must be the global batch's so that N processes train as one."""
    from accelerate.utils import reduce

    return reduce(value.detach(), "mean")


class _LossModule(torch.nn.Module):
    """A stage's loss as a module over the model it trains, so the engine's wrapper (DDP, FSDP) sees the forward."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, input_ids, position_ids, window):
        return self.loss_fn(input_ids, position_ids, window)


def optimizer_steps(stage, seq_len: int) -> int:
    """The optimizer steps a stage takes: its tokens in whole steps of batch_size × grad_accumulation windows."""
    return stage.tokens // (stage.batch_size * stage.grad_accumulation * seq_len)


def stage_batches(stage, ctx: RunContext, start: int):
    """A stage's micro-batches from its window `start` on: (first window, input_ids, position_ids), `batch_size`
    windows each, copy windows mixed in (`recall_mix`; each seeded by its window index, so the batches from any
    start are the ones an unbroken stage reads there)."""
    window = start
    for input_ids, position_ids in ctx.train.batches(ctx.seq_len, stage.batch_size, start=start,
                                                     documents=ctx.separate_documents):
        if stage.recall_mix:
            input_ids = mix_copy_windows(input_ids, stage.recall_mix, ctx.train, window, ctx.train.joins)
            if position_ids is not None:  # a copy window is one document
                position_ids[copy_rows(len(input_ids), stage.recall_mix, window)] = torch.arange(ctx.seq_len)
        yield window, input_ids, position_ids
        window += stage.batch_size


def check_finite(loss: torch.Tensor, accelerator, name: str, step: int, windows: range, models: dict) -> None:
    """Stop on a non-finite loss — in every process at once: each learns every process's loss (one small gather),
    so all raise the same one-line error instead of one failing while the others wait in the next collective. The
    error names where: a weight that is not finite (`models`: {"the student": …, "the teacher": …}), else the
    windows of the training text the step read. Nothing was updated: the last in-stage checkpoint stays as it was."""
    losses = accelerator.gather(loss.detach().float().reshape(1)) if accelerator.num_processes > 1 else loss.reshape(1)
    bad = [i for i, value in enumerate(losses.tolist()) if not math.isfinite(value)]
    if not bad:
        return
    where = "" if accelerator.num_processes == 1 else f" in process {', '.join(map(str, bad))} of {len(losses)}"
    # Over several processes the line must be the same in all (the first prints it): it names what all know.
    weight = nonfinite_weight(models) if accelerator.num_processes == 1 else None
    batch = f"windows {windows.start}–{windows.stop - 1} of the training text"
    if weight is not None and step == 0:
        cause = f"{weight}, before any update: the model's weights are broken (check its files, or the stage before)"
    elif weight is not None:
        cause = f"{weight}: an update blew up; lower stages.{name}.lr"
    elif accelerator.num_processes == 1:
        cause = (f"the weights are finite, so the outputs overflow on {batch}; lower stages.{name}.lr, or train in "
                 "float32 (runtime.dtype)")
    else:
        cause = f"on {batch}; lower stages.{name}.lr, or train in float32 (runtime.dtype)"
    raise SurgeryError(f"stage {name}: loss became {losses[bad[0]].item()} at step {step}{where} ({cause}); the last "
                       "in-stage checkpoint is kept")


def nonfinite_weight(models: dict) -> str | None:
    """"the student's NAME holds nan" for the first weight of `models` ({role: module}) with a NaN or Inf, else None."""
    from ling_surgery.surgery.sources import first_nonfinite

    for role, model in models.items():
        broken = None if model is None else first_nonfinite((n, local(p)) for n, p in model.named_parameters())
        if broken:
            return f"{role}'s {broken}"
    return None


def check_gradients(norm, trainable: dict, name: str, step: int) -> None:
    """Stop before the optimizer step when the gradient norm is not finite (clipping would turn the weights to NaN),
    naming the first weight whose gradient is; the weights and the last in-stage checkpoint stay as they were.
    The norm is the global one (every process clips by the same), so every process stops alike."""
    value = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if math.isfinite(value):
        return
    first = next((n for n, p in trainable.items() if p.grad is not None and not torch.isfinite(local(p.grad)).all()),
                 None)
    at = f", first in {first}" if first else ""
    raise SurgeryError(f"stage {name}: the gradient norm became {value} at step {step}{at}; the weights were not "
                       f"updated and the last in-stage checkpoint is kept; lower stages.{name}.lr or "
                       f"stages.{name}.max_grad_norm")


def engine_of(accelerator, engine: str) -> str:
    """The engine a stage trains with: `runtime.engine`, which a launch through an accelerate FSDP or DeepSpeed config
    must name (the fast path needs its own sharding units, so `shard_for_training` applies FSDP2 whatever the config
    wraps, and `zero3.wrap` takes only the ZeRO settings of a DeepSpeed config)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and engine != "fsdp2":
        raise SurgeryError(f"launched with an accelerate FSDP config but runtime.engine is {engine!r}: set "
                           "runtime.engine=fsdp2 (the memory plan and checkpoints follow it)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and engine != "zero3":
        raise SurgeryError(f"launched with an accelerate DeepSpeed config but runtime.engine is {engine!r}: set "
                           "runtime.engine=zero3 (the memory plan and checkpoints follow it)")
    return engine


def process_mesh(device: torch.device):
    """One mesh dimension over every launched process, on this process's device type (what FSDP2 shards over)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_for_training(loss_module: torch.nn.Module, student, device: torch.device) -> torch.nn.Module:
    """FSDP2 (torch `fully_shard`) over every process: each decoder layer's `FastLayer` is one unit, gathered for its
    forward (`mixer` goes through it) and resharded after it, its gradients reduce-scattered;
    the embeddings, final norm and LM head belong to the root unit (the loss module). Only modules made for this stage
    are sharded — the `FastLayer`s and the loss module — so the model's own modules stay plain and the next stage
    shards afresh. Every process holds 1/N of the weights, gradients and AdamW state. `gather_after_training` makes the
    model whole again."""
    from torch.distributed.fsdp import fully_shard

    from ling_surgery.surgery.kda import FastLayer, set_fast_layers

    mesh = process_mesh(device)
    layers = torch.nn.ModuleList(FastLayer(layer) for layer in student.model.layers)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    loss_module.fast_layers = layers  # in the root's tree, so the root knows its inner units
    fully_shard(loss_module, mesh=mesh, ignored_params={p for layer in layers for p in layer.parameters()})
    set_fast_layers(student, layers)
    return loss_module


def sharded_copy(teacher: torch.nn.Module, arch, device: torch.device) -> torch.nn.Module:
    """`runtime.teacher: sharded`: a copy of the frozen teacher under FSDP2 for one stage — each decoder layer a unit
    gathered for its own forward (the teacher runs as transformers runs it), the rest the root's — while the teacher
    itself waits in host memory. A copy, because `fully_shard` changes the modules it wraps for good, and the whole
    teacher serves the evaluations between stages."""
    import copy

    from torch.distributed.fsdp import fully_shard

    from ling_surgery.surgery.taps import get_module

    teacher.to("cpu")
    shard = copy.deepcopy(teacher)
    mesh = process_mesh(device)
    for layer in get_module(shard, arch.layers):
        fully_shard(layer, mesh=mesh)
    fully_shard(shard, mesh=mesh)  # moves its shards to the mesh's device
    return shard.to(device)


def local(param: torch.Tensor) -> torch.Tensor:
    """A parameter's shard on this process (the parameter itself when it is not sharded)."""
    return param.to_local() if hasattr(param, "to_local") else param


def like(param: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-row values (rows × 1) laid out as `param` is: sharded by rows under FSDP2, this process's flat partition
    under ZeRO-3."""
    if hasattr(param, "ds_id"):
        from ling_surgery.surgery.zero3 import local_part

        return local_part(param, rows)
    if not hasattr(param, "device_mesh"):
        return rows
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(rows, param.device_mesh, param.placements)


def local_optimizer_state(state: dict) -> dict:
    """An optimizer state dict with each sharded tensor replaced by this process's shard (what a shard file holds)."""
    return {"state": {k: {n: local(v) if torch.is_tensor(v) else v for n, v in s.items()} for k, s in state["state"].items()},
            "param_groups": state["param_groups"]}


def reshard_optimizer_state(optimizer) -> None:
    """After loading a shard file: lay each moment out as its (sharded) parameter is."""
    from torch.distributed.tensor import DTensor

    for param, state in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        for name, value in state.items():
            if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.to_local().shape:
                state[name] = DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                                 shape=param.shape, stride=param.stride())


def gather_after_training(trained: torch.nn.Module, student) -> None:
    """Every sharded parameter replaced by the whole tensor (gathered from all processes), so the model is a plain
    one again: the stage returns it, the main process saves it, the next stage shards it afresh."""
    from torch.distributed.tensor import DTensor

    from ling_surgery.surgery.kda import set_fast_layers

    set_fast_layers(student, None)
    wholes = {}  # by the sharded parameter: a tied one (embeddings and LM head) stays one parameter
    with torch.no_grad():
        for module in trained.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if isinstance(param, DTensor):
                    if id(param) not in wholes:
                        wholes[id(param)] = torch.nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                    module._parameters[name] = wholes[id(param)]


def train(student, stage, ctx: RunContext, loss_fn) -> tuple[torch.nn.Module, StageResult]:
    """Train `student`'s trainable groups (or LoRA adapters on them) on `loss_fn` for `stage.tokens` tokens (see the
    module doc); returns the trained model (adapters merged) and the result.

    An optimizer step takes `grad_accumulation` micro-batches of `batch_size` windows; the loss recorded per step is
    their mean. Window i of the stage is `ctx.window_start + i`, so the data position of a resumed stage is its step.
    `loss_fn` calls the student it was given: LoRA wraps that model's layers in place.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=ctx.device.type == "cpu")
    name, accumulation = stage.name, stage.grad_accumulation
    processes, rank = accelerator.num_processes, accelerator.process_index
    if stage.batch_size % processes:
        raise SurgeryError(f"stages.{name}.batch_size {stage.batch_size} does not split over {processes} processes: "
                           f"use a multiple of {processes} (it is the global batch; each process trains "
                           "batch_size / processes windows of it)")
    rows = stage.batch_size // processes
    console = ctx.console if accelerator.is_main_process else None
    engine_name = engine_of(accelerator, ctx.engine)
    sharded = engine_name in ("fsdp2", "zero3") and processes > 1
    zero = sharded and engine_name == "zero3"
    if console is not None and processes > 1:
        layout = ("sharded (DeepSpeed ZeRO-3)" if zero else "sharded (FSDP2)") if sharded else "replicated (DDP)"
        console.print(f"{name}: {processes} processes ({accelerator.distributed_type.value}, {layout}), {rows} of each "
                      f"micro-batch's {stage.batch_size} windows per process")
    result = StageResult(name)
    windows_per_step = stage.batch_size * accumulation
    tokens_per_step = windows_per_step * ctx.seq_len
    steps = optimizer_steps(stage, ctx.seq_len)
    groups = stage.trainable or logit_distill_trainable(KDA in mixer_types(student.config))[0]
    rates = {}
    if stage.lora is None:  # under LoRA the latent rows are frozen base weights: no rates apply
        first = ctx.train.windows(ctx.seq_len)[ctx.window_start : ctx.window_start + 1].to(ctx.device)
        rates = latent_row_rates(student, first, ctx.chunk_size)
    trained = student
    if stage.lora is not None:
        from ling_surgery.surgery.sft import with_lora

        trained = with_lora(student, stage.lora, groups)  # the adapters (and norms, convs) train; base weights stay
    else:
        select_trainable(student, groups)
    result.trainable_params = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    # MoE students: expert load counted on every training forward; selection biases balanced while the routers train.
    load = ExpertLoad(student, stage.router_bias_rate)
    balance = bool(load) and all(router.weight.requires_grad for router in load.routers.values())
    # Data parallelism through the engine: the loss runs inside a module the engine wraps, so the engine averages the
    # gradients; each process trains its share of every micro-batch. DDP (accelerate) keeps a whole replica per
    # process; FSDP2 (`shard_for_training`) and ZeRO-3 (`zero3.wrap`) shard weights, gradients and optimizer state
    # over the processes.
    whole_teacher = None
    if sharded and ctx.shard_teacher and ctx.teacher is not None and not getattr(stage, "teacher_topk", 0):
        whole_teacher, ctx.teacher = ctx.teacher, sharded_copy(ctx.teacher, ctx.arch, ctx.device)
    if not sharded:
        engine = accelerator.prepare_model(_LossModule(trained, loss_fn))
    elif not zero:
        engine = shard_for_training(_LossModule(trained, loss_fn), student, ctx.device)
    trainable = {n: p for n, p in trained.named_parameters() if p.requires_grad}  # after FSDP2: the shards
    params = list(trainable.values())
    optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, stage))
    if zero:
        from ling_surgery.surgery import zero3

        layer_numel = max(sum(p.numel() for p in layer.parameters()) for layer in student.model.layers)
        config = zero3.engine_config(zero3.user_config(accelerator), stage, rows, processes, layer_numel)
        engine = zero3.wrap(_LossModule(trained, loss_fn), student, optimizer, config)
    # after the engine: laid out as it holds the parameters
    row_rates = {trainable[n]: like(trainable[n], r.to(ctx.device)[:, None]) for n, r in rates.items() if n in trainable}
    done = 0
    saved = None
    if ctx.state is not None:
        saved = (ctx.state.load_shard(rank, processes, engine_name) if sharded
                 else ctx.state.load(map_location=ctx.device))
    if saved is not None and zero:
        zero3.load_local_state(engine, trainable, saved["params"], saved["optimizer"])
    elif saved is not None:
        with torch.no_grad():
            for n, p in trainable.items():
                local(p).copy_(saved["params"][n])
        optimizer.load_state_dict(saved["optimizer"])
        if sharded:
            reshard_optimizer_state(optimizer)
    if saved is not None:
        scheduler.load_state_dict(saved["scheduler"])
        if zero:  # the optimizer's own state dict (which holds the rates) is DeepSpeed's, not restored whole
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        torch.set_rng_state(saved["rng"].cpu())
        if "expert_load" in saved:
            load.load_state(saved["expert_load"])
        done, result.losses, result.seconds = saved["step"], saved["losses"], saved["seconds"]
        result.steps, result.tokens = done, done * tokens_per_step
        if console is not None:
            console.print(f"{name}: resuming at step {done}/{steps} from {ctx.state.path.name}")
    batches = stage_batches(stage, ctx, ctx.window_start + done * windows_per_step)
    student.train()
    start = time.perf_counter() - result.seconds
    with load, training_progress(name, steps * tokens_per_step, console or Console(quiet=True),
                                 completed=done * tokens_per_step) as progress:
        for step in range(done, steps):
            step_loss = torch.zeros((), dtype=torch.float64, device=ctx.device)
            for micro in range(accumulation):
                window, input_ids, position_ids = next(batches)
                mine = slice(rank * rows, (rank + 1) * rows)  # this process's rows of the global micro-batch
                input_ids = input_ids[mine].to(ctx.device)
                position_ids = None if position_ids is None else position_ids[mine].to(ctx.device)
                # Gradients are averaged over processes once per optimizer step, not per micro-batch.
                if sharded and not zero:
                    engine.set_requires_gradient_sync(micro == accumulation - 1)
                with accelerator.no_sync(engine) if micro < accumulation - 1 and not sharded else nullcontext():
                    with autocast(ctx):
                        loss = engine(input_ids, position_ids, window + rank * rows)
                    check_finite(loss, accelerator, name, step, range(window, window + stage.batch_size),
                                 {"the student": trained, "the teacher": ctx.teacher})
                    if zero:  # DeepSpeed divides by its gradient_accumulation_steps, and steps after the last
                        engine.backward(loss)
                        zero3.step(engine, row_rates)
                    else:
                        accelerator.backward(loss / accumulation)
                step_loss += loss.detach().double() / accumulation
            step_loss = accelerator.reduce(step_loss, "mean").item()
            if not zero:
                norm = clip_gradients(params, row_rates, stage.max_grad_norm,
                                      torch.nn.utils.clip_grad_norm_ if sharded else accelerator.clip_grad_norm_)
                check_gradients(norm, trainable, name, step)
                before = {p: p.detach().clone() for p in row_rates}
                optimizer.step()
                with torch.no_grad():
                    for p, rate in row_rates.items():
                        p.copy_(before[p] + (p - before[p]) * rate)
                optimizer.zero_grad(set_to_none=True)
            load.after_step(balance)
            scheduler.step()
            result.losses.append(step_loss)
            result.steps += 1
            result.tokens += tokens_per_step
            progress.advance(tokens_per_step, loss=step_loss, lr=scheduler.get_last_lr()[0])
            if ctx.on_step is not None:
                ctx.on_step(step)
            if ctx.state is not None and ctx.save_every and (step + 1) % ctx.save_every == 0 and step + 1 < steps:
                if zero:
                    weights, moments = zero3.local_state(engine, trainable)
                else:
                    weights = {n: local(p).detach().clone() for n, p in trainable.items()}
                    moments = local_optimizer_state(optimizer.state_dict()) if sharded else optimizer.state_dict()
                state = {
                    "step": step + 1,
                    "next_window": window + stage.batch_size,  # the data position (recomputed from the step; kept to read)
                    "params": weights,
                    "optimizer": moments,
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "losses": list(result.losses),
                    "seconds": time.perf_counter() - start,
                    "expert_load": load.state(),
                }
                if sharded:  # every process writes its shard
                    ctx.state.save_shard(state, step + 1, steps, rank, processes, accelerator.wait_for_everyone,
                                          engine_name)
                elif accelerator.is_main_process:  # the weights are the same in every process: one writes
                    ctx.state.save(state, step + 1, steps)
    result.seconds = time.perf_counter() - start
    result.expert_load = load.summary()
    if console is not None and result.expert_load:
        console.print(load_table(result.expert_load))
    accelerator.wait_for_everyone()
    if zero:
        zero3.unwrap(engine, trained, student)
    elif sharded:
        gather_after_training(trained, student)
    if whole_teacher is not None:
        ctx.teacher = whole_teacher.to(ctx.device)
    del engine
    if stage.lora is not None:
        student = trained.merge_and_unload()
    student.eval()
    student.requires_grad_(False)
    return student, result

"""DeepSpeed ZeRO-3 for the training stages (`runtime.engine: zero3`): weights, gradients and AdamW state partitioned
over the processes, each parameter gathered while the module that uses it computes.

ZeRO-3 gathers a module's own parameters around its `forward`. The fast training path calls a decoder layer's parts
(norms, projections, the KDA kernel that reads `conv1d.weight` directly), so, as under FSDP2, each layer runs as a
`FastLayer` whose forward the engine hooks, with every parameter of the layer registered as its external parameter
(`deepspeed.zero.register_external_parameter`): the whole layer is gathered for the layer's forward and backward.
The loop of `training.train` stays the engine's owner of the schedule: the stage's own AdamW and LR schedule are
handed to DeepSpeed (which steps them over its fp32 partitions); the per-row rates of MLA latents in their linear
regime (`training.latent_row_rates`) are applied to this process's partitions through DeepSpeed's local-partition API.
In-stage checkpoints hold each process's partitions (`TrainingState.save_shard`), resumable on the same number of
processes; at the stage's end the partitions are gathered back into plain parameters and the hooks removed, so the
model leaves the stage as it came in.
"""

from __future__ import annotations

import torch

from ling_surgery.surgery.errors import SurgeryError

ZERO_OVERRIDES = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "gradient_clipping", "optimizer", "scheduler", "fp16", "bf16")


MISSING = ("runtime.engine zero3 needs DeepSpeed: pip install 'ling-surgery[deepspeed]' (or use runtime.engine fsdp2, "
           "which needs nothing beyond torch)")


def installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise SurgeryError(MISSING) from None
    import logging

    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines would bury the progress bars
    return deepspeed


def engine_config(user: dict | None, stage, rows: int, processes: int, layer_numel: int) -> dict:
    """The DeepSpeed config of one stage: the stage decides batch, accumulation and clipping, the run's precision is
    runtime.dtype's (bf16 autocast over fp32 weights, as every engine here), and the user's accelerate config
    (`deepspeed_config`) may tune ZeRO-3 itself — offload, bucket sizes, persistence threshold. Sizes left at "auto"
    (or unset) are a decoder layer's parameter count: one layer gathered ahead, one layer's gradients per bucket."""
    zero = dict((user or {}).get("zero_optimization") or {})
    if zero.get("stage", 3) != 3:
        raise SurgeryError(f"the DeepSpeed config asks for ZeRO stage {zero['stage']}: runtime.engine zero3 runs stage "
                           "3; set zero_stage: 3 in the accelerate config (or use runtime.engine ddp)")
    zero["stage"] = 3
    sizes = {"reduce_bucket_size": layer_numel, "stage3_prefetch_bucket_size": layer_numel,
             "stage3_max_live_parameters": 2 * layer_numel, "stage3_param_persistence_threshold": 0}
    for key, value in sizes.items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    zero.setdefault("overlap_comm", False)  # the row rates read the reduced gradients right after the backward
    config = {k: v for k, v in (user or {}).items() if k not in ZERO_OVERRIDES and v != "auto"}
    config.update(
        zero_optimization=zero, train_micro_batch_size_per_gpu=rows, gradient_accumulation_steps=stage.grad_accumulation,
        train_batch_size=rows * stage.grad_accumulation * processes, gradient_clipping=stage.max_grad_norm,
        zero_allow_untested_optimizer=True, steps_per_print=2**62, wall_clock_breakdown=False)
    return config


def user_config(accelerator) -> dict | None:
    """The DeepSpeed config of an `accelerate launch --config_file` with a DeepSpeed config, if any."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else plugin.deepspeed_config


def wrap(loss_module: torch.nn.Module, student, optimizer, config: dict):
    """The DeepSpeed engine over `loss_module` (the stage's loss around the student): fresh `FastLayer`s, each with its
    layer's parameters registered as its own, in the module tree the engine partitions; `optimizer` (over the
    trainable parameters) becomes the engine's."""
    deepspeed = _deepspeed()
    from ling_surgery.surgery.kda import FastLayer, set_fast_layers

    layers = torch.nn.ModuleList(FastLayer(layer) for layer in student.model.layers)
    loss_module.fast_layers = layers
    engine, *_ = deepspeed.initialize(model=loss_module, optimizer=optimizer, config=config)
    for layer in layers:
        for param in layer.parameters():
            deepspeed.zero.register_external_parameter(layer, param)
    set_fast_layers(student, layers)
    return engine


def local_part(param, full: torch.Tensor) -> torch.Tensor:
    """This process's part of `full` (a tensor broadcastable to `param`'s whole shape) in ZeRO-3's partition layout:
    the flattened parameter, padded to a multiple of the processes, cut into equal consecutive parts."""
    import torch.distributed as dist

    size = param.ds_tensor.ds_numel
    flat = full.expand(param.ds_shape).reshape(-1)
    flat = torch.nn.functional.pad(flat, (0, size * dist.get_world_size() - flat.numel()))
    return flat.narrow(0, dist.get_rank() * size, size)


def _set_local(param, value: torch.Tensor) -> None:
    """Set this process's partition: the fp32 master the optimizer steps and the working copy forwards gather."""
    from deepspeed.utils import safe_set_local_fp32_param

    safe_set_local_fp32_param(param, value)
    param.ds_tensor.data.copy_(value.reshape(param.ds_tensor.shape))


def step(engine, row_rates: dict) -> None:
    """The engine's step after a micro-batch's backward. At an optimizer step the latent rows in their linear regime
    are handled as in `training.clip_gradients` and the stage loop: their gradients scaled by the row rates (laid out
    as the partitions, `training.like`) before the engine clips the global norm, their AdamW update scaled after."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_grad

    if not engine.is_gradient_accumulation_boundary() or not row_rates:
        engine.step()
        return
    for p, rate in row_rates.items():
        safe_set_local_grad(p, safe_get_local_grad(p) * rate)
    before = {p: safe_get_local_fp32_param(p).clone() for p in row_rates}
    engine.step()
    with torch.no_grad():
        for p, rate in row_rates.items():
            _set_local(p, before[p] + (safe_get_local_fp32_param(p) - before[p]) * rate)


MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state per element


def local_state(engine, trainable: dict) -> tuple[dict, dict]:
    """(this process's fp32 partition of every trainable parameter, its AdamW moments of them and the step count).
    DeepSpeed's optimizer steps flat groups of partitions (sub-groups swapped in at each step), so the state is read
    per parameter through its local-partition API."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    params = {n: safe_get_local_fp32_param(p).detach().clone() for n, p in trainable.items()}
    moments = {n: {k: safe_get_local_optimizer_state(p, k).detach().clone() for k in MOMENTS}
               for n, p in trainable.items()}
    step = next(iter(engine.optimizer.optimizer.state.values()))["step"].clone()
    return params, {"moments": moments, "step": step}


def load_local_state(engine, trainable: dict, params: dict, optimizer_state: dict) -> None:
    """Inverse of `local_state` on the same number of processes (before the engine's first step)."""
    from deepspeed.utils import safe_set_local_optimizer_state

    inner = engine.optimizer.optimizer
    for flat in engine.optimizer.fp32_partitioned_groups_flat:  # AdamW's state as its first step would create it
        inner.state[flat] = {"step": optimizer_state["step"].clone(), **{k: torch.zeros_like(flat) for k in MOMENTS}}
    with torch.no_grad():
        for n, p in trainable.items():
            _set_local(p, params[n])
            for k in MOMENTS:
                safe_set_local_optimizer_state(p, optimizer_state["moments"][n][k], k)


def unwrap(engine, trained: torch.nn.Module, student) -> None:
    """Every partitioned parameter gathered into a plain one in every process and the engine's hooks removed: the model
    is a plain one again (the stage returns it, the main process saves it, the next stage partitions it afresh)."""
    deepspeed = _deepspeed()
    from ling_surgery.surgery.kda import set_fast_layers

    set_fast_layers(student, None)
    owned, wholes = [], {}  # wholes by the partitioned parameter: a tied one stays one parameter
    for module in trained.modules():  # one module's parameters gathered at a time: at most the model whole, once
        params = [(name, p) for name, p in module.named_parameters(recurse=False) if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters([p for _, p in params if id(p) not in wholes]):
            for name, p in params:
                if id(p) not in wholes:
                    wholes[id(p)] = torch.nn.Parameter(p.data.clone(), requires_grad=p.requires_grad)
                owned.append((module, name, wholes[id(p)]))
    engine.destroy()
    for module, name, whole in owned:
        module._parameters[name] = whole

"""Distillation-based init: recover the new mixers from the frozen teacher.

Stage 1, attention transfer (LoLCATs §3.1; RADLADS step 1): every new mixer learns to reproduce its teacher
layer's attention output from the teacher's own input hidden states. One teacher pass per batch feeds all layers
at once; the loss is the per-layer MSE normalised by the teacher output's energy, averaged over layers.

Stage 2, end-to-end distillation (RADLADS step 2): KL(p_teacher ‖ p_student) on next-token distributions with
the teacher frozen, through the student's own (fast, exact) forward.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ling_surgery.surgery.context import RunContext
from ling_surgery.surgery.defaults import logit_distill_trainable
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.kda import document_index, mixer_forward, position_embeddings, student_logits
from ling_surgery.surgery.plan import KDA, MLA, mixer_types
from ling_surgery.surgery.progress import training_progress
from ling_surgery.surgery.synthetic import copy_rows, mix_copy_windows
from ling_surgery.surgery.taps import attention_taps

def _mixer_of(name: str, types: list[str], kind: str | None) -> bool:
    """Whether a parameter belongs to a token mixer (of one kind — KDA or MLA — when `kind` is given)."""
    match = re.match(r"model\.layers\.(\d+)\.self_attn\.", name)
    return match is not None and (kind is None or types[int(match.group(1))] == kind)


# Predicates on (parameter name, per-layer mixer kinds). The per-kind mixer groups let a stage train the KDA layers
# while the MLA layers keep what attention transfer gave them (or the reverse).
TRAINABLE_GROUPS = {
    "mixers": lambda n, types: _mixer_of(n, types, None),
    "kda_mixers": lambda n, types: _mixer_of(n, types, KDA),
    "mla_mixers": lambda n, types: _mixer_of(n, types, MLA),
    "mlp": lambda n, types: ".mlp." in n,
    "norms": lambda n, types: "layernorm" in n or n == "model.norm.weight",
    "embeddings": lambda n, types: n in ("model.embed_tokens.weight", "lm_head.weight"),
    "all": lambda n, types: True,
}


@dataclass
class StageResult:
    name: str
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    trainable_params: int = 0
    losses: list[float] = field(default_factory=list)

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


def clip_gradients(params, row_rates: dict, max_norm: float) -> None:
    """Clip the global gradient norm, with latent rows in their linear regime measured at their natural scale.

    Those rows are ~1e-5 of the map they carry (`latent_row_rates`), so their gradients are ~1e5 too large: left
    as they are they set the global norm alone, and clipping to it scaled every other gradient to ~nothing (KDA
    mixers trained beside such MLA layers moved 10-20x less in attention transfer). Their gradients are multiplied
    by the row rates first: AdamW's step does not depend on a constant per-element scale of the gradient, and the
    rates scale the step afterwards as before."""
    with torch.no_grad():
        for p, rate in row_rates.items():
            if p.grad is not None:
                p.grad.mul_(rate)
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def _optimizer(params, lr: float, warmup: int, total: int):
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def schedule(step):  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _autocast(ctx: RunContext):
    # bf16 autocast when the run asks for it (runtime.dtype, auto: CUDA only; most CPUs run bf16 far slower than fp32).
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16) if ctx.bf16_autocast else nullcontext()


def _run(student, stage, ctx: RunContext, loss_fn) -> StageResult:
    """The shared training loop: AdamW on the stage's trainable groups, in-stage checkpoints for --resume."""
    name = stage.name
    result = StageResult(name)
    tokens_per_step = stage.batch_size * ctx.seq_len
    steps = stage.tokens // tokens_per_step
    params = select_trainable(student, stage.trainable if stage.trainable is not None
                              else logit_distill_trainable(KDA in mixer_types(student.config))[0])
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    result.trainable_params = sum(p.numel() for p in params)
    optimizer, scheduler = _optimizer(params, stage.lr, stage.warmup_steps, steps)
    first = ctx.train.windows(ctx.seq_len)[ctx.window_start : ctx.window_start + 1].to(ctx.device)
    row_rates = {trainable[n]: r.to(ctx.device)[:, None] for n, r in latent_row_rates(student, first, ctx.chunk_size).items()
                 if n in trainable}
    done = 0
    saved = ctx.state.load(map_location=ctx.device) if ctx.state is not None else None
    if saved is not None:
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(saved["params"][n])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"].cpu())
        done, result.losses, result.seconds = saved["step"], saved["losses"], saved["seconds"]
        result.steps, result.tokens = done, done * tokens_per_step
        if ctx.console is not None:
            ctx.console.print(f"{name}: resuming at step {done}/{steps} from {ctx.state.path.name}")
    batches = ctx.train.batches(ctx.seq_len, stage.batch_size, start=ctx.window_start + done * stage.batch_size,
                                documents=ctx.separate_documents)
    student.train()
    start = time.perf_counter() - result.seconds
    with training_progress(name, steps * tokens_per_step, ctx.console, completed=done * tokens_per_step) as progress:
        for step in range(done, steps):
            input_ids, position_ids = next(batches)
            if stage.recall_mix:
                first_index = ctx.window_start + step * stage.batch_size
                input_ids = mix_copy_windows(input_ids, stage.recall_mix, ctx.train.tokens, first_index, ctx.train.joins)
                if position_ids is not None:  # a copy window is one document
                    position_ids[copy_rows(len(input_ids), stage.recall_mix, first_index)] = torch.arange(ctx.seq_len)
            input_ids = input_ids.to(ctx.device)
            position_ids = None if position_ids is None else position_ids.to(ctx.device)
            with _autocast(ctx):
                loss = loss_fn(input_ids, position_ids)
            if not torch.isfinite(loss):
                raise SurgeryError(f"stage {name}: loss became {loss.item()}; lower stages.{name}.lr")
            loss.backward()
            clip_gradients(params, row_rates, 1.0)
            before = {p: p.detach().clone() for p in row_rates}
            optimizer.step()
            with torch.no_grad():
                for p, rate in row_rates.items():
                    p.copy_(before[p] + (p - before[p]) * rate)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(loss.item())
            result.steps += 1
            result.tokens += tokens_per_step
            progress.advance(tokens_per_step, loss=result.losses[-1])
            if ctx.state is not None and ctx.save_every and (step + 1) % ctx.save_every == 0 and step + 1 < steps:
                ctx.state.save({
                    "step": step + 1,
                    "params": {n: p.detach().clone() for n, p in trainable.items()},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "losses": list(result.losses),
                    "seconds": time.perf_counter() - start,
                }, step + 1, steps)
    result.seconds = time.perf_counter() - start
    student.eval()
    student.requires_grad_(False)
    return result


def teacher_forward(teacher, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
    """The frozen teacher's forward on a training batch. Packed rows (`position_ids` restarting at every document)
    attend within their own documents: transformers derives that mask from the position ids when it is given neither
    a mask nor a cache (`masking_utils.find_packed_sequence_indices`), hence no cache here."""
    return teacher(input_ids=input_ids, position_ids=position_ids, use_cache=False)


def attention_transfer(student, stage, ctx: RunContext) -> tuple[torch.nn.Module, dict]:
    """Stage `kind: attention_transfer` (LoLCATs §3.1; RADLADS step 1): per-layer relative MSE of mixer outputs."""
    layers = student.model.layers

    def loss_fn(input_ids, position_ids):
        with torch.no_grad(), attention_taps(ctx.teacher, ctx.arch) as taps:
            teacher_forward(ctx.teacher, input_ids, position_ids)
        rope = position_embeddings(student, taps[0][0], position_ids=position_ids)
        documents = document_index(position_ids)
        losses = []
        for i, layer in enumerate(layers):
            x, y = taps[i]
            y = y.float()
            pred = mixer_forward(layer, x, rope, ctx.chunk_size, documents).float()
            losses.append(F.mse_loss(pred, y) / y.pow(2).mean().clamp_min(1e-8))
        return torch.stack(losses).mean()

    return student, _run(student, stage, ctx, loss_fn).summary()


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(softmax(t/τ) ‖ softmax(s/τ)) · τ² (Hinton et al. 2015)."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def logit_distill(student, stage, ctx: RunContext) -> tuple[torch.nn.Module, dict]:
    """Stage `kind: logit_distill` (RADLADS step 2): KL(teacher ‖ student) on next-token distributions."""

    def loss_fn(input_ids, position_ids):
        with torch.no_grad():
            teacher_logits = teacher_forward(ctx.teacher, input_ids, position_ids).logits
        logits = student_logits(student, input_ids, ctx.chunk_size, position_ids)
        return kl_divergence(teacher_logits, logits, stage.temperature)

    return student, _run(student, stage, ctx, loss_fn).summary()

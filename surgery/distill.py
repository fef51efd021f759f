"""Distillation-based init: recover the new mixers from the frozen teacher.

Stage 1, attention transfer (LoLCATs §3.1; RADLADS step 1): every new mixer learns to reproduce its teacher
layer's attention output from the teacher's own input hidden states. One teacher pass per batch feeds all layers
at once; the loss is the per-layer MSE normalised by the teacher output's energy, averaged over layers.

Stage 2, end-to-end distillation (RADLADS step 2): KL(p_teacher ‖ p_student) on next-token distributions with
the teacher frozen, through the student's own (fast, exact) forward.

Then continual pretraining (`kind: pretrain`): the same KL, plus next-token cross-entropy, on more text. All three
train through the shared loop of `training.py`; each supplies only its loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ling_surgery.surgery.context import RunContext
from ling_surgery.surgery.kda import document_index, fast_layers, position_embeddings, student_logits
from ling_surgery.surgery.taps import attention_taps
from ling_surgery.surgery.teacher_logits import topk_kl_divergence
from ling_surgery.surgery.training import mean_over_processes, train


def teacher_forward(teacher, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
    """The frozen teacher's forward on a training batch. Packed rows (`position_ids` restarting at every document)
    attend within their own documents: transformers derives that mask from the position ids when it is given neither
    a mask nor a cache (`masking_utils.find_packed_sequence_indices`), hence no cache here."""
    return teacher(input_ids=input_ids, position_ids=position_ids, use_cache=False)


def attention_transfer(student, stage, ctx: RunContext) -> tuple[torch.nn.Module, dict]:
    """Stage `kind: attention_transfer` (LoLCATs §3.1; RADLADS step 1): per-layer relative MSE of mixer outputs."""
    def loss_fn(input_ids, position_ids, window):
        with torch.no_grad(), attention_taps(ctx.teacher, ctx.arch) as taps:
            teacher_forward(ctx.teacher, input_ids, position_ids)
        layers = fast_layers(student)  # the engine's (sharded) modules, whose `mixer` gathers each layer's weights
        rope = position_embeddings(student, taps[0][0], position_ids=position_ids)
        documents = document_index(position_ids)
        # Each layer's error relative to its teacher output's energy over the global batch (all processes), so that
        # N data-parallel processes train as one.
        energy = mean_over_processes(torch.stack([taps[i][1].float().pow(2).mean() for i in range(len(layers))]))
        losses = []
        for i, layer in enumerate(layers):
            x, y = taps[i]
            y = y.float()
            if stage.activation_checkpointing:
                pred = torch.utils.checkpoint.checkpoint(layer.mixer, x, rope, ctx.chunk_size, documents,
                                                         use_reentrant=False).float()
            else:
                pred = layer.mixer(x, rope, ctx.chunk_size, documents).float()
            losses.append(F.mse_loss(pred, y) / energy[i].clamp_min(1e-8))
        return torch.stack(losses).mean()

    student, result = train(student, stage, ctx, loss_fn)
    return student, result.summary()


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(softmax(t/τ) ‖ softmax(s/τ)) · τ² (Hinton et al. 2015)."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def logit_distill(student, stage, ctx: RunContext) -> tuple[torch.nn.Module, dict]:
    """Stage `kind: logit_distill` (RADLADS step 2): KL(teacher ‖ student) on next-token distributions."""

    def loss_fn(input_ids, position_ids, window):
        with torch.no_grad():
            teacher_logits = teacher_forward(ctx.teacher, input_ids, position_ids).logits
        logits = student_logits(student, input_ids, ctx.chunk_size, position_ids, stage.activation_checkpointing)
        return kl_divergence(teacher_logits, logits, stage.temperature)

    student, result = train(student, stage, ctx, loss_fn)
    return student, result.summary()


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Mean next-token cross-entropy over the global batch's targets (all data-parallel processes); in packed rows a
    document's last token is not asked for the next document's first (the position that starts a document has
    position id 0)."""
    targets = input_ids[:, 1:].clone()
    if position_ids is not None:
        targets[position_ids[:, 1:] == 0] = -100
    total = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    # Per process: its sum over the mean count of targets per process, so the engine's average over processes is
    # the mean over every target of the global batch (processes hold different numbers of document starts).
    return total / mean_over_processes((targets != -100).sum().float())


def pretrain(student, stage, ctx: RunContext) -> tuple[torch.nn.Module, dict]:
    """Stage `kind: pretrain`: continual pretraining with the teacher in the loop, kl_weight · KL(teacher ‖ student)
    + ce_weight · next-token CE, on packed documents. With `teacher_topk: k` the KL reads the teacher's top-k computed
    once before the stage (`teacher_logits.py`), and on a GPU the teacher waits in host memory meanwhile. Reports
    held-out perplexity before and after the stage (on a quarter of the held-out windows), so its gain is in its
    manifest."""
    before = heldout_perplexity(student, ctx)
    stored = stored_teacher_topk(stage, ctx) if stage.teacher_topk and stage.kl_weight else None

    def loss_fn(input_ids, position_ids, window):
        logits = student_logits(student, input_ids, ctx.chunk_size, position_ids, stage.activation_checkpointing)
        loss = logits.new_zeros((), dtype=torch.float32)
        if stage.kl_weight and stored is not None:
            logprobs, indices = (t.to(logits.device) for t in stored.batch(window, len(input_ids)))
            loss = loss + stage.kl_weight * topk_kl_divergence(logprobs, indices, logits, stage.temperature)
        elif stage.kl_weight:
            with torch.no_grad():
                teacher_logits = teacher_forward(ctx.teacher, input_ids, position_ids).logits
            loss = loss + stage.kl_weight * kl_divergence(teacher_logits, logits, stage.temperature)
        if stage.ce_weight:
            loss = loss + stage.ce_weight * next_token_loss(logits, input_ids, position_ids)
        return loss

    teacher_device = next(ctx.teacher.parameters()).device
    if stored is not None and teacher_device.type != "cpu":
        ctx.teacher.to("cpu")  # its logits are on disk: the accelerator's memory is the student's
    try:
        student, result = train(student, stage, ctx, loss_fn)
    finally:
        ctx.teacher.to(teacher_device)
    metrics = result.summary()
    if stored is not None:
        metrics["teacher_topk"] = {"k": stored.k, "folder": str(stored.folder)}
    if before is not None:
        metrics["perplexity_before"], metrics["perplexity_after"] = before, heldout_perplexity(student, ctx)
        if ctx.console is not None:
            ctx.console.print(f"{stage.name}: held-out perplexity {before['perplexity']:.3f} → "
                              f"{metrics['perplexity_after']['perplexity']:.3f}")
    return student, metrics


def stored_teacher_topk(stage, ctx: RunContext):
    """The teacher's top-k for every micro-batch the stage trains on, from the run folder or computed now."""
    from itertools import islice

    from ling_surgery.surgery.teacher_logits import teacher_topk
    from ling_surgery.surgery.token_cache import cache_root
    from ling_surgery.surgery.training import autocast, optimizer_steps, stage_batches

    micro_batches = optimizer_steps(stage, ctx.seq_len) * stage.grad_accumulation
    root = (ctx.work_dir if ctx.work_dir is not None else cache_root()) / "teacher-logits"
    return teacher_topk(ctx.teacher, lambda: islice(stage_batches(stage, ctx, ctx.window_start), micro_batches),
                        stage.teacher_topk, stage.temperature, ctx.seq_len, ctx.window_start,
                        micro_batches * stage.batch_size, ctx.teacher_name, root, ctx.console, lambda: autocast(ctx),
                        "bf16 autocast" if ctx.bf16_autocast else "fp32")


def heldout_perplexity(model, ctx: RunContext) -> dict | None:
    """An upgraded model's perplexity on a quarter of the run's held-out windows (the full set is scored once, at the
    end of the run), or None when the run holds none out."""
    if ctx.eval_windows is None:
        return None
    from ling_surgery.evals.perplexity import perplexity

    quarter = ctx.eval_windows[: max(1, len(ctx.eval_windows) // 4)]
    return perplexity(lambda ids: student_logits(model, ids, ctx.chunk_size), quarter, device=ctx.device)

"""The shared training loop: schedules, gradient accumulation, activation checkpointing and exact resume."""

import math

import pytest
import torch
from helpers import dies_after_saving
from test_distill import _documents_setup

from ling_surgery.surgery.checkpoint import TrainingState
from ling_surgery.surgery.config import AttentionTransferStage, LogitDistillStage
from ling_surgery.surgery.distill import attention_transfer, logit_distill
from ling_surgery.surgery.training import lr_factor


def test_schedules_warm_up_then_follow_their_shape():
    cosine = LogitDistillStage(tokens=1, lr=1.0, warmup_steps=5)
    assert [lr_factor(s, 100, cosine) for s in range(5)] == [(s + 1) / 6 for s in range(5)]
    assert lr_factor(5, 100, cosine) == 1.0 and lr_factor(100, 100, cosine) == pytest.approx(0.1)
    assert lr_factor(52, 100, cosine) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 47 / 95)))
    wsd = LogitDistillStage(tokens=1, lr=1.0, warmup_steps=2, schedule="wsd", decay_fraction=0.25, min_lr_ratio=0.0)
    factors = [lr_factor(s, 20, wsd) for s in range(20)]
    assert factors[2:15] == [1.0] * 13  # stable until the last quarter of the steps
    assert factors[15:] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])  # then linearly to min_lr_ratio
    constant = LogitDistillStage(tokens=1, lr=1.0, warmup_steps=0, schedule="constant")
    assert {lr_factor(s, 20, constant) for s in range(20)} == {1.0}


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_gradient_accumulation_takes_the_same_steps_as_a_larger_batch():
    """Two micro-batches of one window per step train as one batch of two (same windows, same copy windows)."""
    common = dict(tokens=6 * 64, lr=3e-3, trainable=["all"], recall_mix=0.5)
    _, whole, ctx = _documents_setup(True)
    _, big = logit_distill(whole, LogitDistillStage(batch_size=2, **common), ctx)
    _, accumulated, ctx = _documents_setup(True)
    _, small = logit_distill(accumulated, LogitDistillStage(batch_size=1, grad_accumulation=2, **common), ctx)
    assert small["steps"] == big["steps"] == 6
    assert small["losses"] == pytest.approx(big["losses"], rel=1e-5)
    for (name, a), b in zip(whole.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("stage_fn, stage", [
    (attention_transfer, AttentionTransferStage(tokens=3 * 64, batch_size=2, lr=3e-3)),
    (logit_distill, LogitDistillStage(tokens=3 * 64, batch_size=2, lr=3e-3, trainable=["all"])),
])
def test_activation_checkpointing_trains_the_same_weights(stage_fn, stage):
    _, plain, ctx = _documents_setup(True)
    stage_fn(plain, stage, ctx)
    _, recomputed, ctx = _documents_setup(True)
    stage_fn(recomputed, stage.model_copy(update={"activation_checkpointing": True}), ctx)
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_a_resumed_stage_with_accumulation_and_wsd_ends_bit_equal(tmp_path):
    """Killed right after the step-4 save of a 6-step stage (12 micro-batches): resumed, weights, losses and data
    position are those of the unbroken run."""
    stage = LogitDistillStage(tokens=6 * 64, batch_size=1, grad_accumulation=2, lr=3e-3, trainable=["all"],
                              recall_mix=0.5, schedule="wsd", warmup_steps=1)
    _, unbroken, ctx = _documents_setup(True)
    _, full = logit_distill(unbroken, stage, ctx)

    state = dies_after_saving(TrainingState(tmp_path / "state.pt", "fp"), step=4)
    _, broken, ctx = _documents_setup(True)
    ctx.state, ctx.save_every = state, 2
    with pytest.raises(KeyboardInterrupt):
        logit_distill(broken, stage, ctx)
    assert state.peek()["step"] == 4 and state.load()["next_window"] == 8

    _, resumed, ctx = _documents_setup(True)
    ctx.state, ctx.save_every = TrainingState(tmp_path / "state.pt", "fp"), 2
    _, result = logit_distill(resumed, stage, ctx)
    assert result["losses"] == full["losses"]
    for (name, a), b in zip(unbroken.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name

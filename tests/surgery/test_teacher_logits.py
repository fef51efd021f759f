"""The teacher's top-k on disk: the coarse-grained KL against the full one, the stored rows against the teacher on
the very batches trained (copy windows included), reuse, checks, and a stage trained from disk against the live
teacher."""

from itertools import islice

import numpy as np
import pytest
import torch
from helpers import dies_after_saving
from pydantic import ValidationError
from test_distill import _documents_setup

from ling_surgery.surgery.checkpoint import TrainingState
from ling_surgery.surgery.config import PretrainStage
from ling_surgery.surgery.distill import kl_divergence, pretrain, stored_teacher_topk, teacher_forward
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.teacher_logits import open_topk, topk_kl_divergence
from ling_surgery.surgery.training import stage_batches


def _topk(logits, k, temperature=1.0):
    top = torch.topk(torch.log_softmax(logits / temperature, -1), k, -1)
    return top.values, top.indices


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_coarse_grained_kl_is_the_full_kl_at_full_k_and_below_it_otherwise(temperature):
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(3, 7, 50, generator=g) * 3, torch.randn(3, 7, 50, generator=g) * 3
    full = kl_divergence(teacher, student, temperature)
    torch.testing.assert_close(topk_kl_divergence(*_topk(teacher, 50, temperature), student, temperature), full)
    partial = [topk_kl_divergence(*_topk(teacher, k, temperature), student, temperature) for k in (1, 5, 20, 49)]
    assert all(0 <= p <= full + 1e-6 for p in partial)  # data-processing inequality
    assert partial[0] <= partial[-1]
    same = topk_kl_divergence(*_topk(teacher, 5, temperature), teacher.clone(), temperature)
    assert same.abs() < 1e-6  # the teacher against itself: nothing to learn


def test_the_coarse_grained_kl_has_finite_gradients_when_the_student_puts_all_mass_on_the_top_k():
    teacher = torch.tensor([[[10.0, 9.0, -30.0, -30.0]]])
    student = torch.tensor([[[40.0, 39.0, -40.0, -40.0]]], requires_grad=True)
    loss = topk_kl_divergence(*_topk(teacher, 2), student)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def _stage(**fields):
    return PretrainStage(**{"tokens": 4 * 64, "batch_size": 1, "grad_accumulation": 2, "lr": 3e-3, "trainable": ["all"],
                            "recall_mix": 0.5, "teacher_topk": 8, **fields})


def test_the_stored_rows_are_the_teachers_top_k_on_the_batches_trained(tmp_path):
    teacher, _, ctx = _documents_setup(True)
    ctx.work_dir, ctx.window_start = tmp_path, 3
    stage = _stage(temperature=2.0)
    stored = stored_teacher_topk(stage, ctx)
    assert stored.k == 8 and stored.first_window == 3 and len(stored.logprobs) == 8 * 32
    batches = list(islice(stage_batches(stage, ctx, 3), 8))  # the stage's 4 steps × 2 micro-batches
    assert any(not torch.equal(ids, ctx.train.windows(32)[w : w + 1]) for w, ids, _ in batches)  # copy windows in
    for window, ids, positions in batches:
        logits = teacher_forward(teacher, ids, positions).logits
        values, indices = _topk(logits, 8, 2.0)
        got_values, got_indices = stored.batch(window, 1)
        torch.testing.assert_close(got_values, values, atol=1e-6, rtol=1e-6)
        assert torch.equal(got_indices, indices)
    with pytest.raises(SurgeryError, match="hold no windows 11–11"):
        stored.batch(11, 1)


def test_stored_top_k_is_read_again_not_recomputed_and_a_changed_setting_or_damage_computes_again(tmp_path):
    teacher, _, ctx = _documents_setup(True)
    ctx.work_dir = tmp_path
    first = stored_teacher_topk(_stage(), ctx)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    again = stored_teacher_topk(_stage(), ctx)
    assert calls == [] and again.folder == first.folder
    np.testing.assert_array_equal(again.logprobs, first.logprobs)
    assert stored_teacher_topk(_stage(teacher_topk=4), ctx).folder != first.folder and calls
    assert stored_teacher_topk(_stage(recall_mix=0.0), ctx).folder != first.folder  # other batches, other key
    expect = np.array(first.indices)
    (first.folder / "indices.i32").write_bytes((first.folder / "indices.i32").read_bytes()[:-4])
    assert open_topk(first.folder) is None
    calls.clear()
    rebuilt = stored_teacher_topk(_stage(), ctx)
    assert calls and rebuilt.folder == first.folder
    np.testing.assert_array_equal(rebuilt.indices, expect)
    assert sorted(p.name for p in tmp_path.joinpath("teacher-logits").iterdir() if "partial" in p.name) == []


def test_top_k_computed_under_bf16_autocast_is_not_reused_by_an_fp32_stage(tmp_path):
    _, _, ctx = _documents_setup(True)
    ctx.work_dir = tmp_path
    fp32 = stored_teacher_topk(_stage(), ctx)
    ctx.bf16_autocast = True
    bf16 = stored_teacher_topk(_stage(), ctx)
    assert bf16.folder != fp32.folder
    assert not np.array_equal(np.array(bf16.logprobs), np.array(fp32.logprobs))  # the numbers differ, too


def test_training_from_the_stored_top_k_at_full_k_matches_the_live_teacher(tmp_path):
    live_stage = _stage(teacher_topk=0)
    _, live, ctx = _documents_setup(True)
    _, live_result = pretrain(live, live_stage, ctx)
    _, stored, ctx = _documents_setup(True)
    ctx.work_dir = tmp_path
    _, stored_result = pretrain(stored, _stage(teacher_topk=10_000), ctx)  # k above the vocabulary: all of it
    assert stored_result["teacher_topk"]["k"] == stored.config.vocab_size
    np.testing.assert_allclose(stored_result["losses"], live_result["losses"], rtol=1e-3)  # losses kept to 4 digits
    for (name, a), b in zip(live.named_parameters(), stored.parameters()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)


def test_a_resumed_stage_reads_the_stored_top_k_and_ends_bit_equal(tmp_path):
    stage = _stage(tokens=6 * 64)
    _, unbroken, ctx = _documents_setup(True)
    ctx.work_dir = tmp_path
    _, full = pretrain(unbroken, stage, ctx)

    state = dies_after_saving(TrainingState(tmp_path / "state.pt", "fp"), step=2)
    teacher, broken, ctx = _documents_setup(True)
    ctx.work_dir, ctx.state, ctx.save_every = tmp_path, state, 2
    with pytest.raises(KeyboardInterrupt):
        pretrain(broken, stage, ctx)
    teacher, resumed, ctx = _documents_setup(True)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    ctx.work_dir, ctx.state, ctx.save_every = tmp_path, TrainingState(tmp_path / "state.pt", "fp"), 2
    _, result = pretrain(resumed, stage, ctx)
    assert calls == [] and result["losses"] == full["losses"]
    for (name, a), b in zip(unbroken.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_a_write_that_fails_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    _, _, ctx = _documents_setup(True)
    ctx.work_dir = tmp_path

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "memmap", disk_full)
    with pytest.raises(SurgeryError, match=r"cannot write the teacher's top-8 to .*No space left on device; free space "
                                           r"there, or set teacher_topk: 0"):
        stored_teacher_topk(_stage(), ctx)
    assert list((tmp_path / "teacher-logits").iterdir()) == []


def test_top_k_without_a_kl_term_is_refused():
    with pytest.raises(ValidationError, match="teacher_topk 8 stores the teacher's logits for the KL term, but kl_weight "
                                              "is 0"):
        PretrainStage(teacher_topk=8, kl_weight=0, ce_weight=1)

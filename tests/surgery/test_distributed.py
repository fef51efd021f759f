"""Data parallelism through accelerate: two CPU processes (gloo) with the same global batch end in the weights of one
process, for every stage kind that trains with the shared loop."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ling_surgery.surgery.checkpoint import TrainingState
from ling_surgery.surgery.config import AttentionTransferStage, LogitDistillStage, PretrainStage
from ling_surgery.surgery.distill import attention_transfer, logit_distill, pretrain

STAGES = {
    "attention_transfer": (attention_transfer, AttentionTransferStage(tokens=4 * 64, batch_size=2, grad_accumulation=1,
                                                                      lr=1e-3, recall_mix=0.5)),
    "logit_distill": (logit_distill, LogitDistillStage(tokens=4 * 128, batch_size=2, grad_accumulation=2, lr=1e-3,
                                                       trainable=["all"], recall_mix=0.5, schedule="wsd")),
    "pretrain_topk": (pretrain, PretrainStage(tokens=4 * 128, batch_size=4, grad_accumulation=1, lr=1e-3,
                                              trainable=["all"], teacher_topk=16)),
    # Cross-entropy over targets the processes hold unequal numbers of (document starts are masked).
    "pretrain_ce": (pretrain, PretrainStage(tokens=4 * 128, batch_size=4, grad_accumulation=1, lr=1e-3,
                                            trainable=["all"], kl_weight=0.5, ce_weight=1.0, recall_mix=0.0)),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(kind: str, work_dir, save_every: int = 0):
    from test_distill import _documents_setup

    stage_fn, stage = STAGES[kind]
    _, student, ctx = _documents_setup(True)
    ctx.work_dir = work_dir
    if save_every:
        ctx.state, ctx.save_every = TrainingState(work_dir / "state.pt", "fp"), save_every
    student, result = stage_fn(student, stage, ctx)
    return {n: p.detach().clone() for n, p in student.named_parameters()}, result


def _worker(rank: int, world: int, port: int, kind: str, work_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    weights, result = _train(kind, work_dir, save_every=2)
    torch.save({"weights": weights, "losses": result["losses"]}, out / f"rank{rank}.pt")


@pytest.mark.parametrize("kind", list(STAGES))
def test_two_processes_end_in_the_weights_of_one(kind, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    weights, result = _train(kind, tmp_path / "one")
    mp.spawn(_worker, args=(2, _free_port(), kind, tmp_path / "two", tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, expected in weights.items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name  # replicas stay equal
        torch.testing.assert_close(ranks[0]["weights"][name], expected, atol=2e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(result["losses"]), atol=1e-5, rtol=1e-4)
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the logged loss is the global batch's

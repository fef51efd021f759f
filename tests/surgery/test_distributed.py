"""Data parallelism through accelerate: two CPU processes (gloo) with the same global batch end in the weights of one
process, for every stage kind that trains with the shared loop, replicated (DDP) and sharded (FSDP2); a sharded stage
killed after an in-stage checkpoint resumes from its shards to the weights of an unbroken one."""

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


def _train(kind: str, work_dir, save_every: int = 0, engine: str = "ddp", stop_after: int | None = None):
    from test_distill import _documents_setup

    stage_fn, stage = STAGES[kind]
    _, student, ctx = _documents_setup(True)
    ctx.work_dir, ctx.engine = work_dir, engine.removesuffix("+teacher")
    ctx.shard_teacher = engine.endswith("+teacher")  # runtime.teacher: sharded
    if save_every:
        ctx.state, ctx.save_every = TrainingState(work_dir / "state.pt", "fp"), save_every
    if stop_after is not None:  # every process stops right after its shard of that step's checkpoint, as a kill would
        save = ctx.state.save_shard

        def save_then_stop(state, step, *args):
            save(state, step, *args)
            if step == stop_after:
                raise KeyboardInterrupt

        ctx.state.save_shard = save_then_stop
    student, result = stage_fn(student, stage, ctx)
    return {n: p.detach().clone() for n, p in student.named_parameters()}, result


def _worker(rank: int, world: int, port: int, kind: str, work_dir, out, engine="ddp", stop_after=None, tag=""):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        weights, result = _train(kind, work_dir, save_every=2, engine=engine, stop_after=stop_after)
    except KeyboardInterrupt:
        return
    torch.save({"weights": weights, "losses": result["losses"]}, out / f"rank{rank}{tag}.pt")


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp2+teacher"])
@pytest.mark.parametrize("kind", list(STAGES))
def test_two_processes_end_in_the_weights_of_one(kind, engine, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    weights, result = _train(kind, tmp_path / "one")
    mp.spawn(_worker, args=(2, _free_port(), kind, tmp_path / "two", tmp_path, engine), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, expected in weights.items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name  # replicas stay equal
        torch.testing.assert_close(ranks[0]["weights"][name], expected, atol=2e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(result["losses"]), atol=1e-5, rtol=1e-4)
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the logged loss is the global batch's


def test_a_sharded_stage_resumes_from_its_shards(tmp_path):
    """FSDP2: every process writes its shard of each in-stage checkpoint; stopped after step 2's, the stage resumes
    from the shards on the same number of processes and ends in the weights of an unbroken sharded run."""
    kind = "logit_distill"
    for name in ("unbroken", "broken"):
        (tmp_path / name).mkdir()
    mp.spawn(_worker, args=(2, _free_port(), kind, tmp_path / "unbroken", tmp_path, "fsdp2", None, "-unbroken"),
             nprocs=2, join=True)
    mp.spawn(_worker, args=(2, _free_port(), kind, tmp_path / "broken", tmp_path, "fsdp2", 2), nprocs=2, join=True)
    shards = sorted(p.name for p in (tmp_path / "broken").glob("state.pt.step*"))
    assert shards == ["state.pt.step2.shard0-of-2", "state.pt.step2.shard1-of-2"]
    mp.spawn(_worker, args=(2, _free_port(), kind, tmp_path / "broken", tmp_path, "fsdp2", None, "-resumed"),
             nprocs=2, join=True)
    unbroken, resumed = (torch.load(tmp_path / f"rank0-{tag}.pt") for tag in ("unbroken", "resumed"))
    for name, expected in unbroken["weights"].items():
        assert torch.equal(resumed["weights"][name], expected), name
    assert resumed["losses"] == unbroken["losses"]
    # a sharded state is refused by a replicated resume, with the way out
    from ling_surgery.surgery.errors import SurgeryError

    with pytest.raises(SurgeryError, match="sharded over 2 processes"):
        TrainingState(tmp_path / "broken" / "state.pt", "fp").load()


def _nan_worker(rank: int, world: int, port: int, out):
    """Rank 1's teacher gives NaN logits: its loss is NaN, rank 0's is not."""
    from test_distill import _documents_setup

    from ling_surgery.surgery.errors import SurgeryError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    stage_fn, stage = STAGES["logit_distill"]
    teacher, student, ctx = _documents_setup(True)
    if rank == 1:
        with torch.no_grad():
            teacher.lm_head.weight.fill_(float("nan"))
    try:
        stage_fn(student, stage, ctx)
    except SurgeryError as err:
        (out / f"error{rank}.txt").write_text(str(err))


def test_a_nan_loss_in_one_process_stops_every_process_with_one_message(tmp_path):
    mp.spawn(_nan_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    errors = [(tmp_path / f"error{rank}.txt").read_text() for rank in range(2)]
    assert errors[0] == errors[1]  # the same line in both: the main process prints it
    assert "loss became nan at step 0 in process 1 of 2" in errors[0] and "lower stages.logit_distill.lr" in errors[0]

"""Data parallelism through accelerate: two CPU processes (gloo) with the same global batch end in the weights of one
process, for every stage kind that trains with the shared loop, replicated (DDP) and sharded (FSDP2); a sharded stage
killed after an in-stage checkpoint resumes from its shards to the weights of an unbroken one."""

import math
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


def as_process(rank: int, world: int, port: int) -> None:
    """This spawned process as process `rank` of `world`, as a launcher's environment says it (one thread each)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def _train(kind: str, work_dir, save_every: int = 0, engine: str = "ddp", stop_after: int | None = None,
           bf16: bool = False, tied: bool = False):
    from test_distill import _documents_setup

    stage_fn, stage = STAGES[kind]
    _, student, ctx = _documents_setup(True)
    if tied:  # the LM head is the embedding matrix (SmolLM2, Qwen3 small models)
        student.lm_head.weight = student.model.embed_tokens.weight
    ctx.bf16_autocast = bf16  # the path every CUDA run takes
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
    result["tied"] = student.lm_head.weight is student.model.embed_tokens.weight
    return {n: p.detach().clone() for n, p in student.named_parameters()}, result


def _worker(rank: int, world: int, port: int, kind: str, work_dir, out, engine="ddp", stop_after=None, tag="",
            bf16=False, tied=False):
    as_process(rank, world, port)
    try:
        weights, result = _train(kind, work_dir, save_every=2, engine=engine, stop_after=stop_after, bf16=bf16,
                                 tied=tied)
    except KeyboardInterrupt:
        return
    torch.save({"weights": weights, "losses": result["losses"], "tied": result["tied"]}, out / f"rank{rank}{tag}.pt")


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp2+teacher", "zero3", "zero3+teacher"])
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


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_tied_embeddings_stay_one_parameter(engine, tmp_path):
    """A student whose LM head is its embedding matrix leaves a sharded stage with them still one parameter (the
    engines gather each parameter once), trained as one process trains it."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    weights, result = _train("pretrain_ce", tmp_path / "one", tied=True)
    assert result["tied"]
    mp.spawn(_worker, args=(2, _free_port(), "pretrain_ce", tmp_path / "two", tmp_path, engine, None, "", False, True),
             nprocs=2, join=True)
    two = torch.load(tmp_path / "rank0.pt")
    assert two["tied"]
    for name, expected in weights.items():
        torch.testing.assert_close(two["weights"][name], expected, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_sharded_engines_train_under_bf16_autocast(engine, tmp_path):
    """Under CPU bf16 autocast (what a CUDA run does: fp32 weights and AdamW state, bf16 matmuls, the KDA kernel in
    fp32) two sharded processes train as one process does, to bf16's precision."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    weights, result = _train("attention_transfer", tmp_path / "one", bf16=True)
    mp.spawn(_worker, args=(2, _free_port(), "attention_transfer", tmp_path / "two", tmp_path, engine, None, "", True),
             nprocs=2, join=True)
    two = torch.load(tmp_path / "rank0.pt")
    assert all(math.isfinite(loss) for loss in two["losses"])
    # measured: losses within 1.5e-4 relative, weights within 2e-4
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(result["losses"]), atol=0, rtol=2e-3)
    for name, expected in weights.items():
        torch.testing.assert_close(two["weights"][name], expected, atol=1e-3, rtol=0, msg=name)
    (tmp_path / "fp32").mkdir()
    assert _train("attention_transfer", tmp_path / "fp32")[1]["losses"] != result["losses"]  # autocast took effect


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_a_sharded_stage_resumes_from_its_shards(engine, tmp_path):
    """FSDP2 and ZeRO-3: every process writes its shard of each in-stage checkpoint (weights and AdamW moments of its
    partitions); stopped after step 2's, the stage resumes from the shards on the same number of processes and ends in
    the weights of an unbroken sharded run."""
    kind = "logit_distill"
    for name in ("unbroken", "broken"):
        (tmp_path / name).mkdir()
    mp.spawn(_worker, args=(2, _free_port(), kind, tmp_path / "unbroken", tmp_path, engine, None, "-unbroken"),
             nprocs=2, join=True)
    mp.spawn(_worker, args=(2, _free_port(), kind, tmp_path / "broken", tmp_path, engine, 2), nprocs=2, join=True)
    shards = sorted(p.name for p in (tmp_path / "broken").glob("state.pt.step*"))
    assert shards == ["state.pt.step2.shard0-of-2", "state.pt.step2.shard1-of-2"]
    mp.spawn(_worker, args=(2, _free_port(), kind, tmp_path / "broken", tmp_path, engine, None, "-resumed"),
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

    as_process(rank, world, port)
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


def _train_moe(work_dir, engine: str):
    """A tiny Qwen3-MoE student's logit distillation with the routers and their selection biases training."""
    from test_moe import biases, moe_setup

    student, ctx = moe_setup("qwen3_moe")
    ctx.work_dir, ctx.engine = work_dir, engine
    stage = LogitDistillStage(tokens=4 * 128, batch_size=2, grad_accumulation=2, lr=1e-3, trainable=["all"],
                              router_bias_rate=1e-2)
    student, result = logit_distill(student, stage, ctx)
    weights = {n: p.detach().clone() for n, p in student.named_parameters()}
    return weights, biases(student), result


def _moe_worker(rank: int, world: int, port: int, work_dir, out, engine):
    as_process(rank, world, port)
    weights, bias, result = _train_moe(work_dir, engine)
    torch.save({"weights": weights, "biases": bias, "load": result["expert_load"]}, out / f"moe{rank}.pt")


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero3"])
def test_moe_students_balance_alike_over_two_processes(engine, tmp_path):
    """Expert counts are summed over the processes before each selection-bias update: two processes move every bias
    as one process does, and report the same load."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    weights, bias, result = _train_moe(tmp_path / "one", "ddp")
    mp.spawn(_moe_worker, args=(2, _free_port(), tmp_path / "two", tmp_path, engine), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"moe{r}.pt") for r in range(2)]
    for name, expected in bias.items():
        assert torch.equal(ranks[0]["biases"][name], ranks[1]["biases"][name]), name
        assert torch.equal(ranks[0]["biases"][name], expected), name
    assert ranks[0]["load"] == ranks[1]["load"] == result["expert_load"]
    for name, expected in weights.items():
        torch.testing.assert_close(ranks[0]["weights"][name], expected, atol=2e-5, rtol=1e-4, msg=name)

"""In-stage training states: sharded states are written atomically and fail as one line from the process that failed."""

import pytest

from ling_surgery.surgery.errors import SurgeryError


def test_a_shard_that_cannot_be_written_is_one_line_from_that_process(tmp_path, monkeypatch):
    """Disk full while one process writes its shard: its error names the file and the disk, is marked as that process's
    own (the others wait at the barrier: it must say it), the previous complete state stays and no temporary is left."""
    import torch

    from ling_surgery.cli.app import error_line
    from ling_surgery.surgery.checkpoint import TrainingState

    state = TrainingState(tmp_path / "state.pt", "fp")
    state.save_shard({"params": {"w": torch.ones(2)}}, 2, 8, 0, 1, lambda: None)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SurgeryError, match="the disk is full") as err:
        state.save_shard({"params": {"w": torch.zeros(2)}}, 4, 8, 0, 1, lambda: None)
    monkeypatch.undo()
    assert err.value.process_local
    assert error_line(err.value, 1, 2).startswith("process 1 of 2: saving the training state")
    assert error_line(SurgeryError("bad input"), 1, 2) is None and error_line(SurgeryError("bad input"), 0, 2) == "bad input"
    assert state.peek()["step"] == 2 and torch.equal(state.load_shard(0, 1)["params"]["w"], torch.ones(2))
    assert not list(tmp_path.glob("*.tmp"))


def _recipe(text, chat=None, **runtime):
    from helpers import tiny_recipe

    stages = [{"kind": "init"}, {"kind": "attention_transfer"}, {"kind": "logit_distill"}]
    if chat is not None:
        stages.append({"kind": "sft", "data": [{"source": str(chat), "examples": 2}]})
    return tiny_recipe(data={"train": str(text)}, stages=stages, runtime=runtime)


def test_fingerprints_follow_the_contents_of_the_files_a_run_reads(tmp_path):
    """Same path, other text: every stage reruns; the same text written again (a new modification time) reruns
    nothing; another SFT conversation file reruns only the SFT stage."""
    import os

    from ling_surgery.surgery.checkpoint import stage_fingerprints

    text, chat = tmp_path / "text.txt", tmp_path / "chat.jsonl"
    text.write_text("the model reads text and learns.\n")
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    first = stage_fingerprints(_recipe(text, chat))
    text.write_text("the model reads text and learns.\n")
    os.utime(text, ns=(1, 1))  # rewritten unchanged: reread once, same hash
    assert stage_fingerprints(_recipe(text, chat)) == first
    text.write_text("the model reads other text.\n")
    changed = stage_fingerprints(_recipe(text, chat))
    assert all(a != b for a, b in zip(changed, first))
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}\n')
    rechatted = stage_fingerprints(_recipe(text, chat))
    assert rechatted[:3] == changed[:3] and rechatted[3] != changed[3]


def test_fingerprints_follow_numerics_not_how_the_run_is_run(tmp_path):
    """Compute dtype reruns (bf16 vs fp32; auto is fp32 on CPU); threads, save cadence, chunk size and engine do not."""
    import torch

    from ling_surgery.surgery.checkpoint import stage_fingerprints

    text = tmp_path / "text.txt"
    text.write_text("the model reads text and learns.\n")
    base = stage_fingerprints(_recipe(text, dtype="float32", device="cpu"))
    if not torch.cuda.is_available():
        assert stage_fingerprints(_recipe(text)) == base  # auto, auto resolve to CPU fp32 here
    assert stage_fingerprints(_recipe(text, dtype="bfloat16", device="cpu")) != base
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert stage_fingerprints(_recipe(text, dtype="float32", device="cpu", save_every=7, kda_chunk_size=16,
                                          engine="fsdp2")) == base
    finally:
        torch.set_num_threads(threads)


def test_a_sharded_state_resumed_under_another_engine_is_one_line(tmp_path):
    """FSDP2's and ZeRO-3's shards are laid out differently: a state written by one is refused by the other, naming
    the engine to resume with (it was a KeyError traceback)."""
    import torch

    from ling_surgery.surgery.checkpoint import TrainingState

    state = TrainingState(tmp_path / "state.pt", "fp")
    state.save_shard({"params": {"w": torch.ones(2)}}, 2, 8, 0, 1, lambda: None, "fsdp2")
    with pytest.raises(SurgeryError, match=r"was written by runtime.engine fsdp2, this run trains with zero3; resume "
                                           r"with --set runtime.engine=fsdp2, or rerun the stage with --from"):
        state.load_shard(0, 1, "zero3")
    assert torch.equal(state.load_shard(0, 1, "fsdp2")["params"]["w"], torch.ones(2))

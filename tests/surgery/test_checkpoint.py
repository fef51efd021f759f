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

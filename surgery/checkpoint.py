"""Recipe fingerprints and in-stage training state, so `run` can skip finished stages and `--resume` a broken one.

A stage's fingerprint hashes what it computes: the source, target, plan, data and seed, every stage up to and
including it, but not `runtime` (device, dtype, kernels, save cadence) or `eval`/`export`. A finished stage is
skipped when the fingerprint in its manifest matches; an interrupted one continues from its training state when
the fingerprint stored there matches.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ling_surgery.surgery.errors import SurgeryError


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_fingerprints(recipe) -> list[str]:
    parent = fingerprint(recipe.model_dump(include={"source", "target", "plan", "data", "seed"}))
    out = []
    for stage in recipe.stages:
        # Unset optional fields (None) are left out, so a field added later keeps older runs' fingerprints.
        parent = fingerprint({"parent": parent, "stage": stage.model_dump(exclude_none=True)})
        out.append(parent)
    return out


def export_fingerprint(recipe) -> str:
    """What the final model folder and report depend on: every stage, the evaluation and the export settings."""
    return fingerprint({"parent": stage_fingerprints(recipe)[-1], "eval": recipe.eval.model_dump(),
                        "export": recipe.export.model_dump(exclude={"output"})})


def _write_failed(tmp: Path, path: Path, err: OSError) -> SurgeryError:
    """The one-line error of a training state that could not be written; its temporary file is removed."""
    tmp.unlink(missing_ok=True)
    reason = "the disk is full" if err.errno == 28 else (err.strerror or str(err))
    return SurgeryError(f"saving the training state to {str(path)!r} failed: {reason}")


class TrainingState:
    """The in-stage checkpoint of one training stage: trainable weights, optimizer, scheduler, RNG and data position.

    Saved with `torch.save` into a temporary file renamed over the previous one, so a kill at any moment leaves
    either the previous state or the new one.
    """

    def __init__(self, path: Path, stage_fingerprint: str):
        self.path = Path(path)
        self.fingerprint = stage_fingerprint

    def peek(self) -> dict | None:
        """{'step', 'steps', 'fingerprint'} of a saved state, without loading tensors; None if there is none."""
        meta = self.path.with_suffix(".json")
        try:
            return json.loads(meta.read_text())
        except (OSError, ValueError):
            return None

    def matches(self) -> bool:
        info = self.peek()
        if info is None or info.get("fingerprint") != self.fingerprint:
            return False
        if "shards" in info:
            return all(self.shard_path(rank, info["shards"], info["step"]).is_file() for rank in range(info["shards"]))
        return self.path.is_file()

    def shard_path(self, rank: int, shards: int, step: int) -> Path:
        return self.path.with_name(f"{self.path.name}.step{step}.shard{rank}-of-{shards}")

    def save_shard(self, state: dict, step: int, steps: int, rank: int, shards: int, barrier) -> None:
        """A sharded engine's state: every process writes its shard for this step (atomically), all wait, then the
        first process names the step in the state's meta file — the moment the new state counts — and each process
        removes its older shards. A kill at any point leaves the previous complete state or the new one."""
        import torch

        path = self.shard_path(rank, shards, step)
        tmp = path.with_name(path.name + ".tmp")
        try:
            torch.save({**state, "fingerprint": self.fingerprint}, tmp)
            os.replace(tmp, path)
        except OSError as err:
            failure = _write_failed(tmp, path, err)
            failure.process_local = True  # the others wait at the barrier below: this process must say it
            raise failure from None
        barrier()
        if rank == 0:
            meta = self.path.with_suffix(".json")
            meta_tmp = meta.with_name(meta.name + ".tmp")
            meta_tmp.write_text(json.dumps({"step": step, "steps": steps, "fingerprint": self.fingerprint,
                                            "shards": shards}))
            os.replace(meta_tmp, meta)
        barrier()
        for old in self.path.parent.glob(f"{self.path.name}.step*.shard{rank}-of-{shards}"):
            if old != path:
                old.unlink(missing_ok=True)

    def load_shard(self, rank: int, shards: int) -> dict | None:
        """This process's shard of a sharded state; None when there is none that matches."""
        import torch

        if not self.matches():
            return None
        info = self.peek()
        if info.get("shards") != shards:
            saved = f"{info['shards']} processes" if "shards" in info else "one replica (runtime.engine ddp)"
            raise SurgeryError(f"the saved training state {str(self.path)!r} holds {saved}; resume on "
                               f"{info.get('shards', 'any number of')} processes with the engine that wrote it, or "
                               "rerun the stage with --from")
        path = self.shard_path(rank, shards, info["step"])
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise SurgeryError(f"cannot read the saved training state {str(path)!r} ({err}); rerun the stage with "
                               "--from") from None
        return state if state.get("fingerprint") == self.fingerprint else None

    def load(self, map_location=None) -> dict | None:
        import torch

        if not self.matches():
            return None
        shards = self.peek().get("shards")
        if shards:
            raise SurgeryError(f"the saved training state {str(self.path)!r} is sharded over {shards} processes "
                               f"(runtime.engine fsdp2 or zero3); resume with the engine that wrote it on {shards} "
                               "processes, or rerun the stage with --from")
        try:
            state = torch.load(self.path, map_location=map_location, weights_only=False)
        except Exception as err:  # a truncated file from a full disk, say
            raise SurgeryError(f"cannot read the saved training state {str(self.path)!r} ({err}); "
                               "rerun the stage with --from") from None
        return state if state.get("fingerprint") == self.fingerprint else None

    def save(self, state: dict, step: int, steps: int) -> None:
        import torch

        tmp = self.path.with_name(self.path.name + ".tmp")
        meta = self.path.with_suffix(".json")
        try:
            torch.save({**state, "fingerprint": self.fingerprint}, tmp)
            os.replace(tmp, self.path)
            meta_tmp = meta.with_name(meta.name + ".tmp")
            meta_tmp.write_text(json.dumps({"step": step, "steps": steps, "fingerprint": self.fingerprint}))
            os.replace(meta_tmp, meta)
        except OSError as err:
            raise _write_failed(tmp, self.path, err) from None

    @property
    def trainer_dir(self) -> Path:
        """Where a stage trained by TRL keeps TRL's own checkpoints (surgery/sft.py); the state names the one to use."""
        return self.path.with_name(self.path.name.removesuffix(".resume.pt") + ".trainer")

    def clear(self) -> None:
        import shutil

        for path in (self.path, self.path.with_suffix(".json"), *self.path.parent.glob(f"{self.path.name}.step*.shard*")):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.trainer_dir, ignore_errors=True)

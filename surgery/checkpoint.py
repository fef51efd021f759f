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
        return info is not None and info.get("fingerprint") == self.fingerprint and self.path.is_file()

    def load(self, map_location=None) -> dict | None:
        import torch

        if not self.matches():
            return None
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
            tmp.unlink(missing_ok=True)
            reason = "the disk is full" if err.errno == 28 else (err.strerror or str(err))
            raise SurgeryError(f"saving the training state to {str(self.path)!r} failed: {reason}") from None

    @property
    def trainer_dir(self) -> Path:
        """Where a stage trained by TRL keeps TRL's own checkpoints (surgery/sft.py); the state names the one to use."""
        return self.path.with_name(self.path.name.removesuffix(".resume.pt") + ".trainer")

    def clear(self) -> None:
        import shutil

        for path in (self.path, self.path.with_suffix(".json")):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.trainer_dir, ignore_errors=True)

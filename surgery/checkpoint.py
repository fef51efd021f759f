"""Recipe fingerprints and in-stage training state, so `run` can skip finished stages and `--resume` a broken one.

A stage's fingerprint hashes what it computes: the source, target, plan, data and seed, every stage up to and
including it, the contents of the local files they read (training text, SFT conversations, chat templates), and the
numerics the runtime resolves to here (device kind and compute dtype) — but not how it is run (threads, save cadence,
kernels' chunk size, engine) or `eval`/`export`. A finished stage is skipped when the fingerprint in its manifest
matches; an interrupted one continues from its training state when the fingerprint stored there matches.
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
    common = recipe.model_dump(include={"source", "target", "plan", "data", "seed"})
    text = files_contents(training_text_files(recipe))
    if text:
        common["data_contents"] = text
    numbers = numerics(recipe.runtime)
    if numbers != CPU_FP32:  # left out for the default, so CPU runs made before this field keep their fingerprints
        common["numerics"] = numbers
    parent = fingerprint(common)
    out = []
    for stage in recipe.stages:
        # Unset optional fields (None) are left out, so a field added later keeps older runs' fingerprints.
        entry = {"parent": parent, "stage": stage.model_dump(exclude_none=True)}
        contents = files_contents(stage_files(stage))
        if contents:
            entry["contents"] = contents
        parent = fingerprint(entry)
        out.append(parent)
    return out


CPU_FP32 = {"device": "cpu", "dtype": "float32"}


def numerics(runtime) -> dict:
    """The runtime settings that change a stage's numbers, as they resolve on this machine: the device kind and the
    compute dtype (auto: bf16 on CUDA, fp32 on CPU — what `run` trains in)."""
    import torch

    device = runtime.device if runtime.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = runtime.dtype if runtime.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return {"device": device, "dtype": dtype}


def training_text_files(recipe) -> list[Path]:
    """The local files of `data.train` (files, and every data file of a folder); packaged and hub text: none."""
    from ling_surgery.surgery.data import folder_files, locate_documents

    files = []
    for entry in recipe.data.train:
        try:
            kind, where = locate_documents(entry.source)
        except SurgeryError:
            continue  # missing text is reported by the run, not by its fingerprint
        files += folder_files(Path(where)) if kind == "folder" else [Path(where)] if kind == "file" else []
    return files


def stage_files(stage) -> list[Path]:
    """The local files one stage reads beyond the training text: SFT conversation files and its chat template."""
    paths = [Path(d.source).expanduser() for d in getattr(stage, "data", None) or [] if hasattr(d, "source")]
    if getattr(stage, "chat_template", None):
        paths.append(Path(stage.chat_template).expanduser())
    return [path for path in paths if path.is_file()]


def files_contents(paths: list[Path]) -> dict[str, str]:
    """{path: sha256 of its bytes}; each file is read once per (size, modification time), the hash kept in the cache."""
    return {str(path.resolve()): content_hash(path) for path in paths}


def content_hash(path: Path) -> str:
    from ling_surgery.surgery.token_cache import cache_root

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_root() / "file-hashes" / key
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    try:  # a cache that cannot be written only costs the next run a reread
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{key}.{os.getpid()}.tmp")
        tmp.write_text(value)
        os.replace(tmp, memo)
    except OSError:
        pass
    return value


def export_fingerprint(recipe) -> str:
    """What the final model folder and report depend on: every stage, the evaluation and the export settings."""
    return fingerprint({"parent": stage_fingerprints(recipe)[-1], "eval": recipe.eval.model_dump(),
                        "export": recipe.export.model_dump(exclude={"output"})})


def _write_failed(tmp: Path, path: Path, err: BaseException) -> SurgeryError:
    """The one-line error of a training state that could not be written; its temporary file is removed and the
    previous state, untouched, is what `--resume` continues from."""
    from ling_surgery.surgery.export import missing_folder, write_failure

    tmp.unlink(missing_ok=True)
    if not path.parent.is_dir():
        return missing_folder(path.parent, f"saving the training state to {str(path)!r}")
    return SurgeryError(f"saving the training state to {str(path)!r} failed: {write_failure(err, path.parent)}; the "
                        "previous state is kept (free space, then --resume)")


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

    def save_shard(self, state: dict, step: int, steps: int, rank: int, shards: int, barrier,
                   engine: str | None = None) -> None:
        """A sharded engine's state: every process writes its shard for this step (atomically), all wait, then the
        first process names the step in the state's meta file — the moment the new state counts — and each process
        removes its older shards. A kill at any point leaves the previous complete state or the new one."""
        import torch

        path = self.shard_path(rank, shards, step)
        tmp = path.with_name(path.name + ".tmp")
        try:
            torch.save({**state, "fingerprint": self.fingerprint}, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:  # torch.save raises RuntimeError on a full disk
            failure = _write_failed(tmp, path, err)
            failure.process_local = True  # the others wait at the barrier below: this process must say it
            raise failure from None
        barrier()
        if rank == 0:
            meta = self.path.with_suffix(".json")
            meta_tmp = meta.with_name(meta.name + ".tmp")
            meta_tmp.write_text(json.dumps({"step": step, "steps": steps, "fingerprint": self.fingerprint,
                                            "shards": shards, "engine": engine}))
            os.replace(meta_tmp, meta)
        barrier()
        for old in self.path.parent.glob(f"{self.path.name}.step*.shard{rank}-of-{shards}"):
            if old != path:
                old.unlink(missing_ok=True)

    def load_shard(self, rank: int, shards: int, engine: str | None = None) -> dict | None:
        """This process's shard of a sharded state; None when there is none that matches. Shards are laid out by the
        engine that wrote them (FSDP2's and ZeRO-3's differ): another engine's are refused in one line."""
        import torch

        if not self.matches():
            return None
        info = self.peek()
        if info.get("shards") != shards:
            saved = f"{info['shards']} processes" if "shards" in info else "one replica (runtime.engine ddp)"
            raise SurgeryError(f"the saved training state {str(self.path)!r} holds {saved}; resume on "
                               f"{info.get('shards', 'any number of')} processes with the engine that wrote it, or "
                               "rerun the stage with --from")
        written_by = info.get("engine")
        if engine is not None and written_by is not None and written_by != engine:
            raise SurgeryError(f"the saved training state {str(self.path)!r} was written by runtime.engine {written_by}, "
                               f"this run trains with {engine}; resume with --set runtime.engine={written_by}, or rerun "
                               "the stage with --from")
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
        meta_tmp = meta.with_name(meta.name + ".tmp")
        try:
            torch.save({**state, "fingerprint": self.fingerprint}, tmp)
            os.replace(tmp, self.path)
            meta_tmp.write_text(json.dumps({"step": step, "steps": steps, "fingerprint": self.fingerprint}))
            os.replace(meta_tmp, meta)
        except (OSError, RuntimeError) as err:  # torch.save raises RuntimeError on a full disk
            meta_tmp.unlink(missing_ok=True)
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

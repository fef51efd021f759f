"""Write model folders that the ecosystem loads: stage checkpoints and the final upgraded model.

Every folder is written into a hidden temporary sibling and renamed into place at the end, so an interrupted run never
leaves a folder that looks complete; a folder being replaced is only removed once its successor is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from ling_surgery.surgery.errors import SurgeryError, first_line
from ling_surgery.surgery.targets import serving_config, serving_tensor_names

MANIFEST = "ling_surgery_manifest.json"


def check_output_dir(path: str | Path) -> Path:
    """The destination must not exist yet and its parent must be writable; checked before any work starts."""
    path = Path(path).expanduser().resolve()
    if path.exists():
        raise SurgeryError(f"output {str(path)!r} already exists; pass a new --output folder or remove it")
    return check_parent_writable(path)


def check_parent_writable(path: Path) -> Path:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SurgeryError(f"cannot create the parent of output {str(path)!r}: {err.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise SurgeryError(f"output folder {str(parent)!r} is not writable; pick another --output")
    return path


def user_mode(mode: int) -> int:
    """`mode` under the process umask: what a plain open()/mkdir() would have given."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_failure(err: BaseException, folder: Path) -> str:
    """Why a write into `folder` failed, in words, with the free space there: a full disk is said as such (errno 28),
    and torch.save's RuntimeError on one (it does not raise OSError) gets the free space to say it."""
    errno, said = getattr(err, "errno", None), getattr(err, "strerror", None)
    if errno == 28:  # with what was found short, when a check (not the OS) found it
        reason = "the disk is full" + (f" ({said})" if said and said != os.strerror(28) else "")
    else:
        reason = said or first_line(err)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return reason
    return f"{reason} ({free / 2**30:.2f} GiB free there)"


def missing_folder(folder: Path, what: str) -> SurgeryError:
    """The one-line error of a write into a folder that is gone: deleted, moved or unmounted while the run went on."""
    return SurgeryError(f"{what} failed: {str(folder)!r} no longer exists (deleted, moved or unmounted during the "
                        "run?); nothing was written there — restore the folder and rerun with --resume, or start over")


def write_folder(folder: str | Path, fill, replace: bool = False) -> Path:
    """Create `folder` atomically: `fill(tmp)` writes into a temporary sibling that is then renamed into place.

    With `replace`, an existing `folder` is moved aside first and deleted only after the new one is in place. The
    parent must exist: a folder that disappeared while the run went on is said as such, not silently recreated.
    """
    folder = Path(folder)
    if not folder.parent.is_dir():
        raise missing_folder(folder.parent, f"writing {str(folder)!r}")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    except OSError as err:
        raise SurgeryError(f"writing {str(folder)!r} failed: {write_failure(err, folder.parent)}; nothing was "
                           "written there") from None
    tmp.chmod(user_mode(0o777))  # mkdtemp makes 0700; the result should look like any folder the user creates
    old = None
    try:
        fill(tmp)
        if replace and folder.exists():
            old = folder.with_name(f".{folder.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            os.replace(folder, old)
        os.replace(tmp, folder)  # atomic on one filesystem; fails if `folder` appeared meanwhile
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            os.replace(old, folder)
        if not folder.parent.is_dir():
            raise missing_folder(folder.parent, f"writing {str(folder)!r}") from None
        raise SurgeryError(f"writing {str(folder)!r} failed: {write_failure(err, folder.parent)}; nothing was "
                           "written there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            os.replace(old, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def rename_tensors(folder: Path, renames: dict[str, str]) -> None:
    """Rename tensors in `folder`'s safetensors files (and their index): each header is rewritten and the data bytes
    are copied as they are, so the weights stay bit-identical whatever their size."""
    if not renames:
        return
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as source:
            (length,) = struct.unpack("<Q", source.read(8))
            header = json.loads(source.read(length))
            if not renames.keys() & header.keys():
                continue
            blob = json.dumps({renames.get(k, k): v for k, v in header.items()}, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as out:
                out.write(struct.pack("<Q", len(blob)) + blob)
                shutil.copyfileobj(source, out, 1 << 24)
        os.replace(tmp, path)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        spec = json.loads(index.read_text())
        spec["weight_map"] = {renames.get(k, k): v for k, v in spec["weight_map"].items()}
        index.write_text(json.dumps(spec, indent=2) + "\n")


def check_written(folder: Path) -> None:
    """Every safetensors file in `folder` holds the bytes its header describes. safetensors' writer has been seen to
    return normally on a full device, leaving a short file: raised as the OSError a full disk is (errno 28)."""
    from ling_surgery.surgery.sources import safetensors_problem

    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise OSError(28, f"{path.name} came out short, {problem}")


def sweep_interrupted_writes(parent: Path) -> list[str]:
    """What killed writes left in `parent`, put right: temporary folders (`.NAME.partial-*`) and files (`*.tmp`) are
    removed; a folder moved aside to be replaced (`.NAME.old-*`) goes back where it was if its successor never
    arrived, else is removed. Returns what was done, one entry each."""
    done = []
    for path in sorted(parent.glob(".*.partial-*")) + sorted(parent.glob("*.tmp")) + sorted(parent.glob(".*.tmp")):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        done.append(f"removed {path.name}")
    for path in sorted(parent.glob(".*.old-*")):
        original = parent / path.name[1:].rsplit(".old-", 1)[0]
        if original.exists():
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name}")
        else:
            os.replace(path, original)
            done.append(f"restored {original.name}")
    return done


def save_model(model, tokenizer, folder: str | Path, manifest: dict, before_commit=None, replace: bool = False) -> Path:
    """Model (with the serving-engine config keys), tokenizer with chat template, generation config and manifest.

    `before_commit(tmp)` runs on the finished temporary folder (checks, reports) before it is renamed into place.
    """

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        rename_tensors(tmp, serving_tensor_names(model.config))
        check_written(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config_path.write_text(json.dumps(serving_config(json.loads(config_path.read_text()), model.config), indent=2) + "\n")
        write_manifest(tmp, manifest)
        if before_commit is not None:
            before_commit(tmp)

    return write_folder(folder, fill, replace=replace)


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def verify_export(folder: Path, model, input_ids) -> dict:
    """Reload the written folder with plain transformers in a fresh process (never imports ling_surgery) and
    compare its logits with the in-memory model's; also check cached greedy decoding against uncached argmax."""
    import torch

    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    torch.save({"input_ids": input_ids, "logits": expected}, folder / ".probe.pt")
    script = (
        "import json,sys,torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "p=torch.load(sys.argv[1]+'/.probe.pt')\n"
        "m=AutoModelForCausalLM.from_pretrained(sys.argv[1],dtype=torch.float32).eval()\n"
        "assert 'ling_surgery' not in sys.modules\n"
        "with torch.no_grad():\n"
        " l=m(input_ids=p['input_ids']).logits\n"
        " ids=p['input_ids'][:,:16]\n"
        " g=m.generate(ids,max_new_tokens=12,do_sample=False,repetition_penalty=1.0,use_cache=True,pad_token_id=0)\n"
        " full=m(input_ids=g).logits.argmax(-1)[:,ids.shape[1]-1:-1]\n"
        "print(json.dumps({'max_abs_diff':(l-p['logits']).abs().max().item(),'bit_exact':bool(torch.equal(l,p['logits'])),"
        "'greedy_cache_matches':bool(torch.equal(full,g[:,ids.shape[1]:]))}))\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=1800, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except subprocess.CalledProcessError as err:
        raise SurgeryError(f"the exported checkpoint does not reload: {(err.stderr.strip().splitlines() or ['?'])[-1]}") from None
    finally:
        (folder / ".probe.pt").unlink(missing_ok=True)

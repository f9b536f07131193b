"""Checkpoints that are never half-written and are verified on resume.

Layout: ``<out_dir>/checkpoints/step_00000100/`` holding the state files, ``config.yaml`` and,
written LAST, ``manifest.json`` (files, sizes, sha256, step, config hash, world layout). A
checkpoint is first written to ``step_X.tmp`` and renamed when complete; ``latest`` (a text file
replaced atomically) names the newest verified checkpoint. On resume a corrupt or partial
checkpoint is reported by name and the previous complete one is used.

State files are read with ``torch.load(weights_only=True)``: a checkpoint cannot execute code.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def write_checkpoint(root: Path, step: int, write_files: Callable[[Path], None], meta: dict[str, Any],
                     keep_last: int = 3, is_rank0: bool = True, barrier: Optional[Callable[[], None]] = None) -> Path:
    """``write_files(tmp_dir)`` writes the state files (on every rank); then rank 0 writes the
    manifest, renames the folder to its final name and updates ``latest``. Returns the final
    folder. With several ranks, ``barrier`` orders: tmp folder ready -> all parts written ->
    manifest + rename done."""
    barrier = barrier or (lambda: None)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if is_rank0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    write_files(tmp)
    barrier()
    if not is_rank0:
        barrier()
        return final
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[str(p.relative_to(tmp))] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = dict(meta, step=step, files=files)
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", final.name)
    _prune_old(root, keep_last)
    barrier()
    return final


def _prune_old(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for p in done[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def verify(ckpt: Path) -> dict:
    """Returns the manifest of a complete checkpoint, else raises CheckpointError naming the problem."""
    mf = ckpt / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no {MANIFEST}: it was not completely written")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} is corrupt ({e})") from e
    for name, info in manifest.get("files", {}).items():
        p = ckpt / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: file {name} is missing")
        if p.stat().st_size != info["size"]:
            raise CheckpointError(f"checkpoint {ckpt}: file {name} has size {p.stat().st_size}, expected {info['size']}")
        if sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt}: file {name} fails its checksum (corrupt)")
    return manifest


def find_resumable(root: Path, log: Callable[[str], None] = print) -> Optional[tuple[Path, dict]]:
    """Newest checkpoint under ``root`` that verifies; corrupt/partial ones are reported and skipped."""
    if not root.is_dir():
        return None
    cands = sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)
    for c in cands:
        try:
            return c, verify(c)
        except CheckpointError as e:
            log(f"[checkpoint] skipping {e}; falling back to the previous checkpoint")
    return None


def save_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load {path} safely (weights_only=True): {e}") from e


def check_layout(manifest: dict, world: dict) -> None:
    """Refuse to resume with a different parallel layout than the checkpoint was written with."""
    saved = manifest.get("world")
    if saved and saved != world:
        raise CheckpointError(
            f"checkpoint was written with layout {saved} but this run has {world}; resume with the same "
            f"tensor_parallel and world size, or consolidate it first (tools/consolidate_checkpoint.py) and "
            f"start a new run from the consolidated weights")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def silence_warnings() -> None:
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")

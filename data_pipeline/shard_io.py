"""Crash-safe files of a shard folder: tar shards, done-markers, the index.

Nothing ever appears under a final name half-written: every file is written to a temp name in
the same folder, flushed, fsynced, renamed (atomic on POSIX), and the folder is fsynced so the
rename survives a power loss. Shards are byte-reproducible (fixed mtime/owner, sorted members),
so a unit redone after a crash produces the same bytes.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

SHARD_GLOB = "shard-*.tar"
TEMP_MARK = ".tmp-"


def shard_name(unit: int) -> str:
    return f"shard-{unit:06d}.tar"


def marker_name(unit: int) -> str:
    """Done-marker of a work unit: written only after its shard is in place."""
    return f"shard-{unit:06d}.done.json"


def _temp_path(final: Path) -> Path:
    return final.with_name(f"{final.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    final = Path(final)
    tmp = _temp_path(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def atomic_write_json(final: Path, obj: Any) -> None:
    atomic_write_bytes(final, json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=1).encode("utf-8"))


class AtomicTarWriter:
    """A WebDataset ``TarWriter`` into a temp file; :meth:`commit` publishes it under ``final``.

    Use as a context manager: leaving the block by an exception removes the temp file."""

    def __init__(self, final: Path):
        import webdataset as wds

        self.final = Path(final)
        self.tmp = _temp_path(self.final)
        self._file = open(self.tmp, "wb")
        # Fixed metadata keeps shards byte-identical across reruns.
        self._writer = wds.TarWriter(self._file, user="stts", group="stts", mode=0o444, mtime=0.0,
                                     encoder=False)
        self.samples = 0

    def write(self, sample: dict[str, Any]) -> None:
        """``sample``: ``{"__key__": str, "<ext>": bytes, ...}``."""
        self._writer.write(sample)
        self.samples += 1

    def commit(self) -> int:
        """Close, fsync, rename to the final name; returns the shard's size in bytes."""
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return self.final.stat().st_size

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicTarWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def remove_stale_temp_files(out_dir: Path) -> int:
    """Delete temp files left by a crashed run (they never carry a final name). Returns the count."""
    removed = 0
    for p in Path(out_dir).glob(f"*{TEMP_MARK}*"):
        if p.is_file() and p.name.startswith(("shard-", "index.json", "errors.jsonl", "plan.json")):
            p.unlink(missing_ok=True)
            removed += 1
    return removed

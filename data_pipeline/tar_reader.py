"""Random access to samples inside tar shards, by key.

Opening a shard reads its tar headers only (one seek per member) and builds a table
``key -> {ext: (offset, size)}``; a sample is then read with one ``pread`` per member. This is
what makes exact resume cheap: skipped samples are never read, let alone decoded.

Opening also validates the shard: every member name must pass the allow-list of
:mod:`data_pipeline.safe_decode` (checked before any byte of data is read), and a truncated or
modified file -- size differing from the index, missing end-of-archive blocks, a member running
past the end -- raises :class:`ShardFormatError` naming the shard.
"""
from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from pathlib import Path

from data_pipeline.errors import ShardFormatError
from data_pipeline.safe_decode import check_member_name

_BLOCK = 512
_REBUILD = "rebuild it with python -m data_pipeline.build_shards (finished shards are kept), or set loader on_corrupt=skip"

MemberTable = dict[str, dict[str, tuple[int, int]]]


def scan_shard(path: Path, expected_bytes: int | None = None) -> MemberTable:
    """``key -> {ext: (data offset, size)}`` for a shard, after validating it (see module doc)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ShardFormatError(f"shard {path} cannot be read ({e})") from None
    table: MemberTable = {}
    try:
        with tarfile.open(path, mode="r:") as tf:
            for member in tf:
                if not member.isreg():
                    raise ShardFormatError(f"shard {path}: member '{member.name}' is not a regular file; {_REBUILD}")
                key, ext = check_member_name(str(path), member.name)
                if member.offset_data + member.size > size:
                    raise ShardFormatError(f"shard {path} is truncated: member '{member.name}' runs past the end "
                                           f"of the file ({size} bytes); {_REBUILD}")
                table.setdefault(key, {})[ext] = (member.offset_data, member.size)
    except tarfile.TarError as e:
        raise ShardFormatError(f"shard {path} is not a readable tar ({e}); it is truncated or corrupt; {_REBUILD}") from None
    if expected_bytes is not None and size != expected_bytes:
        raise ShardFormatError(f"shard {path} is {size} bytes but index.json recorded {expected_bytes}: it is "
                               f"truncated or was modified; {_REBUILD}")
    with open(path, "rb") as f:
        f.seek(max(0, size - 2 * _BLOCK))
        tail = f.read(2 * _BLOCK)
    if size % _BLOCK or len(tail) < 2 * _BLOCK or tail.count(0) != len(tail):
        raise ShardFormatError(f"shard {path} is truncated: it does not end with the tar end-of-archive "
                               f"blocks; {_REBUILD}")
    return table


class ShardReader:
    """Reads raw samples by key from shards, keeping a few shards' tables and descriptors open."""

    def __init__(self, max_open: int = 8):
        self.max_open = max_open
        self._open: OrderedDict[Path, tuple[int, MemberTable]] = OrderedDict()

    def _shard(self, path: Path, expected_bytes: int | None) -> tuple[int, MemberTable]:
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        table = scan_shard(path, expected_bytes)
        fd = os.open(path, os.O_RDONLY)
        self._open[path] = (fd, table)
        while len(self._open) > self.max_open:
            _, (old_fd, _) = self._open.popitem(last=False)
            os.close(old_fd)
        return fd, table

    def read(self, path: Path, key: str, expected_bytes: int | None = None) -> dict[str, bytes | str]:
        """WebDataset-style raw sample ``{"__key__", "__url__", "<ext>": bytes}``."""
        fd, table = self._shard(Path(path), expected_bytes)
        members = table.get(key)
        if members is None:
            raise ShardFormatError(f"shard {path} has no sample '{key}' although index.json lists it there: the "
                                   f"shard is truncated or does not belong to this index; {_REBUILD}")
        sample: dict[str, bytes | str] = {"__key__": key, "__url__": str(path)}
        for ext, (offset, size) in members.items():
            data = os.pread(fd, size, offset)
            if len(data) != size:
                raise ShardFormatError(f"shard {path}: member '{key}.{ext}' is cut short; {_REBUILD}")
            sample[ext] = data
        return sample

    def close(self) -> None:
        for fd, _ in self._open.values():
            os.close(fd)
        self._open.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

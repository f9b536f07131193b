"""Hugging Face model folders: ``config.json`` plus ``*.safetensors`` (one file, or shards listed
in ``model.safetensors.index.json``), read lazily and written back in the same layout.

Reading never loads a whole file: :meth:`SafetensorsFolder.read` memory-maps the file that holds
a tensor and copies out only the requested slice (``safe_open(...).get_slice``), so a
tensor-parallel rank of a 7B model touches only its own rows or columns.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class WeightsError(ValueError):
    """Pretrained weights cannot be used; the message names the file or tensor and the fix."""


class SafetensorsFolder:
    """Lazy, read-only view of a Hugging Face model folder.

    ``names``: every tensor name; ``shape(name)``, ``dtype(name)``; ``read(name)`` the whole
    tensor, ``read(name, dim, start, stop)`` only ``[start, stop)`` along ``dim``."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise WeightsError(f"pretrained weights folder not found: {self.path}. Pass a Hugging Face model folder "
                               f"holding {CONFIG_FILE} and *.safetensors (tools/import_weights.py makes one)")
        cfg = self.path / CONFIG_FILE
        if not cfg.is_file():
            raise WeightsError(f"{self.path} has no {CONFIG_FILE}; a Hugging Face model folder needs one")
        self.config: dict[str, Any] = json.loads(cfg.read_text())
        self._file_of: dict[str, str] = {}
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise WeightsError(f"{index} has no 'weight_map'; it is not a safetensors shard index")
            self._file_of = dict(weight_map)
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                bins = sorted(p.name for p in self.path.glob("*.bin"))
                hint = (f" (it holds {bins[0]}: PyTorch pickles are not read, for safety; convert with "
                        f"transformers' save_pretrained(safe_serialization=True))") if bins else ""
                raise WeightsError(f"{self.path} holds no *.safetensors file{hint}")
            for f in files:
                with safe_open(str(self.path / f), framework="pt") as h:
                    for k in h.keys():
                        self._file_of[k] = f
        missing = sorted({f for f in self._file_of.values() if not (self.path / f).is_file()})
        if missing:
            raise WeightsError(f"{self.path}: shard(s) {missing[:3]} listed in {INDEX_FILE} are missing; "
                               f"download the complete folder")
        self._handles: dict[str, Any] = {}

    @property
    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str):
        if name not in self._file_of:
            raise WeightsError(f"tensor '{name}' is missing from {self.path}")
        f = self._file_of[name]
        if f not in self._handles:
            self._handles[f] = safe_open(str(self.path / f), framework="pt")
        return self._handles[f]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._handle(name).get_slice(name).get_dtype()
        if code not in _DTYPES:
            raise WeightsError(f"tensor '{name}' in {self.path} has dtype {code}, which is not supported")
        return _DTYPES[code]

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """The tensor, or its ``[start, stop)`` slice along ``dim`` (only those bytes are copied)."""
        h = self._handle(name)
        if dim is None:
            return h.get_tensor(name)
        sl = h.get_slice(name)
        index = [slice(None)] * len(sl.get_shape())
        index[dim] = slice(start, stop)
        return sl[tuple(index)]

    def close(self) -> None:
        self._handles.clear()


def write_folder(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                 max_shard_bytes: int = 5 * 1024 ** 3, extra_files: Optional[dict[str, str]] = None) -> Path:
    """Write ``config.json`` and the tensors as ``model.safetensors``, or as
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json`` when they
    exceed ``max_shard_bytes`` (the transformers layout). Tensor order is kept."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    for stale in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
        if stale.is_file():
            stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            for k, t in shard.items():
                weight_map[k] = fname
                total += t.numel() * t.element_size()
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for fname, text in (extra_files or {}).items():
        (out / fname).write_text(text)
    return out

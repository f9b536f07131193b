"""Copy full-shape tensors into a model's parameters, plain or tensor-parallel, reading only the
slice each rank keeps.

A *source* is anything with ``shape`` (the full, unsharded shape) and ``read(dim, start, stop)``:
a tensor in a safetensors folder (sliced reads), a tensor in memory, or a table extended with
extra rows. :func:`load_parameter` finds the module that owns a parameter name and, for the
megatron layers of :mod:`stts_dist.distributed.tp_layers`, reads the rows (column-parallel,
vocab-parallel) or columns (row-parallel) of this rank only. :func:`gather_parameter` is the
inverse used for export: the full tensor, gathered over the TP group.

Parameters must be materialised: load before ``deepspeed.initialize`` (ZeRO-3 partitions them).
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn as nn

from stts_dist.weights.folder import SafetensorsFolder, WeightsError


class TensorSource(Protocol):
    shape: tuple[int, ...]

    def read(self, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor: ...


class FolderTensor:
    """A tensor of a :class:`SafetensorsFolder`, read lazily (sliced)."""

    def __init__(self, folder: SafetensorsFolder, name: str):
        self.folder, self.name = folder, name
        self.shape = folder.shape(name)

    def read(self, dim=None, start=0, stop=None) -> torch.Tensor:
        return self.folder.read(self.name, dim, start, stop)


class MemoryTensor:
    """A tensor already in memory (e.g. one transformed at import time)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.shape = tuple(tensor.shape)

    def read(self, dim=None, start=0, stop=None) -> torch.Tensor:
        if dim is None:
            return self.tensor
        return self.tensor.narrow(dim, start, (self.shape[dim] if stop is None else stop) - start)


class RowsExtended:
    """``base`` (rows, ...) followed by ``rows - base.shape[0]`` copies of ``fill`` (...): e.g. an
    embedding table grown for new special tokens, the new rows set to the mean embedding."""

    def __init__(self, base: TensorSource, rows: int, fill: torch.Tensor):
        if rows < base.shape[0]:
            raise ValueError(f"cannot extend {base.shape[0]} rows to fewer ({rows})")
        self.base, self.fill = base, fill
        self.shape = (rows, *base.shape[1:])

    def read(self, dim=None, start=0, stop=None) -> torch.Tensor:
        if dim not in (None, 0):
            rows = self.read()
            return rows.narrow(dim, start, (self.shape[dim] if stop is None else stop) - start)
        start, stop = (0, self.shape[0]) if dim is None else (start, self.shape[0] if stop is None else stop)
        have = self.base.shape[0]
        parts = []
        if start < have:
            parts.append(self.base.read(0, start, min(stop, have)))
        if stop > have:
            n = stop - max(start, have)
            dtype = parts[0].dtype if parts else self.fill.dtype
            parts.append(self.fill.to(dtype).expand(n, *self.fill.shape).clone())
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _tp_layers():
    """The tensor-parallel layer classes, or None when megatron-core is not importable."""
    try:
        from stts_dist.distributed import tp_layers
    except Exception:  # noqa: BLE001 - plain models load without megatron installed
        return None
    return tp_layers


def _tp_rank_world() -> tuple[int, int]:
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(prefix) if prefix else model
    except AttributeError:
        raise WeightsError(f"the model has no module '{prefix}' (for parameter '{name}')") from None
    if not isinstance(getattr(module, attr, None), torch.Tensor):
        raise WeightsError(f"the model has no parameter '{name}'")
    return module, attr


def _check(label: str, got: tuple[int, ...], want: tuple[int, ...], hint: str) -> None:
    if tuple(got) != tuple(want):
        raise WeightsError(f"tensor '{label}' has shape {tuple(got)} in the checkpoint but the model expects "
                           f"{tuple(want)}{hint}")


@torch.no_grad()
def load_parameter(model: nn.Module, name: str, source: TensorSource, label: str, hint: str = "",
                   real_rows: Optional[int] = None) -> None:
    """Copy ``source`` (full shape) into ``model``'s parameter ``name``; ``label`` names the tensor
    in error messages (the checkpoint's name), ``hint`` tells which config keys set the shape.

    Tensor-parallel layers read only this rank's slice; vocabulary tables padded to a TP multiple
    get zero padding rows. ``real_rows``: for a column-parallel LM head whose rows were padded to
    a TP multiple, the number of real (vocabulary) rows the source holds."""
    module, attr = _owner(model, name)
    param = getattr(module, attr)
    if hasattr(param, "ds_id"):
        raise WeightsError(f"parameter '{name}' is already partitioned by DeepSpeed ZeRO; load pretrained weights "
                           f"after building (and parallelizing) the model and before deepspeed.initialize")
    tp = _tp_layers()
    if tp is not None and isinstance(module, tp.TiedVocabParallelHead):
        return  # shares the embedding table, loaded under its own name
    if tp is not None and isinstance(module, tp.VocabParallelEmbedding):
        _check(label, source.shape, (module.vocab_size, module.embedding_dim), hint)
        rank, world = _tp_rank_world()
        per = module.padded_vocab_size // world
        _copy_rows(param, source, rank * per, (rank + 1) * per, module.vocab_size)
        return
    if tp is not None and isinstance(module, tp.ColumnParallelLinear):
        rank, world = _tp_rank_world()
        full_rows = module.out_features
        real_rows = full_rows if real_rows is None else real_rows
        want = (real_rows, module.in_features) if attr == "weight" else (real_rows,)
        _check(label, source.shape, want, hint)
        per = full_rows // world
        _copy_rows(param, source, rank * per, (rank + 1) * per, real_rows)
        return
    if tp is not None and isinstance(module, tp.RowParallelLinear):
        if attr == "bias":
            _check(label, source.shape, (module.out_features,), hint)
            param.copy_(source.read())
            return
        _check(label, source.shape, (module.out_features, module.in_features), hint)
        rank, world = _tp_rank_world()
        per = module.in_features // world
        param.copy_(source.read(1, rank * per, (rank + 1) * per))
        return
    _check(label, source.shape, tuple(param.shape), hint)
    param.copy_(source.read())


def _copy_rows(param: torch.Tensor, source: TensorSource, start: int, stop: int, real_rows: int) -> None:
    """param[i] = source[start + i] for rows < real_rows, zero for the padding rows beyond."""
    have = max(0, min(stop, real_rows) - start)
    if have:
        param[:have].copy_(source.read(0, start, start + have))
    param[have:].zero_()


def gather_parameter(model: nn.Module, name: str, real_rows: Optional[int] = None) -> torch.Tensor:
    """The full (unsharded, unpadded) value of parameter ``name``; a collective under TP: call on
    every rank of the TP group. ``real_rows`` trims a padded column-parallel LM head."""
    module, attr = _owner(model, name)
    tp = _tp_layers()
    if tp is not None and isinstance(module, tp.TiedVocabParallelHead):
        raise WeightsError(f"'{name}' is tied to the embedding table; export the embedding instead")
    if tp is not None and isinstance(module, tp.VocabParallelEmbedding):
        return module.full_weight()
    if tp is not None and isinstance(module, (tp.ColumnParallelLinear, tp.RowParallelLinear)):
        full = module.full_weight() if attr == "weight" else module.full_bias()
        return full[:real_rows] if real_rows is not None else full
    return getattr(module, attr).detach().clone()

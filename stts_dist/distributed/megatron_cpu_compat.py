"""Make the megatron-core 0.16.1 tensor-parallel layers we use run on a CPU-only torch build.

megatron-core assumes every rank owns a CUDA device. We only use its ``tensor_parallel`` layers
(ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy)
built with ``use_cpu_initialization=True, perform_initialization=False``; running those on CPU
under gloo hits exactly one CUDA assumption, patched below. Everything else megatron-core assumes
about CUDA is listed in docs/distributed.md and deliberately left alone, because none of it is on
our code path (we do not use megatron's transformer blocks, CLIPViTModel or its RNG tracker).

GPU runs never apply any of this: :func:`apply_if_no_gpu` returns immediately when
``torch.cuda.is_available()``.
"""
from __future__ import annotations

import torch

_applied: list[str] = []


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _patch_cuda_current_device() -> None:
    # Upstream assumes: `torch.cuda.current_device()` names the rank's GPU. About 100 call sites
    # use it as `device=` for fresh buffers; on our path that is the all-gather output in
    # tensor_parallel/mappings.py (_gather_along_last_dim / _gather_along_first_dim /
    # _reduce_scatter_along_first_dim), reached by ColumnParallelLinear(gather_output=True) and
    # by the backward of RowParallelLinear(input_is_parallel=False). A CPU build of torch raises
    # "Torch not compiled with CUDA enabled" there. On a CPU-only host the only device is the
    # CPU, which is also where gloo expects the buffers, so answer "cpu".
    torch.cuda.current_device = _cpu_current_device


def apply_if_no_gpu() -> tuple[str, ...]:
    """Apply the CPU workarounds once, only when no GPU is visible.

    Returns the names of the workarounds in effect (empty on a GPU host). Idempotent."""
    if torch.cuda.is_available():
        return ()
    if not _applied:
        _patch_cuda_current_device()
        _applied.append("torch.cuda.current_device -> cpu")
    return tuple(_applied)

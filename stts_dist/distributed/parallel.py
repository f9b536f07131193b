"""Process groups and the parallel layout: tensor parallel (TP) inside, data parallel (DP) across.

World = TP x DP (no pipeline or context parallelism). megatron-core's
``parallel_state.initialize_model_parallel`` builds the groups with its default order
"tp-cp-ep-dp-pp", so TP is the fastest-varying index: global rank = dp_rank * TP + tp_rank, and
the ranks of one TP group are neighbours (one node, fast links). DeepSpeed ZeRO shards over the
DP group (see :mod:`stts_dist.distributed.mpu`).

Every group gets a finite collective timeout (60 s by default) so that a dead or stuck rank makes
the others raise instead of waiting forever (torch's own default is 30 minutes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ParallelLayout:
    """Where one rank sits in the TP x DP grid."""

    world_size: int
    tensor_parallel: int
    rank: int

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel={self.tensor_parallel} must be >= 1")
        if self.world_size % self.tensor_parallel != 0:
            raise ValueError(
                f"tensor_parallel={self.tensor_parallel} does not divide the world size "
                f"{self.world_size}; launch a multiple of {self.tensor_parallel} processes or "
                f"pick a tensor_parallel that divides {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} is outside the world of {self.world_size} processes")

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.tensor_parallel

    @property
    def tensor_parallel_rank(self) -> int:
        return self.rank % self.tensor_parallel

    @property
    def data_parallel_rank(self) -> int:
        return self.rank // self.tensor_parallel


def init_process_group(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> None:
    """Join the default process group from the launcher's environment (torchrun, deepspeed, srun
    wrappers all set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). No-op if already joined.

    Backend: nccl when a GPU is visible, else gloo. On GPU the rank binds GPU ``LOCAL_RANK``."""
    if dist.is_initialized():
        return
    missing = [k for k in _LAUNCH_ENV if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"cannot join the process group: environment variables {missing} are not set. "
            "Start the job with torchrun / the deepspeed launcher (they set them), or set "
            "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT yourself")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        # megatron's async TP all-reduce relies on one CUDA work queue to order the all-reduce
        # before the weight-gradient GEMM; it must be set before the CUDA context exists.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def default_single_process_world() -> None:
    """Outside a launcher, a world of one (tests, debugging the engine in one process)."""
    if not dist.is_initialized() and "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))


def preparation_barrier(timeout_s: float = DEFAULT_TIMEOUT_S,
                        wait_s: float = 6 * 3600.0) -> Callable[[], None]:
    """Join the world (if needed) and return a barrier for one-off set-up work that rank 0 does
    before the model exists (stage-0 pre-training, sharding the videos, learning the vocabulary)
    while the other ranks wait. Its gloo group has a long timeout (``wait_s``): that wait must not
    trip the short collective timeout that catches dead ranks during training."""
    default_single_process_world()
    init_process_group(timeout_s=timeout_s)
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_s))
    return lambda: dist.barrier(group=group)


def initialize_parallel(tensor_parallel: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelLayout:
    """Join the world (if needed) and build megatron-core's TP and DP groups.

    Returns this rank's :class:`ParallelLayout`. Call :func:`destroy_parallel` to tear down."""
    from megatron.core import parallel_state

    from stts_dist.distributed.megatron_cpu_compat import apply_if_no_gpu

    apply_if_no_gpu()
    init_process_group(timeout_s=timeout_s)
    layout = ParallelLayout(world_size=dist.get_world_size(), tensor_parallel=tensor_parallel,
                            rank=dist.get_rank())
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron-core parallel groups already exist; call destroy_parallel() first")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        distributed_timeout_minutes=timeout_s / 60.0,
        # megatron only needs its duplicate gloo groups for its own distributed optimizer and
        # checkpointing, which we do not use (DeepSpeed owns both); skipping them saves one
        # rendezvous per group at start-up.
        create_gloo_process_groups=False,
    )
    return layout


def current_layout() -> ParallelLayout:
    """The layout of the groups built by :func:`initialize_parallel`."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("parallel groups are not initialized; call initialize_parallel(tensor_parallel=...) first")
    return ParallelLayout(world_size=dist.get_world_size(),
                          tensor_parallel=parallel_state.get_tensor_model_parallel_world_size(),
                          rank=dist.get_rank())


def destroy_parallel() -> None:
    """Drop megatron's groups and leave the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

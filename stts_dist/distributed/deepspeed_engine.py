"""DeepSpeed ZeRO engine over megatron-core's TP/DP groups.

The DeepSpeed JSON config is built from :class:`DeepSpeedSettings` (a few knobs we actually turn);
the optimizer is a plain ``torch.optim`` instance passed in, so nothing is compiled on CPU.
ZeRO partitions over the data-parallel group the :class:`~stts_dist.distributed.mpu.MegatronMPU`
reports; tensor-parallel slices are partitioned again within it.

Usage (every rank)::

    layout = initialize_parallel(tensor_parallel=2)
    model = build_model_with_tp_layers(...)
    optimizer = torch.optim.AdamW(model.parameters(), lr=...)
    engine = initialize_engine(model, optimizer, DeepSpeedSettings(micro_batch_size=4))
    loss = loss_fn(engine(batch)); engine.backward(loss); engine.step()
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

DTYPES = ("auto", "fp32", "bf16")


@dataclass
class DeepSpeedSettings:
    zero_stage: int = 3               # 1: optimizer state, 2: + gradients, 3: + parameters sharded
    micro_batch_size: int = 1         # samples per data-parallel rank per forward
    grad_accum: int = 1               # micro-batches per optimizer step
    grad_clip: float = 1.0            # global grad-norm clip (TP- and DP-aware); 0 disables
    dtype: str = "auto"               # auto: bf16 on GPU, fp32 on CPU
    # ZeRO-3 keeps parameters with fewer elements than this whole on every rank (saves tiny
    # all-gathers). DeepSpeed's default is 1e5, so tiny test models would not be partitioned at
    # all: set 0 to partition everything.
    stage3_param_persistence_threshold: int = 100_000

    def __post_init__(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage} must be 1, 2 or 3")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} and grad_accum={self.grad_accum} must be >= 1")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype='{self.dtype}' must be one of {DTYPES}")
        if self.stage3_param_persistence_threshold < 0:
            raise ValueError("stage3_param_persistence_threshold must be >= 0")

    @classmethod
    def from_run_config(cls, cfg: Any, data_parallel: int, grad_accum: int = 1,
                        zero_stage: int = 3) -> "DeepSpeedSettings":
        """From a :class:`stts_dist.config.RunConfig`. ``train.batch_size`` is the *global* batch
        per optimizer step, so a run means the same thing at every DP size."""
        global_batch = cfg.train.batch_size
        per_step = data_parallel * grad_accum
        if global_batch % per_step != 0:
            raise ValueError(
                f"train.batch_size={global_batch} (global) is not divisible by data_parallel={data_parallel} "
                f"x grad_accum={grad_accum}; use a batch size that is a multiple of {per_step}")
        return cls(zero_stage=zero_stage, micro_batch_size=global_batch // per_step, grad_accum=grad_accum,
                   grad_clip=cfg.optim.grad_clip, dtype=cfg.train.dtype)

    def resolved_dtype(self) -> str:
        if self.dtype == "auto":
            return "bf16" if torch.cuda.is_available() else "fp32"
        return self.dtype

    def to_config(self, data_parallel: int) -> dict[str, Any]:
        """The DeepSpeed config dict for ``data_parallel`` ranks."""
        zero: dict[str, Any] = {"stage": self.zero_stage}
        if self.zero_stage == 3:
            zero["stage3_param_persistence_threshold"] = self.stage3_param_persistence_threshold
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "train_batch_size": self.micro_batch_size * self.grad_accum * data_parallel,
            "gradient_clipping": self.grad_clip,
            "bf16": {"enabled": self.resolved_dtype() == "bf16"},
            "zero_optimization": zero,
            # We pass torch.optim.AdamW; DeepSpeed only "tests" its own fused/CPU Adam builds.
            "zero_allow_untested_optimizer": True,
            # Our trainer logs; DeepSpeed's periodic step print would only duplicate it.
            "steps_per_print": 2**31 - 1,
        }


def load_deepspeed_file(path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of a DeepSpeed checkpoint file, allowing only the small
    data classes its ZeRO files pickle (DeepSpeed 0.19.8: the stage enum, the loss scalers'
    settings and ZeRO-1/2's ``fragment_address``, a (numel, start) dataclass): no code runs.
    Raises what ``torch.load`` raises; callers name the file and the fix."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def skip_cpu_shm_comm_build() -> bool:
    """Stop DeepSpeed's CPU backend from JIT-compiling its shared-memory collective op.

    DeepSpeed 0.19.8 builds ``deepspeed_shm_comm`` (C++, via ninja) the first time the comm
    backend starts on CPU: ~40 s on 2 cores (then cached under ~/.cache/torch_extensions). The op
    only serves ``inference_all_reduce`` (AutoTP inference); training collectives all go through
    torch.distributed / gloo. There is no env var or config key for it: ``build_shm_op`` consults
    ``deepspeed.ops.__compatible_ops__``, a probed-once dict that DeepSpeed keeps editable, so the
    op is marked incompatible there. Returns True if it did so (CPU, backend not started yet)."""
    from deepspeed.accelerator import get_accelerator
    import deepspeed.comm.comm as ds_comm
    import deepspeed.ops

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu" or ds_comm.cdb is not None:
        return False
    builder = accelerator.get_op_builder("ShareMemCommBuilder")
    deepspeed.ops.__compatible_ops__[builder.NAME] = False
    return True


def initialize_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      settings: DeepSpeedSettings) -> Any:
    """Wrap ``model`` and ``optimizer`` in a DeepSpeed engine on the groups of
    :func:`stts_dist.distributed.parallel.initialize_parallel` (call that first).

    Returns the ``DeepSpeedEngine``: ``engine(x)``, ``engine.backward(loss)``, ``engine.step()``."""
    from megatron.core import parallel_state

    from stts_dist.distributed.mpu import MegatronMPU

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        raise RuntimeError("parallel groups are not initialized; call "
                           "stts_dist.distributed.parallel.initialize_parallel(tensor_parallel=...) first")
    skip_cpu_shm_comm_build()
    import deepspeed

    config = settings.to_config(data_parallel=parallel_state.get_data_parallel_world_size())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           mpu=MegatronMPU(), dist_init_required=False)
    return engine

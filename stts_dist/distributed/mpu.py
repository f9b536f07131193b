"""The ``mpu`` object DeepSpeed asks for, backed by megatron-core's ``parallel_state``.

DeepSpeed 0.19 still calls the Megatron-LM names from before pipeline parallelism existed:
"model parallel" there means the ranks that hold different slices of the same weights, which
with no pipeline parallelism is exactly megatron-core's *tensor*-parallel group. So:

==================================  ===============================================
DeepSpeed calls                      answered by megatron.core.parallel_state
==================================  ===============================================
get_model_parallel_rank()            get_tensor_model_parallel_rank()
get_model_parallel_world_size()      get_tensor_model_parallel_world_size()
get_model_parallel_group()           get_tensor_model_parallel_group()
get_data_parallel_rank()             get_data_parallel_rank()
get_data_parallel_world_size()       get_data_parallel_world_size()
get_data_parallel_group()            get_data_parallel_group()
==================================  ===============================================

plus the newer names DeepSpeed probes with ``hasattr`` (``get_tensor_model_parallel_*``,
``get_pipeline_model_parallel_*``). ZeRO partitions parameters and reduces gradients over the
data-parallel group; gradient-norm clipping sums TP-sliced parameters over the model-parallel
group (parameters carry megatron's ``tensor_model_parallel`` flag, see tp_layers).

Deliberately absent: ``initialize_sequence_parallel`` — DeepSpeed takes its presence to mean a
Ulysses sequence-parallel mpu and then ignores the data-parallel group.
"""
from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronMPU:
    """Stateless adapter; the groups live in ``megatron.core.parallel_state``."""

    # Old Megatron-LM names (DeepSpeed runtime, ZeRO, grad clipping, checkpoint naming).
    def get_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return ps.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size()

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(ps.get_data_parallel_group())

    # Newer names, probed with hasattr by deepspeed.utils.bwc.
    def get_tensor_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return ps.get_pipeline_model_parallel_group()

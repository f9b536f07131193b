"""Known, harmless third-party warnings, filtered by message at the entry points.

Only exact, understood messages are listed, so anything else (a video skipped, a fallback the
framework takes) still reaches the console:

- DeepSpeed ZeRO-3 calls ``torch.distributed.all_gather_into_tensor`` / ``reduce_scatter_tensor``,
  which torch 2.13 deprecates: one FutureWarning per call and rank, 4 per training step;
- megatron-core announces at import that Transformer Engine and Apex are absent and that it uses
  its plain torch kernels (4 messages per rank; on CPU these are the only kernels there are);
- torch's ``TypedStorage is deprecated`` from DeepSpeed's checkpoint code;
- DeepSpeed's log line "Setting accelerator to CPU. If you have GPU ... we were unable to detect
  it", on a machine where torch sees no GPU either (on stdout, it also broke ``stts-infer --json``).
"""
from __future__ import annotations

import logging
import warnings

KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"TypedStorage is deprecated"),
)


NO_GPU_LOG_LINES = ("Setting accelerator to CPU.",)


class _DropWithoutGpu(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NO_GPU_LOG_LINES)


def quiet_known_warnings() -> None:
    """Install the filters (call before importing DeepSpeed / megatron-core)."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    import torch
    if not torch.cuda.is_available():      # then "no GPU detected" is simply true
        logging.getLogger("DeepSpeed").addFilter(_DropWithoutGpu())

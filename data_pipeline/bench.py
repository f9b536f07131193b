"""Loader throughput: samples/s and visual tokens/s a :class:`VideoLoader` delivers with N workers.

Compare with the trainer's consumption rate: if the loader is slower, training waits on decoding.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from data_pipeline.config import as_loader_config


def measure_loader(cfg: Any, num_workers: int, steps: int, batch_size: int = 8, warmup_steps: int = 1) -> dict[str, Any]:
    """Time ``steps`` batches after ``warmup_steps`` (worker start-up, first shard scans).

    ``cfg``: LoaderConfig / dict / OmegaConf node, or a shard folder path. Returns
    ``loader_samples_per_s``, ``loader_vit_tokens_per_s`` (patches before pruning),
    ``loader_llm_visual_tokens_per_s`` (before pruning: the shards serve every ratio),
    ``loader_frames_per_s`` and timings."""
    from data_pipeline.loader import VideoLoader

    if isinstance(cfg, (str, Path)):
        cfg = {"datasets": [{"path": str(cfg)}]}
    base = as_loader_config(cfg)
    base.num_workers = num_workers
    loader = VideoLoader(base)
    batches = loader.iter_batches(batch_size, epochs=None)
    started = time.perf_counter()
    for _ in range(warmup_steps):
        next(batches)
    warm = time.perf_counter()
    samples = frames = vit = llm = 0
    for _ in range(steps):
        for s in next(batches):
            samples += 1
            t = int(s["frames"].shape[0])
            frames += t
            vit += t * s["meta"]["patches_per_frame"]
            llm += t * s["meta"]["groups_per_frame"]
    seconds = time.perf_counter() - warm
    batches.close()
    return {"loader_samples_per_s": round(samples / seconds, 2),
            "loader_frames_per_s": round(frames / seconds, 2),
            "loader_vit_tokens_per_s": round(vit / seconds, 1),
            "loader_llm_visual_tokens_per_s": round(llm / seconds, 1),
            "loader_num_workers": num_workers, "loader_batch_size": batch_size, "loader_steps": steps,
            "loader_seconds": round(seconds, 4), "loader_warmup_seconds": round(warm - started, 4)}

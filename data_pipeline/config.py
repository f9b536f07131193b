"""Typed configs of the data pipeline (OmegaConf structured dataclasses).

``ShardingConfig`` drives ``python -m data_pipeline.build_shards --config jobs/build_shards.yaml
key=value ...``; ``LoaderConfig`` drives :class:`data_pipeline.loader.VideoLoader`. Unknown keys
and wrong types are errors that name the key and the closest valid key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stts_dist.config import ConfigError, load_structured, wrap_config_error

FRAME_FORMATS = ("jpeg", "npy")


@dataclass
class ShardingConfig:
    manifest: str = ""                 # input JSONL manifest (required)
    out_dir: str = ""                  # shard folder to create (required)
    # Frame geometry: must match the model that will train on the shards (the trainer derives it
    # from its own config when it shards). The token budget of any pruning ratio is computed from
    # these at load time, so one shard folder serves every method and ratio.
    image_size: int = 64               # square ViT input, pixels
    patch_size: int = 8
    pool_size: int = 2                 # g: one LLM token per g x g patch group
    # Frame sampling.
    fps: float = 2.0                   # frames per second to sample; 0 = every native frame
    max_frames: int = 16               # longer clips are sampled uniformly down to this many
    # Storage.
    frame_format: str = "jpeg"         # jpeg | npy (raw uint8, lossless, ~10x larger)
    jpeg_quality: int = 90
    target_shard_bytes: int = 256 * 1024 * 1024
    samples_per_shard: int = 0         # 0: derived from target_shard_bytes by probing a few samples
    samples_per_task: int = 0          # cap per manifest 'task' (first N in manifest order); 0 = all
    # Execution.
    ray_address: str = ""              # '' = start a local Ray bound to 127.0.0.1; else a cluster address
    num_cpus: int = 0                  # local Ray CPUs; 0 = all cores
    max_retries: int = 3               # Ray retries of a failed work unit (crash or exception)
    progress_bar: bool = True


@dataclass
class DatasetSpec:
    path: str = ""                     # shard folder holding index.json
    weight: float = 1.0                # blend weight (relative)
    name: str = ""                     # label carried into samples; default: folder name


@dataclass
class LoaderConfig:
    datasets: list[DatasetSpec] = field(default_factory=list)
    seed: int = 0
    shuffle_shards: bool = True
    shuffle_window: int = 256          # samples shuffled within consecutive windows; 0 = off
    samples_per_epoch: int = 0         # 0 = sum of the datasets' sizes
    pad_to_equal: bool = True          # True: pad ranks by wrapping (DistributedSampler); False: drop
    num_workers: int = 2               # torch DataLoader workers (decoding happens there)
    prefetch_factor: int = 2           # chunks in flight per worker
    worker_chunk: int = 8              # samples a worker ships per message (one shared-memory tensor)
    worker_start_method: str = "fork"  # fork | forkserver | spawn
    frames_dtype: str = "uint8"        # uint8 (T,H,W,3) | float32 scaled to [0, 1]
    on_corrupt: str = "error"          # error | skip (replace with the next readable sample, counted)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate_sharding(cfg: Any) -> None:
    _check(bool(cfg.manifest), "sharding: 'manifest' is required (path to a JSONL manifest)")
    _check(bool(cfg.out_dir), "sharding: 'out_dir' is required (folder to write shards into)")
    _check(cfg.image_size >= 2 and cfg.image_size % cfg.patch_size == 0,
           f"sharding: image_size={cfg.image_size} must be a positive multiple of patch_size={cfg.patch_size}")
    _check(cfg.pool_size >= 1, "sharding: pool_size must be >= 1")
    _check(cfg.fps >= 0.0, f"sharding: fps={cfg.fps} must be >= 0 (0 = every native frame)")
    _check(1 <= cfg.max_frames <= 999, "sharding: max_frames must be in [1, 999] (frame members are numbered NNN)")
    _check(cfg.frame_format in FRAME_FORMATS, f"sharding: frame_format='{cfg.frame_format}' must be one of {FRAME_FORMATS}")
    _check(1 <= cfg.jpeg_quality <= 100, "sharding: jpeg_quality must be in [1, 100]")
    _check(cfg.target_shard_bytes >= 1024, "sharding: target_shard_bytes must be >= 1024")
    _check(cfg.samples_per_shard >= 0, "sharding: samples_per_shard must be >= 0 (0 = derive from target_shard_bytes)")
    _check(cfg.samples_per_task >= 0, "sharding: samples_per_task must be >= 0 (0 = all)")
    _check(cfg.num_cpus >= 0, "sharding: num_cpus must be >= 0 (0 = all cores)")
    _check(cfg.max_retries >= 0, "sharding: max_retries must be >= 0")


def validate_loader(cfg: Any) -> None:
    _check(len(cfg.datasets) >= 1, "loader: 'datasets' needs at least one {path: <shard folder>, weight: 1.0}")
    for i, d in enumerate(cfg.datasets):
        _check(bool(d.path), f"loader: datasets[{i}].path is empty; give a shard folder holding index.json")
        _check(d.weight > 0, f"loader: datasets[{i}].weight={d.weight} must be > 0")
    _check(cfg.shuffle_window >= 0, "loader: shuffle_window must be >= 0")
    _check(cfg.samples_per_epoch >= 0, "loader: samples_per_epoch must be >= 0 (0 = sum of dataset sizes)")
    _check(cfg.num_workers >= 0, "loader: num_workers must be >= 0")
    _check(cfg.prefetch_factor >= 1, "loader: prefetch_factor must be >= 1")
    _check(cfg.worker_chunk >= 1, "loader: worker_chunk must be >= 1")
    _check(cfg.worker_start_method in ("fork", "forkserver", "spawn"),
           f"loader: worker_start_method='{cfg.worker_start_method}' must be fork, forkserver or spawn")
    _check(cfg.frames_dtype in ("uint8", "float32"), f"loader: frames_dtype='{cfg.frames_dtype}' must be uint8 or float32")
    _check(cfg.on_corrupt in ("error", "skip"), f"loader: on_corrupt='{cfg.on_corrupt}' must be error or skip")


def load_sharding_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> ShardingConfig:
    cfg = load_structured(ShardingConfig, path, overrides)
    validate_sharding(cfg)
    return cfg


def _merged(schema_cls: type, cfg: Any, where: str) -> Any:
    """``cfg`` (dataclass instance, dict or OmegaConf node) merged onto a fresh typed schema."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = dataclasses.asdict(cfg)  # also turns nested dicts-in-dataclasses into plain data
    schema = OmegaConf.structured(schema_cls)
    try:
        return OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as e:
        raise wrap_config_error(e, schema, where) from None


def as_sharding_config(cfg: Any) -> ShardingConfig:
    """Accept a ``ShardingConfig`` dataclass, an OmegaConf node or a plain dict; validate it."""
    cfg = _merged(ShardingConfig, cfg, "sharding config")
    validate_sharding(cfg)
    return cfg  # type: ignore[return-value]


def as_loader_config(cfg: Any) -> LoaderConfig:
    """Accept a ``LoaderConfig`` dataclass, an OmegaConf node or a plain dict; validate it."""
    cfg = _merged(LoaderConfig, cfg, "loader config")
    validate_loader(cfg)
    return cfg  # type: ignore[return-value]

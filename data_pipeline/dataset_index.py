"""Read ``index.json`` of a shard folder into arrays the loader and planners use.

The index is the contract between the sharding job and everything downstream: per sample its
shard, key, frame count and token numbers, so epoch plans, step counts and token budgets are
computed without opening a tar.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional
from pathlib import Path

import numpy as np

from data_pipeline.errors import DatasetIndexError
from stts_dist.stts import budget

INDEX_FILE = "index.json"


@dataclass
class DatasetIndex:
    name: str
    root: Path
    shard_names: list[str]        # (S,)
    shard_bytes: np.ndarray       # (S,) int64, sizes recorded when the shards were written
    shard_of_sample: np.ndarray   # (N,) int64 index into shard_names
    keys: list[str]               # (N,)
    ids: list[str]                # (N,)
    tasks: list[str]              # (N,)
    frames: np.ndarray            # (N,) int64
    patches_per_frame: np.ndarray  # (N,) int64
    groups_per_frame: np.ndarray  # (N,) int64
    text_tokens: np.ndarray       # (N,) int64
    is_video: np.ndarray          # (N,) bool
    config: dict
    turns: Optional[np.ndarray] = None   # (N,) int64 follow-up turns; None: an index written before they were counted

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def vit_tokens(self) -> np.ndarray:
        """(N,) patches the ViT sees per sample before pruning: frames * patches_per_frame."""
        return self.frames * self.patches_per_frame

    @property
    def llm_visual_tokens_unpruned(self) -> np.ndarray:
        """(N,) LLM visual tokens per sample before pruning: frames * groups_per_frame."""
        return self.frames * self.groups_per_frame

    def llm_visual_tokens(self, prune_ratio: float) -> np.ndarray:
        """(N,) LLM visual tokens per sample after STTS prunes ``prune_ratio`` of each video
        (``stts_dist.stts.budget``): the budget of any ratio from what the shards store. Raises
        ValueError naming the shortest clip when a video is too short to keep its first frame."""
        return np.array([budget.llm_visual_tokens(int(g), int(t), prune_ratio, bool(v))
                         for g, t, v in zip(self.groups_per_frame, self.frames, self.is_video)], dtype=np.int64)

    def shard_path(self, shard: int) -> Path:
        return self.root / self.shard_names[shard]


def load_index(shard_dir: str | Path, name: str = "") -> DatasetIndex:
    root = Path(shard_dir)
    path = root / INDEX_FILE
    if not path.is_file():
        raise DatasetIndexError(f"{path} not found: {root} is not a finished shard folder. Build it with "
                                f"python -m data_pipeline.build_shards manifest=<manifest.jsonl> out_dir={root}")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetIndexError(f"{path} is not valid JSON ({e}); rerun the sharding job to rewrite it") from None
    shard_names = [s["name"] for s in index["shards"]]
    position = {n: i for i, n in enumerate(shard_names)}
    rows = index["samples"]
    if not rows:
        raise DatasetIndexError(f"{path} lists no samples; every source video was skipped (see {root / 'errors.jsonl'})")
    missing = [n for n in shard_names if not (root / n).is_file()]
    if missing:
        raise DatasetIndexError(f"{root}: {len(missing)} shard(s) listed in {INDEX_FILE} are missing "
                                f"(first: {missing[0]}); restore them or rebuild the folder")
    try:
        shard_of_sample = np.array([position[r["shard"]] for r in rows], dtype=np.int64)
    except KeyError as e:
        raise DatasetIndexError(f"{path}: a sample names shard {e} that is not in the shard list") from None

    def col(key: str, dtype=np.int64) -> np.ndarray:
        return np.array([r[key] for r in rows], dtype=dtype)

    return DatasetIndex(
        name=name or root.name, root=root, shard_names=shard_names,
        shard_bytes=np.array([s["bytes"] for s in index["shards"]], dtype=np.int64),
        shard_of_sample=shard_of_sample, keys=[r["key"] for r in rows], ids=[r["id"] for r in rows],
        tasks=[r["task"] for r in rows], frames=col("frames"), patches_per_frame=col("patches_per_frame"),
        groups_per_frame=col("groups_per_frame"),
        text_tokens=col("text_tokens"), is_video=col("is_video", bool), config=index.get("config", {}),
        turns=col("turns") if all("turns" in r for r in rows) else None)

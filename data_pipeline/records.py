"""Per-sample shard record: the JSON written next to the frames and the index row derived from it.

The record carries every number a token budget is computed from without decoding pixels: frame
count, patches and groups per frame, and text tokens. It records no pruning ratio: the LLM visual
tokens of any method and ratio follow from these at load time (``stts_dist/stts/budget.py``,
``DatasetIndex.llm_visual_tokens``), so one shard folder serves pruned and unpruned runs alike.
"""
from __future__ import annotations

import io
import json
from typing import Any, Callable

import numpy as np

from data_pipeline.manifest import ManifestEntry
from data_pipeline.video import DecodedClip
from stts_dist.stts import budget
from stts_dist.tokenizer import WORD_SPLIT_NAME, word_pieces

RECORD_VERSION = 2
# The index row: what the loader and the balancer read for every sample.
INDEX_FIELDS = ("shard", "key", "id", "task", "frames", "patches_per_frame", "groups_per_frame",
                "text_tokens", "is_video", "turns")   # turns: the number of follow-up turns


def text_token_counter() -> tuple[Callable[[str], int], str]:
    """``(count(text) -> int, name)``: the words a text splits into under the project's word
    tokenizer (punctuation split off). A word tokenizer gives one token per piece whatever its
    vocabulary, so the count holds for the vocabulary learned from the same manifest. The name
    is stored in the shard plan, so shards counted by another splitting never mix."""
    return (lambda text: len(word_pieces(text))), WORD_SPLIT_NAME


def count_text_tokens(entry: ManifestEntry, count: Callable[[str], int]) -> int:
    """Tokens of every question and answer of the conversation (specials excluded)."""
    return sum(count(t) for t in entry.texts)


def effective_fps(timestamps: list[float], requested_fps: float, native_fps: float) -> float:
    """Rate of the sampled frames: measured from their timestamps when there are two or more."""
    if len(timestamps) >= 2 and timestamps[-1] > timestamps[0]:
        return round((len(timestamps) - 1) / (timestamps[-1] - timestamps[0]), 4)
    return float(requested_fps or native_fps)


def build_record(entry: ManifestEntry, clip: DecodedClip, key: str, cfg: Any, text_tokens: int) -> dict[str, Any]:
    """The ``{key}.json`` member. ``cfg`` is a ShardingConfig."""
    frames = int(clip.frames.shape[0])
    patches = (cfg.image_size // cfg.patch_size) ** 2
    groups = budget.groups_per_frame(cfg.image_size, cfg.patch_size, cfg.pool_size)
    is_video = frames > 1
    return {
        "version": RECORD_VERSION, "key": key, "id": entry.id, "line": entry.line, "task": entry.task,
        "question": entry.question, "answer": entry.answer,
        "turns": [{"question": q, "answer": a} for q, a in entry.turns],
        "meta": entry.meta, "source": entry.video_ref,
        "clip_start": entry.start, "clip_end": entry.end,
        "fps": effective_fps(clip.timestamps, cfg.fps, clip.native_fps),
        "native_fps": round(clip.native_fps, 4), "timestamps": clip.timestamps,
        "original_size": list(clip.original_size), "codec": clip.codec,
        "image_size": cfg.image_size, "frame_format": cfg.frame_format,
        "frames": frames, "patches_per_frame": patches, "groups_per_frame": groups,
        "text_tokens": text_tokens, "is_video": is_video,
    }


def index_row(record: dict[str, Any], shard: str) -> dict[str, Any]:
    row = {k: record[k] for k in INDEX_FIELDS if k not in ("shard", "turns")}
    row["shard"], row["turns"] = shard, len(record["turns"])
    return {k: row[k] for k in INDEX_FIELDS}


def frame_member_name(index: int, frame_format: str) -> str:
    return f"{index:03d}.{'jpg' if frame_format == 'jpeg' else 'npy'}"


def encode_frame(frame: np.ndarray, frame_format: str, jpeg_quality: int) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes, or ``.npy`` bytes (no pickle: plain uint8 array)."""
    buf = io.BytesIO()
    if frame_format == "jpeg":
        from PIL import Image
        # 4:4:4 chroma: small frames lose visibly more detail with the default 4:2:0.
        Image.fromarray(frame).save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    else:
        np.save(buf, np.ascontiguousarray(frame, dtype=np.uint8), allow_pickle=False)
    return buf.getvalue()


def encode_members(key: str, clip: DecodedClip, record: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """The WebDataset sample: ``{"__key__": key, "json": ..., "000.jpg": ..., ...}`` of bytes."""
    sample: dict[str, Any] = {"__key__": key,
                              "json": json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")}
    for i, frame in enumerate(clip.frames):
        sample[frame_member_name(i, cfg.frame_format)] = encode_frame(frame, cfg.frame_format, cfg.jpeg_quality)
    return sample

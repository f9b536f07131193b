"""Statistics and a contact sheet of a shard folder (used by ``tools/inspect_shards.py``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.dataset_index import load_index
from data_pipeline.safe_decode import decode_sample
from data_pipeline.tar_reader import ShardReader


def _stats(values: np.ndarray) -> dict[str, float]:
    v = values.astype(np.float64)
    return {"min": float(v.min()), "mean": round(float(v.mean()), 3), "p50": float(np.percentile(v, 50)),
            "p95": float(np.percentile(v, 95)), "max": float(v.max()), "total": float(v.sum())}


def summarize(shard_dir: str | Path) -> dict[str, Any]:
    """Counts (samples, shards, bytes, skipped by reason, per task) and token statistics."""
    index = load_index(shard_dir)
    errors_path = Path(shard_dir) / "errors.jsonl"
    skipped: dict[str, int] = {}
    if errors_path.is_file():
        for line in errors_path.read_text().splitlines():
            if line.strip():
                kind = json.loads(line)["kind"]
                skipped[kind] = skipped.get(kind, 0) + 1
    tasks: dict[str, int] = {}
    for t in index.tasks:
        tasks[t] = tasks.get(t, 0) + 1
    return {
        "shard_dir": str(shard_dir), "samples": len(index), "shards": len(index.shard_names),
        "bytes": int(index.shard_bytes.sum()), "skipped": sum(skipped.values()), "skipped_by_kind": skipped,
        "videos": int(index.is_video.sum()), "per_task": tasks, "config": index.config,
        "frames": _stats(index.frames), "vit_tokens": _stats(index.vit_tokens),
        "llm_visual_tokens_unpruned": _stats(index.llm_visual_tokens_unpruned), "text_tokens": _stats(index.text_tokens),
    }


def contact_sheet(shard_dir: str | Path, out_png: str | Path, num_samples: int = 4, max_frames: int = 8,
                  gap: int = 2) -> tuple[int, int]:
    """PNG grid: one row per sample (the first ``num_samples`` of the index), up to ``max_frames``
    frames per row, each row captioned with id / task / answer. Returns the image (width, height)."""
    from PIL import Image, ImageDraw

    index = load_index(shard_dir)
    reader = ShardReader()
    rows = []
    try:
        for i in range(min(num_samples, len(index))):
            shard = int(index.shard_of_sample[i])
            raw = reader.read(index.shard_path(shard), index.keys[i], int(index.shard_bytes[shard]))
            decoded = decode_sample(raw)
            rows.append((decoded["frames"][:max_frames], decoded["json"]))
    finally:
        reader.close()
    size = rows[0][0].shape[1]
    caption = 12
    cols = max(len(f) for f, _ in rows)
    width = cols * (size + gap) + gap
    height = len(rows) * (size + caption + gap) + gap
    sheet = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for r, (frames, record) in enumerate(rows):
        top = gap + r * (size + caption + gap)
        draw.text((gap, top), f"{record['id']} [{record['task']}] -> {record['answer']}"[:80], fill=(230, 230, 230))
        for c, frame in enumerate(frames):
            sheet.paste(Image.fromarray(frame), (gap + c * (size + gap), top + caption))
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return sheet.size

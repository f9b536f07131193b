"""Synthetic video source: real H.264 mp4 files + ``manifest.jsonl`` from the moving-digits task.

    python -m data_pipeline.synth_digits --out data/digits --num 1000 --frames 8 --image-size 64 --seed 0

Each sample comes from ``stts_dist.data.digits.make_sample(index, seed, ...)`` (deterministic in
``(seed, index)``) and is encoded with libx264 / yuv420p at the sample's fps, so the sharding
job exercises the same decode path as real footage. The output feeds
``python -m data_pipeline.build_shards manifest=<out>/manifest.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import numpy as np

from data_pipeline.shard_io import atomic_write_bytes
from stts_dist.config import DataConfig
from stts_dist.data.digits import clip_frames, make_sample

SampleFn = Callable[..., dict[str, Any]]


def even_frames(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height: replicate the last row/column when odd. (T,H,W,3)."""
    _, h, w, _ = frames.shape
    pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
    return np.pad(frames, pad, mode="edge") if h % 2 or w % 2 else frames


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 12) -> None:
    """Encode (T, H, W, 3) uint8 RGB frames as H.264 (libx264, yuv420p) at ``fps``.

    Single-threaded x264 so the same frames always give the same bytes."""
    import av

    frames = even_frames(np.asarray(frames, dtype=np.uint8))
    path = Path(path)
    tmp = path.with_name(path.name + ".partial.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def default_sample_fn() -> SampleFn:
    return make_sample


def write_synthetic(out: str | Path, num: int, frames: int, image_size: int, seed: int,
                    tasks: list[str] | None = None, split: str = "train",
                    sample_fn: SampleFn | None = None, min_frames: int = 0) -> Path:
    """Write ``num`` mp4 files under ``out/videos`` and ``out/manifest.jsonl``; returns the manifest path.

    ``sample_fn(index, seed, num_frames, image_size, tasks, split=...)`` returns
    ``{"frames": (T,H,W,3) uint8, "question", "answer", "id", "task", "fps"}`` (and ``turns``,
    follow-up questions written to the manifest, when it has them). With
    ``min_frames`` the clips vary in length, ``min_frames`` .. ``frames``, by the same seeded rule
    as the in-memory digits (``stts_dist.data.digits.clip_frames``)."""
    if num < 1 or frames < 1 or image_size < 2:
        raise ValueError(f"need num >= 1, frames >= 1, image_size >= 2 (got {num}, {frames}, {image_size})")
    sample_fn = sample_fn or default_sample_fn()
    if tasks is None:
        tasks = list(DataConfig().tasks)
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(num):
        sample = sample_fn(index, seed, clip_frames(index, seed, frames, min_frames), image_size, tasks, split=split)
        rel = f"videos/{sample['id']}.mp4"
        write_mp4(out / rel, sample["frames"], float(sample["fps"]))
        entry = {"video": rel, "question": sample["question"], "answer": sample["answer"],
                 "id": sample["id"], "task": sample["task"]}
        if sample.get("turns"):      # follow-up questions (make_sample's follow_ups)
            entry["turns"] = sample["turns"]
        entry["meta"] = {"generator": "digits", "seed": seed, "index": index, "split": split}
        lines.append(json.dumps(entry))
    manifest = out / "manifest.jsonl"
    atomic_write_bytes(manifest, ("\n".join(lines) + "\n").encode("utf-8"))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.synth_digits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (videos/ and manifest.jsonl)")
    p.add_argument("--num", type=int, required=True, help="number of videos")
    p.add_argument("--frames", type=int, default=8, help="frames per video (the most, with --min-frames)")
    p.add_argument("--min-frames", type=int, default=0, help="> 0: videos of a seeded length in [min-frames, frames]")
    p.add_argument("--image-size", type=int, default=64, help="frame width and height in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default="", help="comma-separated subset of tasks (default: all)")
    p.add_argument("--split", default="train", choices=("train", "eval"))
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t] or None
    manifest = write_synthetic(args.out, args.num, args.frames, args.image_size, args.seed, tasks, args.split,
                               min_frames=args.min_frames)
    print(json.dumps({"manifest": str(manifest), "videos": args.num}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Measure the data loader's throughput (samples/s, visual tokens/s) with N DataLoader workers.

    python tools/bench_loader.py --shards data/digits_shards --workers 2 --steps 50 --batch-size 8
    python tools/bench_loader.py --synthetic 256 --workers 2      # builds a temporary digits set first

The last line is one JSON object with at least ``loader_samples_per_s``. Compare it with the
trainer's consumption rate: a loader slower than the trainer means training waits on decoding.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from data_pipeline.bench import measure_loader  # noqa: E402,F401  (re-exported for callers)


def build_synthetic_shards(root: Path, num: int, frames: int, image_size: int) -> Path:
    """Synthetic digits mp4s -> shards under ``root`` (local Ray); returns the shard folder."""
    from data_pipeline.build_shards import build_shards
    from data_pipeline.config import load_sharding_config
    from data_pipeline.synth_digits import write_synthetic

    manifest = write_synthetic(root / "videos", num, frames, image_size, seed=0)
    cfg = load_sharding_config(None, [f"manifest={manifest}", f"out_dir={root / 'shards'}", "fps=0",
                                      f"max_frames={frames}", f"image_size={image_size}", "progress_bar=false"])
    build_shards(cfg)
    return root / "shards"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="shard folder (index.json + shard-*.tar)")
    src.add_argument("--synthetic", type=int, help="build a temporary synthetic set of this many videos")
    p.add_argument("--workers", type=int, default=2, help="torch DataLoader workers")
    p.add_argument("--steps", type=int, default=50, help="timed batches (after one warm-up batch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--frames", type=int, default=8, help="--synthetic: frames per video")
    p.add_argument("--image-size", type=int, default=64, help="--synthetic: frame size")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        shards = Path(args.shards) if args.shards else build_synthetic_shards(
            Path(tmp), args.synthetic, args.frames, args.image_size)
        result = measure_loader({"datasets": [{"path": str(shards)}]}, args.workers, args.steps, args.batch_size)
    result["shards"] = args.shards or f"synthetic:{args.synthetic}"
    print(f"loader: {result['loader_samples_per_s']} samples/s, {result['loader_llm_visual_tokens_per_s']} "
          f"LLM visual tokens/s, {result['loader_vit_tokens_per_s']} ViT tokens/s with {args.workers} workers",
          file=sys.stderr)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

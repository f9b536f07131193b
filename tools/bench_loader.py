#!/usr/bin/env python
"""Measure the data loader's throughput (samples/s, visual tokens/s) with N DataLoader workers.

    python tools/bench_loader.py --shards data/digits_shards --workers 2 --steps 50 --batch-size 8
    python tools/bench_loader.py --synthetic 256 --workers 2      # builds a temporary digits set first

The last line is one JSON object with at least ``loader_samples_per_s`` and, measured in the same
run on the same shards, ``trainer_samples_per_s`` (single-process training steps of ``--config``'s
model) and their ratio ``loader_over_trainer``: below 1 means training waits on decoding.
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


def measure_trainer(config: str, shards: Path, batch_size: int, steps: int, overrides: list[str]) -> dict:
    """The trainer's consumption rate on the same shards: single-process training steps of the
    config's model on pre-loaded batches (loading excluded), after one warm-up step."""
    import time

    import torch

    from data_pipeline.loader import VideoLoader
    from stts_dist.config import load_config
    from stts_dist.train.trainer import Trainer, _Collate

    cfg = load_config(config, ["data.source=digits", "tracking.enabled=false", "train.progress_bar=false",
                               f"train.batch_size={batch_size}", "train.out_dir=/tmp/bench_loader_trainer",
                               f"train.steps={steps + 1}"] + overrides)
    trainer = Trainer(cfg, callbacks=[])
    collate = _Collate(trainer.builder)
    it = VideoLoader({"datasets": [{"path": str(shards)}], "num_workers": 0}).iter_batches(batch_size, collate, epochs=None)
    batches = [next(it) for _ in range(steps + 1)]
    gen = torch.Generator().manual_seed(0)
    trainer.module.train_step(batches[0], 0, gen)
    t = time.perf_counter()
    for i, b in enumerate(batches[1:], 1):
        trainer.module.train_step(b, i, gen)
    dt = time.perf_counter() - t
    return {"trainer_samples_per_s": round(steps * batch_size / dt, 2), "trainer_config": config,
            "torch_threads": torch.get_num_threads()}


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
    p.add_argument("--config", default="jobs/default.yaml",
                   help="also measure this run config's training consumption rate on the same shards ('' to skip)")
    p.add_argument("--trainer-steps", type=int, default=5)
    p.add_argument("overrides", nargs="*", help="key=value overrides of --config")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        shards = Path(args.shards) if args.shards else build_synthetic_shards(
            Path(tmp), args.synthetic, args.frames, args.image_size)
        result = measure_loader({"datasets": [{"path": str(shards)}]}, args.workers, args.steps, args.batch_size)
        if args.config:
            result.update(measure_trainer(args.config, shards, args.batch_size, args.trainer_steps, args.overrides))
            result["loader_over_trainer"] = round(result["loader_samples_per_s"] / result["trainer_samples_per_s"], 2)
    result["shards"] = args.shards or f"synthetic:{args.synthetic}"
    print(f"loader: {result['loader_samples_per_s']} samples/s, {result['loader_llm_visual_tokens_per_s']} "
          f"LLM visual tokens/s, {result['loader_vit_tokens_per_s']} ViT tokens/s with {args.workers} workers",
          file=sys.stderr)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``stts-train --config jobs/default.yaml [key=value ...]`` (also ``python -m stts_dist.train``)."""
from __future__ import annotations

import argparse
import json
import sys

from stts_dist.config import ConfigError, load_config


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Train a video VLM with STTS token pruning")
    ap.add_argument("--config", default="jobs/default.yaml", help="run config (YAML under jobs/)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.stts.prune_ratio=0.8")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from stts_dist.train.trainer import Preempted, Trainer
    trainer = Trainer(cfg)
    try:
        results = trainer.fit()
    except Preempted as e:
        print(f"[train] {e}; checkpoint written, resume by starting the same command again", flush=True)
        return Preempted.exit_code
    if trainer.is_rank0:
        _print_summary(cfg, results)
    return 0


def _print_summary(cfg, results: dict) -> None:
    rows = sorted({k.split("/")[1] for k in results if k.startswith("eval/")})
    print("\n=== eval accuracy (exact match) ===")
    print(f"{'inference':<22}{'acc':>8}{'LLM visual tokens/sample':>28}")
    for tag in rows:
        print(f"{tag:<22}{results[f'eval/{tag}/acc']:>8.3f}{results[f'eval/{tag}/llm_visual_tokens']:>28.1f}")
    print(json.dumps({k: round(v, 4) for k, v in results.items() if k.endswith('/acc')}))


if __name__ == "__main__":
    sys.exit(main())

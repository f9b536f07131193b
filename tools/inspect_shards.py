#!/usr/bin/env python
"""Inspect a shard folder: counts, token statistics, and a contact sheet PNG of a few samples.

    python tools/inspect_shards.py data/digits_shards --contact-sheet runs/contact.png --samples 4

Prints a human summary, then (last line) the statistics as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from data_pipeline.errors import DataPipelineError  # noqa: E402
from data_pipeline.shard_stats import contact_sheet, summarize  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shard_dir", help="folder holding index.json and shard-*.tar")
    p.add_argument("--contact-sheet", default="", help="write a PNG grid of the first samples' frames here")
    p.add_argument("--samples", type=int, default=4, help="rows of the contact sheet")
    p.add_argument("--frames", type=int, default=8, help="frames per row of the contact sheet")
    args = p.parse_args(argv)
    try:
        stats = summarize(args.shard_dir)
        if args.contact_sheet:
            stats["contact_sheet"] = args.contact_sheet
            stats["contact_sheet_size"] = list(contact_sheet(args.shard_dir, args.contact_sheet, args.samples, args.frames))
    except DataPipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{stats['samples']} samples in {stats['shards']} shards ({stats['bytes'] / 1e6:.1f} MB), "
          f"{stats['skipped']} skipped {stats['skipped_by_kind'] or ''}; tasks {stats['per_task']}")
    for k in ("frames", "vit_tokens", "llm_visual_tokens_unpruned", "text_tokens"):
        s = stats[k]
        print(f"  {k:26s} min {s['min']:.0f}  mean {s['mean']:.1f}  p50 {s['p50']:.0f}  p95 {s['p95']:.0f}  "
              f"max {s['max']:.0f}  total {s['total']:.0f}")
    if args.contact_sheet:
        print(f"  contact sheet: {args.contact_sheet} {stats['contact_sheet_size']}")
    print(json.dumps(stats, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

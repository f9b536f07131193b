#!/usr/bin/env python
"""Which digit does a trained model name on held-out "which digit appears last ?" clips?

    .venv/bin/python tools/probe_order.py --checkpoint runs/default [--clips 150] [--frames 8]

Asks every held-out "last" clip both "which digit appears last ?" and "which digit appears
first ?", unpruned and with the model's own STTS setting, and prints one JSON line per (setting,
question): the share of answers that name a digit of the clip, and the share naming the digit that
appears first, second and last (from the generator's record of when each digit is first visible).
A model that reads appearance order names the last digit for one question and the first for the
other; one that does not names the same digit for both (docs/stts.md row 16).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stts_dist.data.batch import SequenceBuilder  # noqa: E402
from stts_dist.data.digits import FOLLOW_UPS, QUESTIONS, make_sample  # noqa: E402
from stts_dist.model.generate import generate  # noqa: E402
from stts_dist.trained_model import open_trained_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run folder or checkpoint the trainer wrote")
    p.add_argument("--clips", type=int, default=150)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=25)
    args = p.parse_args(argv)
    cfg, tok, model, _ = open_trained_model(args.checkpoint)
    size = cfg.model.vit.image_size
    clips, index = [], 0
    while len(clips) < args.clips:       # the held-out split's "last" clips, in index order
        s = make_sample(index, cfg.data.seed, args.frames, size, list(cfg.data.tasks), "eval", cfg.data.digit_style)
        index += 1
        if s["task"] == "last":
            clips.append(s)
    own = (model.budget.method, model.budget.prune_ratio)
    for method, ratio in dict.fromkeys([("none", 0.0), own]):
        build = SequenceBuilder(tok, model.budget.with_setting(method, ratio, None), size)
        for name, question in (("last", QUESTIONS["last"]), ("first", FOLLOW_UPS["last"])):
            tally = collections.Counter()
            for k in range(0, len(clips), args.batch_size):
                chunk = [dict(s, question=question) for s in clips[k:k + args.batch_size]]
                with torch.no_grad():
                    ids, _ = generate(model, build(chunk, with_answer=False), tok.eos_id)
                for s, out in zip(chunk, ids):
                    answer = tok.decode(out).strip()
                    digits = [str(c) for c in s["objects"]["classes"]]
                    order = [digits[j] for j in np.argsort(s["objects"]["visible"].argmax(1), kind="stable")]
                    tally["in_clip"] += answer in digits
                    for rank, digit in zip(("first", "second", "last"), order):
                        tally[f"names_{rank}"] += answer == digit
            print(json.dumps({"setting": f"{method}@{ratio:g}", "question": name, "clips": len(clips),
                              **{k: round(v / len(clips), 3) for k, v in tally.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

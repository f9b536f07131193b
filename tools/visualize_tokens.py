"""Picture which visual tokens a trained checkpoint keeps on one clip.

    python tools/visualize_tokens.py --checkpoint runs/digits --video clip.mp4 --method scorer --out kept.png
    python tools/visualize_tokens.py --checkpoint runs/digits --digits-index 3 --method random,scorer \\
        --prune-ratio 0.7 --out kept.png --gif kept.gif

With several comma-separated methods, one picture per method (``kept_<method>.png``) and one
stacked picture (``--out``) are written, so methods can be compared on the same clip.
Only the ViT runs (up to the selection); no answer is generated (use stts-infer for that).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stts_dist.stts.selection import METHODS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run folder, its checkpoints/ folder, one step_* folder (1 process, ZeRO or TP x DP) or a consolidated .safetensors")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="video file")
    src.add_argument("--digits-index", type=int, help="sample index of the built-in digits eval split")
    p.add_argument("--method", default=None, help=f"one or more of {','.join(METHODS)} (default: the model's)")
    p.add_argument("--prune-ratio", type=float, default=None, help="fraction pruned (default: the model's)")
    p.add_argument("--frames", type=int, default=None, help="frames sampled (default: data.num_frames)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--gif", default=None, help="also write an animated GIF (first method)")
    p.add_argument("--cell", type=int, default=128, help="frame tile size in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the 'random' method")
    p.add_argument("--no-verify", action="store_true", help="skip the checkpoint checksum verification")
    return p


def run(argv: Optional[Sequence[str]] = None) -> list[Path]:
    import numpy as np
    import torch

    from stts_dist.trained_model import open_trained_model
    from stts_dist.infer import InferenceInputError, load_video_frames
    from stts_dist.visualize import kept_tokens, render_gif, render_kept_tokens, sample_object_groups, side_by_side

    args = build_parser().parse_args(argv)
    cfg, _, model, _ = open_trained_model(args.checkpoint, verify=not args.no_verify)
    methods = [m.strip() for m in (args.method or cfg.model.stts.method).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise InferenceInputError(f"--method {bad}: choose from {','.join(METHODS)}")
    ratio = cfg.model.stts.prune_ratio if args.prune_ratio is None else args.prune_ratio
    if not 0.0 <= ratio < 1.0:
        raise InferenceInputError(f"--prune-ratio {ratio} must be in [0, 1)")
    T = args.frames or cfg.data.num_frames
    objects = None
    if args.video:
        frames, name = load_video_frames(args.video, T, cfg.model.vit.image_size), Path(args.video).name
    else:
        from stts_dist.data.digits import make_sample
        s = make_sample(args.digits_index, cfg.data.seed, T, cfg.model.vit.image_size, list(cfg.data.tasks), split="eval",
                        style=cfg.data.digit_style)
        frames, name = s["frames"], f"digits eval #{args.digits_index}: {s['question']} -> {s['answer']}"
        objects = sample_object_groups(model, s)
    budgets = [model.budget.with_setting(m, ratio) for m in methods]
    clip_frames = int(frames.shape[0])
    try:
        for b in budgets:   # every setting checked before any picture is written
            b.llm_visual_tokens(clip_frames, clip_frames > 1)
    except ValueError as e:
        raise InferenceInputError(str(e)) from None
    out = Path(args.out)
    written = []
    for m, b in zip(methods, budgets):
        kept = kept_tokens(model, np.asarray(frames), b, torch.Generator().manual_seed(args.seed))
        path = out if len(methods) == 1 else out.with_name(f"{out.stem}_{m}{out.suffix or '.png'}")
        written.append(render_kept_tokens(frames, kept, path, f"{name}  method={m} prune_ratio={b.prune_ratio:g}",
                                          args.cell, objects=objects))
        if args.gif and m == methods[0]:
            written.append(render_gif(frames, kept, args.gif, args.cell))
    if len(methods) > 1:
        written.append(side_by_side([p for p in written if p.suffix == ".png"], out))
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    from stts_dist.checkpoint_io import CheckpointLoadError
    from stts_dist.infer import InferenceInputError

    try:
        for p in run(argv):
            print(p)
    except (InferenceInputError, CheckpointLoadError) as e:
        raise SystemExit(f"visualize_tokens: error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())

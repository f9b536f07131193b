"""Stage 0: pre-train the video ViT to read digits, then export it as a SigLIP-format folder.

Real STTS models start from a pre-trained vision tower (SigLIP) and a pre-trained LLM; the video
QA stage only teaches them to work together. A ViT trained from scratch through the LM loss of a
one-word answer sees ~1 label per clip and, on 2 CPU cores, needs far more than an hour before it
tells digits apart (measured: single-digit "which digit is shown ?" stays at chance after 4,800
clips). This module gives the moving-digits task the same set-up as the paper's: a cheap
image-level pre-training of the ViT on the *training* split's digit images (which digit is in
the frame: one digit per frame, softmax over ten classes -- it learned ~2x faster per frame than a
multi-label 1-3 digit variant, measured), written with :func:`stts_dist.weights.hf_vit.export_hf_vit`
so that ``model.pretrained.vit_path`` loads it like any SigLIP checkpoint.

    python -m stts_dist.train.vit_pretrain --config jobs/study_digits.yaml --out runs/study/vit_digits [--steps 3000]

Frames are drawn like the QA clips' frames (same textured backgrounds, sprite size and colours,
random positions); the held-out check uses the eval split's digit images, which neither this
stage nor the QA training ever sees.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from stts_dist.ops.pooling import MeanQueryAttentionPool
from stts_dist.model.vit import VideoViT

NUM_CLASSES = 10


def digit_frames(count: int, seed: int, image_size: int, split: str = "train",
                 max_digits: int = 1, style: str = "mnist") -> tuple[np.ndarray, np.ndarray]:
    """``(frames uint8 (count, S, S, 3), labels float32 (count, 10) multi-hot)``: 1..max_digits
    digits of distinct classes at random positions over a task background. Deterministic in
    ``(seed, split)``; ``split`` selects the same 90/10 split of digit images as the QA task."""
    from stts_dist.data.digits import (_background, _digit_sprite, _printed_sprite, load_mnist, split_digit_indices,
                                       sprite_size)

    images, _ = load_mnist()
    by_class = split_digit_indices(split)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, 7])
    S = image_size
    px = sprite_size(S)                       # the QA clips' sprite size
    frames = np.empty((count, S, S, 3), np.uint8)
    target = np.zeros((count, NUM_CLASSES), np.float32)
    for i in range(count):
        f = _background(rng, S)
        n = int(rng.integers(1, max_digits + 1))
        for c in rng.choice(NUM_CLASSES, size=n, replace=False):
            sprite = (_digit_sprite(images, int(rng.choice(by_class[c])), px) if style == "mnist"
                      else _printed_sprite(int(c), px, rng))[..., None]
            y, x = rng.integers(0, S - px + 1, size=2)
            color = rng.uniform(0.7, 1.0, size=3).astype(np.float32)
            f[y:y + px, x:x + px] = f[y:y + px, x:x + px] * (1 - sprite) + sprite * color
            target[i, c] = 1.0
        frames[i] = (np.clip(f, 0, 1) * 255).astype(np.uint8)
    return frames, target


class DigitProbe(nn.Module):
    """ViT + attention pooling + linear: frames (B, 3, S, S) in [-1, 1] -> logits (B, 10)."""

    def __init__(self, vit: VideoViT, heads: int):
        super().__init__()
        self.vit = vit
        self.norm = nn.LayerNorm(vit.width)
        self.pool = MeanQueryAttentionPool(vit.width, heads)
        self.head = nn.Linear(vit.width, NUM_CLASSES)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.vit(frames)                                    # (B, N, D)
        for block in self.vit.blocks:
            x = block(x)
        valid = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
        return self.head(self.pool(self.norm(x), valid))


def to_input(frames: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [-1, 1], like the QA batches."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


@torch.no_grad()
def evaluate(probe: DigitProbe, frames: np.ndarray, target: np.ndarray, batch: int = 128) -> dict[str, float]:
    """Top-1 accuracy on one-digit frames (``target`` one-hot (B, 10))."""
    probe.eval()
    pred = torch.cat([probe(to_input(frames[i:i + batch])).argmax(1) for i in range(0, len(frames), batch)])
    probe.train()
    return {"top1_acc": float((pred.numpy() == target.argmax(1)).mean())}


def pretrain(vit_cfg: Any, steps: int, batch_size: int, lr: float, seed: int, eval_frames: int = 512,
             log_every: int = 100, log=print, style: str = "mnist") -> tuple[VideoViT, dict[str, Any]]:
    """Train a fresh ViT of ``vit_cfg`` (a ViTConfig) to name the digit of one-digit frames;
    returns the ViT and a report with the held-out top-1 accuracy before and after."""
    torch.manual_seed(seed)
    vit = VideoViT(vit_cfg.image_size, vit_cfg.patch_size, vit_cfg.width, vit_cfg.depth, vit_cfg.heads,
                   vit_cfg.mlp_dim, vit_cfg.in_channels, vit_cfg.layer_norm_eps, vit_cfg.gelu)
    for m in vit.modules():   # the VLM's init (stts_dist.model.vlm): 1/sqrt(fan_in) linears
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=m.in_features ** -0.5)
            nn.init.zeros_(m.bias)
    probe = DigitProbe(vit, vit_cfg.heads)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    held_out = digit_frames(eval_frames, seed, vit_cfg.image_size, split="eval", style=style)
    report: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                              "eval_frames": eval_frames, "style": style, "before": evaluate(probe, *held_out)}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        frames, target = digit_frames(batch_size, seed * 1_000_003 + step, vit_cfg.image_size, split="train",
                                      style=style)
        loss = F.cross_entropy(probe(to_input(frames)), torch.from_numpy(target.argmax(1)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(probe.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            acc = evaluate(probe, *held_out) if step % (4 * log_every) == 0 else None
            log(f"[vit-pretrain] step {step}/{steps} loss={loss.item():.4f} {time.perf_counter() - t0:.0f}s"
                + (f" held-out top-1 acc {acc['top1_acc']:.3f}" if acc else ""))
    report["after"] = evaluate(probe, *held_out)
    report["seconds"] = time.perf_counter() - t0
    return vit, report


def main(argv: Optional[Sequence[str]] = None) -> int:
    from stts_dist.config import ConfigError, load_config
    from stts_dist.weights.hf_vit import export_hf_vit

    ap = argparse.ArgumentParser(description="Pre-train the ViT of a run config to read digits (stage 0)")
    ap.add_argument("--config", required=True, help="run config whose model.vit is pre-trained")
    ap.add_argument("--out", required=True, help="output folder (SigLIP format; use as model.pretrained.vit_path)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or not args.lr > 0:
        raise SystemExit("vit_pretrain: error: --steps and --batch-size must be >= 1 and --lr > 0")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"vit_pretrain: error: {e}") from None
    vit, report = pretrain(cfg.model.vit, args.steps, args.batch_size, args.lr, args.seed, style=cfg.data.digit_style)
    out = export_hf_vit(vit, args.out)
    (Path(out) / "pretrain_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"[vit-pretrain] held-out top-1 accuracy {report['before']['top1_acc']:.3f} -> "
          f"{report['after']['top1_acc']:.3f} in {report['seconds']:.0f}s; wrote {out} "
          f"(model.pretrained.vit_path={out})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

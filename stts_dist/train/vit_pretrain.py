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

from stts_dist.config import STAGE0_OBJECTIVES as OBJECTIVES
from stts_dist.ops.pooling import MeanQueryAttentionPool
from stts_dist.model.vit import VideoViT

NUM_CLASSES = 10
BACKGROUND = NUM_CLASSES     # the patch label of a patch without (enough) ink
MIN_INK_SHARE = 0.1          # share of a patch's pixels that must be a digit's ink to label it with that digit


def digit_frames(count: int, seed: int, image_size: int, split: str = "train",
                 max_digits: int = 1, style: str = "mnist", patch_size: int = 0):
    """``(frames uint8 (count, S, S, 3), labels float32 (count, 10) multi-hot)``: 1..max_digits
    digits of distinct classes at random positions over a task background. Deterministic in
    ``(seed, split)``; ``split`` selects the same 90/10 split of digit images as the QA task.

    With ``patch_size`` > 0 a third array comes back: ``patch_labels int64 (count, (S/p)**2)``,
    the class whose ink (sprite alpha > STROKE_ALPHA, the later-drawn digit on top) covers the
    most pixels of each patch in raster order, or ``BACKGROUND`` (10) when fewer than
    ``MIN_INK_SHARE`` of the patch is ink."""
    from stts_dist.data.digits import (STROKE_ALPHA, _background, _digit_sprite, _printed_sprite, load_mnist,
                                       split_digit_indices, sprite_size)

    images, _ = load_mnist()
    by_class = split_digit_indices(split)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, 7])
    S = image_size
    px = sprite_size(S)                       # the QA clips' sprite size
    frames = np.empty((count, S, S, 3), np.uint8)
    target = np.zeros((count, NUM_CLASSES), np.float32)
    grid = S // patch_size if patch_size else 0
    patch_labels = np.full((count, grid * grid), BACKGROUND, np.int64)
    for i in range(count):
        f = _background(rng, S)
        owner = np.full((S, S), BACKGROUND, np.int64)     # whose ink each pixel shows
        n = int(rng.integers(1, max_digits + 1))
        for c in rng.choice(NUM_CLASSES, size=n, replace=False):
            sprite = (_digit_sprite(images, int(rng.choice(by_class[c])), px) if style == "mnist"
                      else _printed_sprite(int(c), px, rng))[..., None]
            y, x = rng.integers(0, S - px + 1, size=2)
            color = rng.uniform(0.7, 1.0, size=3).astype(np.float32)
            f[y:y + px, x:x + px] = f[y:y + px, x:x + px] * (1 - sprite) + sprite * color
            owner[y:y + px, x:x + px][sprite[..., 0] > STROKE_ALPHA] = c
            target[i, c] = 1.0
        frames[i] = (np.clip(f, 0, 1) * 255).astype(np.uint8)
        if grid:
            # (grid, p, grid, p) -> per-patch ink count of every class (+ background last)
            per_patch = owner[:grid * patch_size, :grid * patch_size].reshape(grid, patch_size, grid, patch_size)
            counts = np.stack([(per_patch == k).sum(axis=(1, 3)) for k in range(NUM_CLASSES)], -1).reshape(-1, NUM_CLASSES)
            inked = counts.max(1) >= MIN_INK_SHARE * patch_size * patch_size
            patch_labels[i] = np.where(inked, counts.argmax(1), BACKGROUND)
    if grid:
        return frames, target, patch_labels
    return frames, target


class DigitProbe(nn.Module):
    """ViT + two heads: frames (B, 3, S, S) in [-1, 1] -> ``(frame logits (B, 10), patch logits
    (B, N, 11))``. The frame head (attention pooling + linear) names the digit of a one-digit frame;
    the patch head (linear on every final token, raster order, class 10 = background) names the
    digit under each patch -- what the VLM's connector reads, token by token."""

    def __init__(self, vit: VideoViT, heads: int):
        super().__init__()
        self.vit = vit
        self.norm = nn.LayerNorm(vit.width)
        self.pool = MeanQueryAttentionPool(vit.width, heads)
        self.head = nn.Linear(vit.width, NUM_CLASSES)
        self.patch_head = nn.Linear(vit.width, NUM_CLASSES + 1)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.vit(frames)                                    # (B, N, D)
        for block in self.vit.blocks:
            x = block(x)
        x = self.norm(x)
        valid = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
        return self.head(self.pool(x, valid)), self.patch_head(x)


def to_input(frames: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [-1, 1], like the QA batches."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def frame_prediction(frame_logits: torch.Tensor, patch_logits: torch.Tensor, objective: str) -> torch.Tensor:
    """The digit named for each one-digit frame, (B,): the frame head's argmax ("frame"), or the
    class with the most probability summed over the patches ("dense": its frame head is untrained)."""
    if objective == "frame":
        return frame_logits.argmax(1)
    return patch_logits.softmax(-1)[..., :NUM_CLASSES].sum(1).argmax(1)


@torch.no_grad()
def evaluate(probe: DigitProbe, frames: np.ndarray, target: np.ndarray, patch_labels: np.ndarray,
             objective: str = "frame", batch: int = 128) -> dict[str, float]:
    """Held-out one-digit frames: top-1 accuracy of the frame's digit (``target`` one-hot (B, 10))
    and the patch head's accuracy on the patches with ink (``patch_labels`` (B, N))."""
    probe.eval()
    preds, patch_preds = [], []
    for i in range(0, len(frames), batch):
        frame_logits, patch_logits = probe(to_input(frames[i:i + batch]))
        preds.append(frame_prediction(frame_logits, patch_logits, objective))
        patch_preds.append(patch_logits.argmax(-1))
    probe.train()
    pred, patch_pred = torch.cat(preds).numpy(), torch.cat(patch_preds).numpy()
    inked = patch_labels != BACKGROUND
    return {"top1_acc": float((pred == target.argmax(1)).mean()),
            "ink_patch_acc": float((patch_pred[inked] == patch_labels[inked]).mean())}


def pretrain(vit_cfg: Any, steps: int, batch_size: int, lr: float, seed: int, eval_frames: int = 512,
             log_every: int = 100, log=print, style: str = "mnist", objective: str = "frame",
             max_digits: int = 1) -> tuple[VideoViT, dict[str, Any]]:
    """Train a fresh ViT of ``vit_cfg`` (a ViTConfig) to read digits; returns the ViT and a report
    with the held-out accuracies before and after.

    ``objective`` "frame": name the digit of frames of 1..``max_digits`` digits with the frame head
    (softmax over ten classes; ``max_digits`` must be 1). "dense": name the digit under every patch
    (softmax over ten classes + background), frames of 1..``max_digits`` digits -- one label per
    patch instead of one per frame, and each token learns what it shows itself."""
    if objective not in OBJECTIVES:
        raise ValueError(f"stage-0 objective {objective!r}: choose one of {OBJECTIVES}")
    if objective == "frame" and max_digits != 1:
        raise ValueError("the 'frame' stage-0 objective names one digit per frame: max_digits must be 1 "
                         "(use objective 'dense' for frames of several digits)")
    torch.manual_seed(seed)
    vit = VideoViT(vit_cfg.image_size, vit_cfg.patch_size, vit_cfg.width, vit_cfg.depth, vit_cfg.heads,
                   vit_cfg.mlp_dim, vit_cfg.in_channels, vit_cfg.layer_norm_eps, vit_cfg.gelu,
                   vit_cfg.pos_embed_init)
    for m in vit.modules():   # the VLM's init (stts_dist.model.vlm): 1/sqrt(fan_in) linears
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=m.in_features ** -0.5)
            nn.init.zeros_(m.bias)
    probe = DigitProbe(vit, vit_cfg.heads)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    P = vit_cfg.patch_size
    held_out = digit_frames(eval_frames, seed, vit_cfg.image_size, split="eval", style=style, patch_size=P)
    report: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                              "eval_frames": eval_frames, "style": style, "objective": objective,
                              "max_digits": max_digits, "before": evaluate(probe, *held_out, objective)}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        # patch labels cost ~45% more frame drawing: only the dense objective pays for them
        drawn = digit_frames(batch_size, seed * 1_000_003 + step, vit_cfg.image_size, split="train", style=style,
                             max_digits=max_digits, patch_size=P if objective == "dense" else 0)
        frame_logits, patch_logits = probe(to_input(drawn[0]))
        if objective == "frame":
            loss = F.cross_entropy(frame_logits, torch.from_numpy(drawn[1].argmax(1)))
        else:
            loss = F.cross_entropy(patch_logits.flatten(0, 1), torch.from_numpy(drawn[2]).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(probe.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            acc = evaluate(probe, *held_out, objective) if step % (4 * log_every) == 0 else None
            log(f"[vit-pretrain] step {step}/{steps} loss={loss.item():.4f} {time.perf_counter() - t0:.0f}s"
                + (f" held-out top-1 acc {acc['top1_acc']:.3f} ink-patch acc {acc['ink_patch_acc']:.3f}"
                   if acc else ""))
    report["after"] = evaluate(probe, *held_out, objective)
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
    ap.add_argument("--objective", choices=OBJECTIVES, default="frame")
    ap.add_argument("--max-digits", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or not args.lr > 0:
        raise SystemExit("vit_pretrain: error: --steps and --batch-size must be >= 1 and --lr > 0")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"vit_pretrain: error: {e}") from None
    try:
        vit, report = pretrain(cfg.model.vit, args.steps, args.batch_size, args.lr, args.seed,
                               style=cfg.data.digit_style, objective=args.objective, max_digits=args.max_digits)
    except ValueError as e:
        raise SystemExit(f"vit_pretrain: error: {e}") from None
    out = export_hf_vit(vit, args.out)
    (Path(out) / "pretrain_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"[vit-pretrain] held-out top-1 accuracy {report['before']['top1_acc']:.3f} -> "
          f"{report['after']['top1_acc']:.3f} in {report['seconds']:.0f}s; wrote {out} "
          f"(model.pretrained.vit_path={out})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

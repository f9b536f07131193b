"""Pictures of which visual tokens STTS keeps.

One PNG per video: a grid of its sampled frames where every pruned g x g patch group is dimmed
and hatched and every kept group is outlined; under each frame the scorer's scores as a heat
map (method ``scorer`` only: the other methods have no scores) and a bar of the LLM tokens kept
in that frame. Optionally an animated GIF of the overlaid frames.

Drawn with PIL only, so the picture size is exact (:func:`picture_size`) and no plotting
backend is needed. :func:`kept_tokens` runs the ViT up to the selection (no LLM);
:func:`snapshot_for_trainer` is the hook a training loop calls every N steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from stts_dist.object_coverage import count_coverage, object_group_masks
from stts_dist.stts.budget import TokenBudget
from stts_dist.stts.layout import FrameLayout

CELL = 128          # frame tile side, pixels
PAD = 8             # gap between tiles
LABEL_H = 14        # "t=3  3/4" above each frame
BAR_H = 36          # tokens-kept bar under each frame
HEADER_H = 34       # two lines of title
MAX_COLUMNS = 8

KEPT_OUTLINE = (40, 230, 110)
HATCH = (150, 150, 150)
BACKGROUND = (250, 250, 250)
TEXT = (20, 20, 20)
BAR = (60, 110, 200)
BAR_EMPTY = (215, 220, 230)
OBJECT_MARK = (255, 60, 200)     # corner marker of a group that holds part of a digit
# viridis at 0, .25, .5, .75, 1 (low score = dark purple, high = yellow)
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32)


@dataclass
class KeptTokens:
    """Selection of one video. keep: (T, G) bool; scores: (T, G) float or None."""
    keep: np.ndarray
    scores: Optional[np.ndarray]
    group_grid: int               # groups per side (G = group_grid ** 2)
    group_px: int                 # side of one group in frame pixels (pool_size * patch_size)


def colormap(values: np.ndarray) -> np.ndarray:
    """values in [0, 1], any shape -> uint8 RGB (..., 3) on the viridis ramp."""
    v = np.clip(np.asarray(values, np.float32), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (v - lo)[..., None]
    return (_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac).round().astype(np.uint8)


def picture_size(frames: int, has_scores: bool, cell: int = CELL, columns: int = MAX_COLUMNS) -> tuple[int, int]:
    """(width, height) in pixels of :func:`render_kept_tokens` for ``frames`` frames."""
    cols = max(1, min(frames, columns))
    rows = math.ceil(frames / cols)
    tile_h = LABEL_H + cell + (cell if has_scores else 0) + BAR_H
    return cols * cell + (cols + 1) * PAD, HEADER_H + rows * (tile_h + PAD) + PAD


def _group_boxes(group_grid: int, group_px: int, size: int, scale: float) -> list[tuple[int, int, int, int]]:
    """Pixel box (x0, y0, x1, y1) of every group on the scaled tile, row-major like the model's
    groups; groups that overhang the padded patch grid are clipped to the frame."""
    boxes = []
    for gy in range(group_grid):
        for gx in range(group_grid):
            x0, y0 = gx * group_px, gy * group_px
            x1, y1 = min(x0 + group_px, size), min(y0 + group_px, size)
            boxes.append((round(x0 * scale), round(y0 * scale), round(x1 * scale) - 1, round(y1 * scale) - 1))
    return boxes


def overlay_frame(frame: np.ndarray, keep_row: np.ndarray, group_grid: int, group_px: int, cell: int,
                  object_row: Optional[np.ndarray] = None) -> Image.Image:
    """One frame (H, W, 3) uint8 scaled to ``cell`` px: pruned groups dimmed + hatched, kept outlined;
    ``object_row`` (G,) bool: groups holding part of a digit get a marker in their corner."""
    size = frame.shape[0]
    scale = cell / size
    img = np.asarray(Image.fromarray(frame).resize((cell, cell), Image.NEAREST)).astype(np.float32)
    boxes = _group_boxes(group_grid, group_px, size, scale)
    for (x0, y0, x1, y1), kept in zip(boxes, keep_row):
        if not kept:
            img[y0:y1 + 1, x0:x1 + 1] *= 0.3
    out = Image.fromarray(img.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for (x0, y0, x1, y1), kept in zip(boxes, keep_row):
        if kept:
            draw.rectangle((x0, y0, x1, y1), outline=KEPT_OUTLINE, width=max(1, cell // 96))
        else:
            step = max(4, cell // 16)
            w, h = x1 - x0, y1 - y0
            for k in range(-h, w, step):  # 45-degree hatch clipped to the box
                a = (x0 + max(k, 0), y0 + max(-k, 0))
                b = (x0 + min(k + h, w), y0 + min(h, w - k))
                draw.line((a, b), fill=HATCH, width=1)
    if object_row is not None:
        r = max(2, cell // 40)
        for (x0, y0, _, _), is_object in zip(boxes, object_row):
            if is_object:
                draw.rectangle((x0 + 2, y0 + 2, x0 + 2 + 2 * r, y0 + 2 + 2 * r), fill=OBJECT_MARK)
    return out


def heat_tile(scores_row: np.ndarray, keep_row: np.ndarray, lo: float, hi: float, group_grid: int, group_px: int,
              size: int, cell: int) -> Image.Image:
    """Scores of one frame's groups on the viridis ramp (normalised to [lo, hi]); kept groups outlined."""
    norm = (scores_row - lo) / max(hi - lo, 1e-12)
    rgb = colormap(norm)
    out = Image.new("RGB", (cell, cell), (0, 0, 0))
    draw = ImageDraw.Draw(out)
    for (x0, y0, x1, y1), color, kept in zip(_group_boxes(group_grid, group_px, size, cell / size), rgb, keep_row):
        draw.rectangle((x0, y0, x1, y1), fill=tuple(int(c) for c in color),
                       outline=(255, 255, 255) if kept else None)
    return out


def _fit(draw: ImageDraw.ImageDraw, text: str, max_px: int, font) -> str:
    """``text`` cut (with an ellipsis) to fit ``max_px`` pixels."""
    if draw.textlength(text, font=font) <= max_px:
        return text
    while text and draw.textlength(text + "...", font=font) > max_px:
        text = text[:-1]
    return text + "..."


def render_kept_tokens(frames: np.ndarray, kept: KeptTokens, out_path: str | Path, title: str = "",
                       cell: int = CELL, columns: int = MAX_COLUMNS, objects: Optional[np.ndarray] = None) -> Path:
    """Write the kept-token picture of one video. frames: (T, H, W, 3) uint8. ``objects``: (n, T, G)
    bool object groups (``object_coverage.object_group_masks``) -- marked on the frames, with the
    object recall / precision of this selection in the header. Returns the path."""
    frames = np.asarray(frames)
    T, G = kept.keep.shape
    if frames.ndim != 4 or frames.shape[0] != T or frames.shape[3] != 3:
        raise ValueError(f"frames have shape {frames.shape}; expected ({T}, H, W, 3) to match keep {kept.keep.shape}")
    if kept.group_grid ** 2 != G:
        raise ValueError(f"keep has {G} groups per frame but group_grid={kept.group_grid} gives {kept.group_grid ** 2}")
    has_scores = kept.scores is not None
    width, height = picture_size(T, has_scores, cell, columns)
    cols = max(1, min(T, columns))
    tile_h = LABEL_H + cell + (cell if has_scores else 0) + BAR_H
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    kept_per_frame = kept.keep.sum(1)
    summary = f"LLM tokens kept {int(kept_per_frame.sum())}/{T * G} ({T} frames x {G} groups)"
    lo = hi = 0.0
    if has_scores:
        lo, hi = float(kept.scores.min()), float(kept.scores.max())
        summary += f"   scores {lo:.5g}..{hi:.5g} (heat map: dark=low, yellow=high)"
    union = None
    if objects is not None:
        union = np.asarray(objects, bool).any(axis=0)                     # (T, G)
        m = count_coverage(kept.keep, objects).metrics()
        summary += (f"   digits (pink marks), frames>=1: recall {100 * m['obj_recall']:.0f}%"
                    f" precision {100 * m['obj_precision']:.0f}%")
    draw.text((PAD, 4), _fit(draw, title, width - 2 * PAD, font), fill=TEXT, font=font)
    draw.text((PAD, 4 + HEADER_H // 2), _fit(draw, summary, width - 2 * PAD, font), fill=TEXT, font=font)
    size = frames.shape[1]
    for t in range(T):
        x = PAD + (t % cols) * (cell + PAD)
        y = HEADER_H + (t // cols) * (tile_h + PAD) + PAD
        draw.text((x, y), f"t={t}  {int(kept_per_frame[t])}/{G}", fill=TEXT, font=font)
        y += LABEL_H
        canvas.paste(overlay_frame(frames[t], kept.keep[t], kept.group_grid, kept.group_px, cell,
                                   None if union is None else union[t]), (x, y))
        y += cell
        if has_scores:
            canvas.paste(heat_tile(kept.scores[t], kept.keep[t], lo, hi, kept.group_grid, kept.group_px, size, cell),
                         (x, y))
            y += cell
        bar_h = BAR_H - 6
        filled = round(bar_h * float(kept_per_frame[t]) / G)
        draw.rectangle((x + cell // 3, y + 3, x + 2 * cell // 3, y + 3 + bar_h), fill=BAR_EMPTY)
        if filled:
            draw.rectangle((x + cell // 3, y + 3 + bar_h - filled, x + 2 * cell // 3, y + 3 + bar_h), fill=BAR)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path, format="PNG")
    return out_path


def render_gif(frames: np.ndarray, kept: KeptTokens, out_path: str | Path, cell: int = CELL,
               frame_ms: int = 400) -> Path:
    """Animated GIF of the overlaid frames (one GIF frame per video frame), looping."""
    T, G = kept.keep.shape
    images = []
    for t in range(T):
        tile = overlay_frame(np.asarray(frames[t]), kept.keep[t], kept.group_grid, kept.group_px, cell)
        img = Image.new("RGB", (cell, cell + LABEL_H), BACKGROUND)
        img.paste(tile, (0, LABEL_H))
        ImageDraw.Draw(img).text((2, 1), f"t={t} kept {int(kept.keep[t].sum())}/{G}", fill=TEXT,
                                 font=ImageFont.load_default())
        images.append(img)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(out_path, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return out_path


# ---------------------------------------------------------------------------------------------
def frames_to_model_input(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float in [-1, 1], the SequenceBuilder's normalisation."""
    x = torch.as_tensor(np.ascontiguousarray(frames), device=device)
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def kept_tokens_from_result(model, keep: torch.Tensor, scores: Optional[torch.Tensor]) -> KeptTokens:
    """Wrap one video's (T, G) keep mask / scores from a model run."""
    c = model.cfg
    grid = c.vit.image_size // c.vit.patch_size
    g = c.connector.pool_size
    return KeptTokens(keep.detach().cpu().numpy().astype(bool),
                      None if scores is None else scores.detach().float().cpu().numpy(),
                      -(-grid // g), g * c.vit.patch_size)


@torch.no_grad()
def kept_tokens(model, frames: np.ndarray, budget: Optional[TokenBudget] = None,
                generator: Optional[torch.Generator] = None) -> KeptTokens:
    """Run the ViT (and scorer) of ``model`` on one video (T, H, W, 3) uint8 up to the selection,
    pruning to ``budget`` (None: the model's own, ``model.budget``).

    Under ZeRO-3 every rank must call this (it runs the ViT's modules); see snapshot_for_trainer."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        T = int(frames.shape[0])
        settings = model.prune_settings(budget or model.budget)
        _, res, _ = model.encode_visual(frames_to_model_input(frames, device), FrameLayout([T], [T > 1]), settings,
                                        generator)
    finally:
        model.train(was_training)
    return kept_tokens_from_result(model, res.keep, res.scores)


def snapshot_for_trainer(model, sample: dict, out_dir: str | Path, step: int, budget: Optional[TokenBudget] = None,
                         write: bool = True, generator: Optional[torch.Generator] = None) -> Optional[Path]:
    """The training-loop hook: picture of ``sample`` (a dict with uint8 ``frames`` (T, H, W, 3))
    at ``step`` pruned to ``budget`` (None: ``model.budget``), written to
    ``<out_dir>/kept_tokens/step_XXXXXXXX.png``; returns its path.

    ``model`` is the plain VideoVLM (unwrap a DeepSpeed engine: ``engine.module``). With ZeRO-3
    every rank must call this at the same step (parameters are gathered collectively); pass
    ``write=False`` on all ranks but rank 0, which returns None there. Training mode and the
    global RNG are left as they were (``random`` selection uses ``generator`` or a fixed seed)."""
    gen = generator or torch.Generator().manual_seed(step)
    budget = budget or model.budget
    kept = kept_tokens(model, np.asarray(sample["frames"]), budget, gen)
    if not write:
        return None
    title = f"step {step}  method={budget.method} prune_ratio={budget.prune_ratio:g}  sample {sample.get('id', '')}  " \
            f"Q: {sample.get('question', '')}  A: {sample.get('answer', '')}"
    return render_kept_tokens(np.asarray(sample["frames"]), kept, Path(out_dir) / "kept_tokens" / f"step_{step:08d}.png",
                              title, objects=sample_object_groups(model, sample))


def sample_object_groups(model, sample: dict) -> Optional[np.ndarray]:
    """(n, T, G) object groups of a digits sample in ``model``'s group layout, or None."""
    if sample.get("objects") is None:
        return None
    c = model.cfg
    return object_group_masks(sample["objects"], int(np.asarray(sample["frames"]).shape[0]), c.vit.image_size,
                              c.vit.patch_size, c.connector.pool_size)


def side_by_side(paths: Sequence[str | Path], out_path: str | Path) -> Path:
    """Stack several pictures vertically (e.g. one per method of the same clip)."""
    images = [Image.open(p).convert("RGB") for p in paths]
    width = max(i.width for i in images)
    canvas = Image.new("RGB", (width, sum(i.height for i in images)), BACKGROUND)
    y = 0
    for img in images:
        canvas.paste(img, (0, y))
        y += img.height
    out_path = Path(out_path)
    canvas.save(out_path, format="PNG")
    return out_path

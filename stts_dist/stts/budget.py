"""Deterministic token budgets of STTS.

STTS prunes a fixed number of g x g patch groups per video, so every count below is known from
metadata alone (frames, frame size) before any pixel is decoded. The data pipeline records these
numbers in the shard index and the balancer plans with them.
"""
from __future__ import annotations

import math


def group_grid(patch_grid_h: int, patch_grid_w: int, pool_size: int) -> tuple[int, int]:
    """Group grid of one frame: the patch grid padded up to a multiple of ``pool_size``."""
    return math.ceil(patch_grid_h / pool_size), math.ceil(patch_grid_w / pool_size)


def groups_per_frame(image_size: int, patch_size: int, pool_size: int) -> int:
    """G: LLM tokens per unpruned frame (square frames)."""
    n = image_size // patch_size
    gh, gw = group_grid(n, n, pool_size)
    return gh * gw


def effective_ratio(method: str, prune_ratio: float) -> float:
    """The ratio a method really prunes: ``none`` keeps every token whatever the configured ratio."""
    return 0.0 if method == "none" else float(prune_ratio)


def pruned_groups(groups: int, frames: int, prune_ratio: float, is_video: bool = True) -> int:
    """``int(G * r * T)`` groups pruned per video; images / non-video samples are never pruned."""
    if not is_video or frames <= 1 or prune_ratio <= 0.0:
        return 0
    n = int(groups * prune_ratio * frames)
    if n > groups * (frames - 1):
        raise ValueError(
            f"prune_ratio={prune_ratio} would prune {n} of {groups * frames} groups of a {frames}-frame "
            f"video, but the first frame ({groups} groups) is always kept; lower the ratio or add frames")
    return n


def llm_visual_tokens(groups: int, frames: int, prune_ratio: float, is_video: bool = True) -> int:
    """Visual tokens the LLM sees for one sample: ``G*T - int(G*r*T)``."""
    return groups * frames - pruned_groups(groups, frames, prune_ratio, is_video)


"""Deterministic token budgets of STTS.

STTS prunes a fixed number of g x g patch groups per video, so every count below is known from
metadata alone (frames, frame size) before any pixel is decoded. :class:`TokenBudget` holds one
pruning setting; it is built once from the model config (:meth:`TokenBudget.from_model_config`)
and handed to everything that counts tokens: the batch builder reserves its placeholders, the
model prunes to it (it travels in ``VideoBatch.budget``), the balancer, the clip-length check and
the estimator plan with it, evaluation and inference derive one per setting
(:meth:`TokenBudget.with_setting`). The data pipeline records the per-sample inputs (frames, G) in
the shard index and calls the plain functions below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np


def group_grid(patch_grid_h: int, patch_grid_w: int, pool_size: int) -> tuple[int, int]:
    """Group grid of one frame: the patch grid padded up to a multiple of ``pool_size``."""
    return math.ceil(patch_grid_h / pool_size), math.ceil(patch_grid_w / pool_size)


def groups_per_frame(image_size: int, patch_size: int, pool_size: int) -> int:
    """G: LLM tokens per unpruned frame (square frames)."""
    n = image_size // patch_size
    gh, gw = group_grid(n, n, pool_size)
    return gh * gw


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


# The selection methods (``stts/selection.py`` implements them; the config checks names against this)
METHODS = ("none", "random", "uniform", "temporal_diff", "scorer")


@dataclass(frozen=True)
class TokenBudget:
    """One pruning setting and every token count that follows from it.

    ``prune_ratio`` is the ratio really pruned: method ``none`` keeps every token whatever ratio
    the config names, so it is stored as 0 and nobody downstream asks for the method again."""

    method: str                       # none | random | uniform | temporal_diff | scorer
    prune_ratio: float                # fraction of each video's groups pruned (0 when method is none)
    groups_per_frame: int             # G: LLM tokens of an unpruned frame (g x g patch groups)
    patches_per_frame: int            # ViT patches of a frame
    frame_separators: bool = False    # one <frame> token before each frame's kept tokens
    adaptive_strength: Optional[float] = None   # None: int(G*r*T) per video; a number: stts/adaptive.py

    def __post_init__(self) -> None:
        object.__setattr__(self, "prune_ratio", 0.0 if self.method == "none" else float(self.prune_ratio))

    @classmethod
    def from_model_config(cls, model_cfg: Any) -> "TokenBudget":
        """The budget a ``ModelConfig`` trains with (read by attribute: this package imports no config)."""
        v, s = model_cfg.vit, model_cfg.stts
        side = v.image_size // v.patch_size
        groups = groups_per_frame(v.image_size, v.patch_size, model_cfg.connector.pool_size)
        return cls(str(s.method), s.prune_ratio, groups, side * side, bool(s.frame_separators),
                   float(s.adaptive_strength) if s.adaptive else None)

    def with_setting(self, method: str, prune_ratio: float, adaptive_strength: Optional[float] = None) -> "TokenBudget":
        """The same geometry and prompt layout for another (evaluation) setting; fixed budgets
        unless ``adaptive_strength`` is given."""
        return replace(self, method=method, prune_ratio=prune_ratio, adaptive_strength=adaptive_strength)

    def pruned_groups(self, frames: int, is_video: bool = True) -> int:
        """``int(G*r*T)`` groups pruned of a ``frames``-frame sample (0 for images and single frames)."""
        return pruned_groups(self.groups_per_frame, frames, self.prune_ratio, is_video)

    def llm_visual_tokens(self, frames: int, is_video: bool = True) -> int:
        """Visual tokens the LLM sees for one sample: ``G*T - int(G*r*T)``."""
        return llm_visual_tokens(self.groups_per_frame, frames, self.prune_ratio, is_video)

    def separator_tokens(self, frames):
        """``<frame>`` tokens of a sample (int) or of many (``(N,)`` array): T when separators are on."""
        return frames * int(self.frame_separators)

    def prompt_visual_span(self, frames: int, is_video: bool = True) -> int:
        """``<video>`` placeholders a sample's prompt reserves: visual tokens + separators."""
        return self.llm_visual_tokens(frames, is_video) + self.separator_tokens(frames)

    def too_short_to_prune(self, frames: np.ndarray, is_video: np.ndarray) -> np.ndarray:
        """(N,) bool: the videos for which :meth:`pruned_groups` raises (``int(G*r*T)`` would eat into
        the always-kept first frame), for a whole shard index at once."""
        frames = np.asarray(frames)
        g = self.groups_per_frame
        return np.asarray(is_video) & (frames > 1) & ((g * self.prune_ratio * frames).astype(int) > g * (frames - 1))

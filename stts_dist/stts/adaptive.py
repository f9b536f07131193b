"""Adaptive pruning budgets: prune static videos more and busy videos less, at the same total.

The fixed rule prunes ``int(G*r*T)`` groups of every video. The adaptive rule keeps the same
TOTAL over a set of videos (a dataset, or one global batch) and the same guarantees -- the first
frame is kept whole, every count is an integer known before the ViT runs -- but hands the kept
tokens out in proportion to each video's content novelty:

    kept_i = clip(lambda * G*T_i * (novelty_i / mean novelty) ** strength, lo_i, hi_i)

with ``lambda`` chosen so that ``sum kept_i`` equals the fixed rule's total (bisection; the
function is monotone in ``lambda``), then rounded to integers by largest remainder. ``lo_i``
keeps the first frame (and at most ``max_ratio`` pruned), ``hi_i`` prunes at least
``min_ratio``. ``strength=0`` gives every video its fixed-rule share again.

Where the novelty comes from: :func:`pixel_novelty`, a cheap mean absolute difference between
consecutive sampled frames, computed once at sharding time from the decoded frames and stored in
the shard index, so budgets (and therefore the prompt's placeholder counts and the balancer's
token counts) are known from metadata alone, before any model runs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def pixel_novelty(frames: np.ndarray) -> float:
    """Mean absolute change between consecutive frames in [0, 1]. frames: (T, H, W, C) uint8.

    0 for a still video (or a single frame); it is a proxy of the ViT-feature novelty that
    ``temporal_diff`` and the scorer's auxiliary target measure, at no model cost."""
    f = np.asarray(frames)
    if f.ndim != 4:
        raise ValueError(f"frames must be (T, H, W, C), got shape {f.shape}")
    if f.shape[0] < 2:
        return 0.0
    diff = np.abs(f[1:].astype(np.int16) - f[:-1].astype(np.int16))
    return float(diff.mean() / 255.0)


def _as_list(value: int | Sequence[int], n: int, name: str) -> list[int]:
    if isinstance(value, (int, np.integer)):
        return [int(value)] * n
    out = [int(v) for v in value]
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} entries but there are {n} videos")
    return out


def adaptive_budgets(novelty_per_video: Sequence[float], frames: int | Sequence[int], groups: int | Sequence[int],
                     mean_ratio: float, strength: float = 1.0, min_ratio: float = 0.0,
                     max_ratio: Optional[float] = None) -> list[int]:
    """Groups to PRUNE per video (the adaptive counterpart of ``TokenBudget.pruned_groups``).

    novelty_per_video: (N,) content novelty (>= 0, e.g. :func:`pixel_novelty`); frames: T per
    video (or one T for all); groups: G per frame (or one per video); mean_ratio: the fixed
    ratio whose total is preserved: ``sum(result) == sum(int(G*mean_ratio*T_i))`` over the
    videos with T_i > 1 (still images and single frames are never pruned: 0). Per video the
    pruned count stays within ``[int(G*min_ratio*T), min(G*(T-1), int(G*max_ratio*T))]``.
    LLM tokens of video i: ``G*T_i - result[i]``."""
    nov = np.asarray(novelty_per_video, dtype=np.float64)
    n = len(nov)
    T = _as_list(frames, n, "frames")
    G = _as_list(groups, n, "groups")
    if not 0.0 <= mean_ratio < 1.0:
        raise ValueError(f"mean_ratio={mean_ratio} must be in [0, 1) (the average fraction pruned)")
    if strength < 0:
        raise ValueError(f"strength={strength} must be >= 0 (0 = the fixed ratio for every video)")
    if not np.all(np.isfinite(nov)) or np.any(nov < 0):
        raise ValueError("novelty values must be finite and >= 0")
    if max_ratio is not None and not min_ratio <= mean_ratio <= max_ratio:
        raise ValueError(f"need min_ratio <= mean_ratio <= max_ratio, got {min_ratio}, {mean_ratio}, {max_ratio}")
    if min_ratio > mean_ratio:
        raise ValueError(f"min_ratio={min_ratio} exceeds mean_ratio={mean_ratio}")
    out = [0] * n
    vids = [i for i in range(n) if T[i] > 1 and mean_ratio > 0]
    if not vids:
        return out
    total = np.array([G[i] * T[i] for i in vids], dtype=np.float64)            # G*T per video
    most_pruned = [G[i] * (T[i] - 1) if max_ratio is None else min(G[i] * (T[i] - 1), int(G[i] * max_ratio * T[i]))
                   for i in vids]
    lo = total - np.array(most_pruned, dtype=np.float64)                       # min kept
    hi = total - np.array([int(G[i] * min_ratio * T[i]) for i in vids], dtype=np.float64)  # max kept
    fixed_pruned = [int(G[i] * mean_ratio * T[i]) for i in vids]
    for i, p in zip(vids, fixed_pruned):
        if p > G[i] * (T[i] - 1):
            raise ValueError(f"mean_ratio={mean_ratio} would prune {p} of {G[i] * T[i]} groups of video {i} "
                             f"({T[i]} frames) and its first frame is always kept; lower the ratio")
    keep_total = float(total.sum() - sum(fixed_pruned))
    if not lo.sum() <= keep_total <= hi.sum():
        raise ValueError(f"the bounds min_ratio={min_ratio} / max_ratio={max_ratio} cannot meet mean_ratio={mean_ratio} "
                         f"over these videos; widen them")

    v = nov[vids]
    mean = v.mean()
    if strength == 0 or mean == 0 or np.all(v == v[0]):
        # No content signal: the fixed rule itself (proportional shares would round differently).
        for i, p in zip(vids, fixed_pruned):
            out[i] = p
        return out
    weights = total * (v / mean) ** strength

    def kept(lam: float) -> np.ndarray:
        return np.clip(lam * weights, lo, hi)

    positive = weights > 0
    lam_lo, lam_hi = 0.0, float((hi[positive] / weights[positive]).max()) if positive.any() else 0.0
    for _ in range(200):  # sum(kept(lam)) is monotone non-decreasing in lam
        mid = 0.5 * (lam_lo + lam_hi)
        if kept(mid).sum() < keep_total:
            lam_lo = mid
        else:
            lam_hi = mid
    x = kept(lam_hi)
    # Integers: floor, then +1 to the largest fractional parts (ties by position) until the
    # total is exact; entries already at their upper bound are skipped.
    k = np.floor(x + 1e-9).astype(np.int64)
    remainder = int(round(keep_total)) - int(k.sum())
    order = sorted(range(len(vids)), key=lambda j: (-(x[j] - k[j]), j))
    while remainder > 0:
        progressed = False
        for j in order:
            if remainder == 0:
                break
            if k[j] < hi[j]:
                k[j] += 1
                remainder -= 1
                progressed = True
        if not progressed:
            raise AssertionError("adaptive budget rounding could not place every token")  # excluded by the bounds check
    while remainder < 0:  # bisection overshoot by rounding noise
        for j in reversed(order):
            if remainder == 0:
                break
            if k[j] > lo[j]:
                k[j] -= 1
                remainder += 1
    for j, i in enumerate(vids):
        out[i] = int(total[j] - k[j])
    return out


def effective_ratios(pruned: Sequence[int], frames: int | Sequence[int], groups: int | Sequence[int]) -> list[float]:
    """Per-video fraction pruned, ``pruned_i / (G*T_i)`` (0 for empty samples)."""
    n = len(pruned)
    T = _as_list(frames, n, "frames")
    G = _as_list(groups, n, "groups")
    return [p / (g * t) if g * t else 0.0 for p, t, g in zip(pruned, T, G)]


__all__ = ["pixel_novelty", "adaptive_budgets", "effective_ratios"]

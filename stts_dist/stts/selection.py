"""Which groups are pruned: STTS and the baselines, all at the same deterministic budget.

Every method prunes exactly ``int(G * r * T)`` groups of each video (``TokenBudget.pruned_groups``);
the first frame is always kept whole; images / text-only samples are never pruned. Selection is
hard (no Gumbel / straight-through) and runs without gradients.
"""
from __future__ import annotations

from typing import Optional

import torch

from stts_dist.stts.budget import METHODS, TokenBudget
from stts_dist.stts.layout import FrameLayout

def _drop_lowest(values: torch.Tensor, n: int) -> torch.Tensor:
    """values: (T, G); the first frame is protected. Returns keep (T, G) with the n lowest dropped
    (ties broken by position, so the result is deterministic)."""
    v = values.detach().float().clone()
    v[0] = float("inf")
    flat = v.flatten()
    drop = torch.argsort(flat, stable=True)[:n]
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[drop] = False
    return keep.view_as(values)


def _uniform_keep(T: int, G: int, n: int) -> torch.Tensor:
    """Drop whole frames evenly spaced over frames 1..T-1 (plain frame subsampling). When n is not
    a multiple of G the remainder is taken, evenly spaced, from one more frame so the budget is
    exactly the same as every other method's."""
    keep = torch.ones(T, G, dtype=torch.bool)
    full, rem = divmod(n, G)
    m = full + (1 if rem else 0)
    if m == 0:
        return keep
    frames = [1 + int((i + 0.5) * (T - 1) / m) for i in range(m)]
    for f in frames[:full]:
        keep[f] = False
    if rem:
        cols = [int((i + 0.5) * G / rem) for i in range(rem)]
        keep[frames[-1], cols] = False
    return keep


@torch.no_grad()
def select_groups(budget: TokenBudget, layout: FrameLayout,
                  scores: Optional[torch.Tensor] = None, novelty: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None, device: torch.device | None = None) -> torch.Tensor:
    """Returns keep: (F, G) bool for all frames of the batch, ``budget.method`` pruning
    ``budget.pruned_groups(T)`` of each video (or ``layout.pruned``: adaptive counts).

    scores: (F, G) scorer output (method ``scorer``); novelty: (F, G) temporal novelty
    (method ``temporal_diff``); generator seeds ``random``."""
    method, groups = budget.method, budget.groups_per_frame
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {METHODS}")
    keep = torch.ones(layout.num_frames, groups, dtype=torch.bool)
    if budget.prune_ratio <= 0:     # also method none: its budget prunes nothing
        return keep.to(device)
    for i, (start, T, is_video) in enumerate(zip(layout.starts, layout.lengths, layout.is_video)):
        if layout.pruned is not None:
            n = int(layout.pruned[i])
            if not 0 <= n <= groups * max(T - 1, 0):
                raise ValueError(f"sample {i}: {n} groups to prune, but a {T}-frame video must keep its first "
                                 f"frame: the adaptive budget must lie in [0, {groups * max(T - 1, 0)}]")
        else:
            n = budget.pruned_groups(T, is_video)
        if n == 0:
            continue
        sl = slice(start, start + T)
        if method == "scorer":
            if scores is None:
                raise ValueError("method 'scorer' needs scores")
            k = _drop_lowest(scores[sl].cpu(), n)
        elif method == "temporal_diff":
            if novelty is None:
                raise ValueError("method 'temporal_diff' needs novelty")
            k = _drop_lowest(novelty[sl].cpu(), n)
        elif method == "random":
            k = _drop_lowest(torch.rand(T, groups, generator=generator), n)
        else:
            k = _uniform_keep(T, groups, n)
        keep[sl] = k
    return keep.to(device)

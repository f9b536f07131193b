"""Running the ViT with STTS: score after block ``prune_at``, bias block ``prune_at+1`` with the
log scores, hard-prune after it, run the remaining blocks on the packed kept tokens only, and
scatter the layers the connector reads back to the full layout."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from stts_dist.ops.groups import ungroup_mask
from stts_dist.model.vit import VideoViT
from stts_dist.stts.budget import TokenBudget
from stts_dist.stts.layout import FrameLayout
from stts_dist.stts.packing import gather_packed, pack_kept_tokens, scatter_packed
from stts_dist.stts.scorer import (TokenScorer, group_features, key_bias_from_scores,
                                   temporal_novelty, temporal_novelty_loss)
from stts_dist.stts.selection import select_groups


@dataclass
class PruneSettings:
    budget: TokenBudget           # method, ratio and G of this run (the batch's)
    prune_at: int
    pool_size: int
    key_bias: bool = True
    key_bias_floor: float = -2.0
    detach_aux_target: bool = False
    attention_backend: str = "auto"
    novelty_from: str = "block"   # "block": block prune_at's output (reference) | "embed": patch embeddings


@dataclass
class ViTResult:
    features: torch.Tensor        # (F, N, C * len(layers)) full layout, zeros where pruned
    keep: torch.Tensor            # (F, G) bool
    scores: Optional[torch.Tensor]  # (F, G) scorer output (method 'scorer') else None
    aux_loss: torch.Tensor        # temporal novelty loss (0 unless method 'scorer')
    tokens_before: int            # patches entering the ViT
    tokens_after: int             # patches running through the blocks after the prune point


def run_vit_with_stts(vit: VideoViT, scorer: Optional[TokenScorer], frames: torch.Tensor, layout: FrameLayout,
                      settings: PruneSettings, layers: list[int], generator: Optional[torch.Generator] = None) -> ViTResult:
    """frames: (F, C, H, W). ``layers``: ViT block indices (non-negative) whose outputs the
    connector reads."""
    depth = len(vit.blocks)
    p = settings.prune_at
    g = settings.pool_size
    grid = vit.grid
    want = set(layers)
    collected: dict[int, torch.Tensor] = {}

    x = vit(frames)                                       # (F, N, D)
    embed = x
    for i in range(p + 1):
        x = vit.blocks[i](x)
        if i in want:
            collected[i] = x

    scores = None
    aux = x.sum() * 0.0
    novelty = None
    novelty_source = embed if settings.novelty_from == "embed" else x
    method = settings.budget.method
    if method == "scorer":
        if scorer is None:
            raise ValueError("method 'scorer' needs a model built with a scorer")
        scores = scorer(x, grid, layout)                        # (F, G)
        aux = temporal_novelty_loss(scores, group_features(novelty_source, grid, g), layout, settings.detach_aux_target)
    elif method == "temporal_diff":
        novelty = temporal_novelty(group_features(novelty_source.detach(), grid, g), layout)

    keep = select_groups(settings.budget, layout, scores, novelty, generator, x.device)

    bias = None
    if scores is not None and settings.key_bias:
        bias = key_bias_from_scores(scores, grid, g, layout, settings.key_bias_floor)
    x = vit.blocks[p + 1](x, key_bias=bias)
    if p + 1 in want:
        collected[p + 1] = x

    tokens_before = x.shape[0] * x.shape[1]
    if bool(keep.all()):
        for i in range(p + 2, depth):
            x = vit.blocks[i](x)
            if i in want:
                collected[i] = x
        tokens_after = tokens_before
    else:
        patch_keep = ungroup_mask(keep, grid, g)                # (F, N)
        packed = pack_kept_tokens(patch_keep, settings.attention_backend)
        xf = gather_packed(x, packed)                           # (K, D)
        for i in range(p + 2, depth):
            xf = vit.blocks[i](xf, packed.plan)
            if i in want:
                collected[i] = scatter_packed(xf, packed)
        tokens_after = int(xf.shape[0])
    feats = torch.cat([collected[i] for i in layers], dim=-1) if len(layers) > 1 else collected[layers[0]]
    return ViTResult(feats, keep, scores, aux, tokens_before, tokens_after)

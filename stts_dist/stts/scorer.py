"""The STTS token scorer: one score in (0, 1) per g x g patch group (= per future LLM token).

Group features are attention-pooled (mean query), paired with the same group of the previous
frame of the same video (zeros for a first frame), and mapped by a 3-layer MLP to a sigmoid
score; high = keep. No text conditioning.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stts_dist.ops.groups import group_patches, ungroup_mask
from stts_dist.ops.pooling import MeanQueryAttentionPool
from stts_dist.stts.layout import FrameLayout


class TokenScorer(nn.Module):
    def __init__(self, width: int, hidden: int, heads: int, pool_size: int, init_std: float = 0.02,
                 pool_dim: int = 0):
        """``pool_dim`` > 0: patches are first projected to this width and pooled there (the
        pooling's key/value projection runs on every patch of every frame, so at the ViT's full
        width it is most of the scorer's cost); 0: pool at the ViT width, as the reference."""
        super().__init__()
        self.pool_size = pool_size
        self.norm = nn.LayerNorm(width)
        dim = pool_dim or width
        self.down = nn.Linear(width, dim) if pool_dim else nn.Identity()
        self.pool = MeanQueryAttentionPool(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, grid: int, layout: FrameLayout) -> torch.Tensor:
        """x: (F, N, D) ViT features after block ``prune_at`` -> scores (F, G) in (0, 1)."""
        groups, valid = group_patches(self.down(self.norm(x)), grid, self.pool_size)   # (F, G, g*g, D')
        Fr, G, S, D = groups.shape
        pooled = self.pool(groups.reshape(Fr * G, S, D), valid.repeat(Fr, 1)).view(Fr, G, D)
        prev_idx = layout.prev_frame_index(x.device)
        prev = pooled[prev_idx.clamp(min=0)] * (prev_idx >= 0).to(x.dtype)[:, None, None]
        logits = self.mlp(torch.cat([prev, pooled], dim=-1)).squeeze(-1)
        return torch.sigmoid(logits)


def group_features(x: torch.Tensor, grid: int, g: int) -> torch.Tensor:
    """x: (F, N, D) -> v: (F, G, g*g*D), the flattened g x g patch features of each group
    (zeros at grid padding). Used by the temporal loss and the temporal-difference baseline."""
    groups, _ = group_patches(x, grid, g)
    return groups.flatten(2)


def temporal_novelty(v: torch.Tensor, layout: FrameLayout) -> torch.Tensor:
    """1 - cos(v[t-1, j], v[t, j]) per frame and group: (F, G); 0 on first frames (no previous)."""
    prev_idx = layout.prev_frame_index(v.device)
    prev = v[prev_idx.clamp(min=0)]
    nov = 1.0 - F.cosine_similarity(prev, v, dim=-1, eps=1e-8)
    return nov * (prev_idx >= 0).to(v.dtype)[:, None]


def temporal_novelty_loss(scores: torch.Tensor, v: torch.Tensor, layout: FrameLayout,
                          detach_target: bool = False) -> torch.Tensor:
    """L_temp = mean over video frames t >= 1 and groups of (s[t, j] - (1 - cos(v[t-1,j], v[t,j])))^2.

    scores: (F, G); v: (F, G, g*g*D). Images and first frames do not count; returns a zero that
    still depends on ``scores`` when no frame counts (keeps the autograd graph identical)."""
    target = temporal_novelty(v, layout)
    if detach_target:
        target = target.detach()
    counts = ~layout.first_frame_mask(scores.device)
    video_frame = torch.tensor([vid for vid, n in zip(layout.is_video, layout.lengths) for _ in range(n)],
                               dtype=torch.bool, device=scores.device)
    counts &= video_frame
    if not bool(counts.any()):
        return scores.sum() * 0.0
    return F.mse_loss(scores[counts], target[counts])


def key_bias_from_scores(scores: torch.Tensor, grid: int, g: int, layout: FrameLayout, floor: float) -> torch.Tensor:
    """Log-score key bias for the block right after scoring: the LM loss's path to the scorer.

    Scores (F, G) are upsampled to patches (F, N), min-max rescaled per frame to [exp(floor), 1]
    (first frames forced to 1), and logged, so softmax_j(q.k_j + log s'_j) down-weights key j by
    its score. Returns (F, N)."""
    s = ungroup_mask(scores, grid, g)
    lo_val = float(torch.tensor(floor).exp())
    smin = s.min(dim=1, keepdim=True).values
    smax = s.max(dim=1, keepdim=True).values
    scaled = lo_val + (1.0 - lo_val) * (s - smin) / (smax - smin).clamp(min=1e-6)
    first = layout.first_frame_mask(s.device)
    scaled = torch.where(first[:, None], torch.ones_like(scaled), scaled)
    return scaled.log()

"""Connector: g x g attention pooling with a mean query, then an MLP projector.

One LLM token per g x g patch group. The patch grid is padded to a multiple of g; padded
positions are masked out of the pooling. Pooling runs only on the groups that are kept, so
pruned groups cost nothing here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stts_dist.ops.groups import group_patches
from stts_dist.ops.pooling import MeanQueryAttentionPool


class Connector(nn.Module):
    """Per kept group: pooled ViT features (of ``num_layers`` layers concatenated) -> LLM hidden."""

    def __init__(self, vit_width: int, num_layers: int, pool_size: int, pool_heads: int, llm_hidden: int):
        super().__init__()
        dim = vit_width * num_layers
        self.pool_size = pool_size
        self.norm = nn.LayerNorm(dim)
        self.pool = MeanQueryAttentionPool(dim, pool_heads * num_layers)
        self.proj1 = nn.Linear(dim, llm_hidden)
        self.proj2 = nn.Linear(llm_hidden, llm_hidden)

    def forward(self, feats: torch.Tensor, grid: int, keep: torch.Tensor) -> torch.Tensor:
        """feats: (F, N, C) full-layout features (zeros where pruned); keep: (F, G) bool.
        Returns (K, llm_hidden) for the kept groups in (frame, group) row-major order."""
        groups, valid = group_patches(feats, grid, self.pool_size)              # (F, G, g*g, C)
        kept = self.norm(groups[keep])                                          # (K, g*g, C)
        pooled = self.pool(kept, valid[keep.nonzero()[:, 1]])
        return self.proj2(F.gelu(self.proj1(pooled), approximate="tanh"))

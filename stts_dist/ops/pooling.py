"""Attention pooling of the patches of a group with a mean query (the connector's and the scorer's)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MeanQueryAttentionPool(nn.Module):
    """Pools a set of vectors with multi-head attention whose query is their (masked) mean.
    x: (M, S, C), valid: (M, S) or (S,) bool -> (M, C)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        M, S, C = x.shape
        valid = valid.expand(M, S) if valid.dim() == 1 else valid
        w = valid.to(x.dtype)[..., None]
        mean = (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)
        q = self.q(mean).view(M, 1, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).view(M, S, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = torch.zeros(M, 1, 1, S, dtype=x.dtype, device=x.device).masked_fill(~valid[:, None, None, :], float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(out.transpose(1, 2).reshape(M, C))

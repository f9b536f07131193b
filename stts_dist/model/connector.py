"""Connector: g x g attention pooling with a mean query, then an MLP projector.

One LLM token per g x g patch group. The patch grid is padded to a multiple of g; padded
positions are masked out of the pooling. Pooling runs only on the groups that are kept, so
pruned groups cost nothing here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_patches(x: torch.Tensor, grid: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (F, N=grid*grid, C) -> (F, G, g*g, C) grouped patches and a (G, g*g) bool validity mask
    (False where the grid was padded to a multiple of g)."""
    Fr, N, C = x.shape
    gp = -(-grid // g) * g
    xs = x.view(Fr, grid, grid, C)
    valid = torch.ones(grid, grid, dtype=torch.bool, device=x.device)
    if gp != grid:
        xs = F.pad(xs, (0, 0, 0, gp - grid, 0, gp - grid))
        valid = F.pad(valid, (0, gp - grid, 0, gp - grid), value=False)
    n = gp // g
    xs = xs.view(Fr, n, g, n, g, C).permute(0, 1, 3, 2, 4, 5).reshape(Fr, n * n, g * g, C)
    valid = valid.view(n, g, n, g).permute(0, 2, 1, 3).reshape(n * n, g * g)
    return xs, valid


def ungroup_mask(group_mask: torch.Tensor, grid: int, g: int) -> torch.Tensor:
    """(F, G) per-group values -> (F, grid*grid) per-patch values (each patch takes its group's)."""
    Fr, G = group_mask.shape
    n = int(round(G ** 0.5))
    up = group_mask.view(Fr, n, 1, n, 1).expand(Fr, n, g, n, g).reshape(Fr, n * g, n * g)
    return up[:, :grid, :grid].reshape(Fr, grid * grid)


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

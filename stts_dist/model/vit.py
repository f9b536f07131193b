"""Video ViT: patch embedding, absolute position embedding, pre-norm blocks, attention within
each frame. Frames are the batch dimension; a video is just consecutive frames.

The blocks accept either a dense batch of frames ``(F, N, D)`` (all frames complete) or a flat
packed tensor ``(total, D)`` plus a :class:`VarlenPlan` (frames after pruning, one sequence per
frame), so the same weights serve both sides of the prune point.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from stts_dist.ops.attention import VarlenPlan, dense_attention, varlen_attention
from stts_dist.ops.position_encoding import group_position_encoding


class ViTAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.head_dim = width // heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, plan: Optional[VarlenPlan] = None,
                key_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (F, N, D) dense or (total, D) packed; key_bias: (F, N), dense only."""
        # heads are derived from the projection width so a tensor-parallel (column-split) q_proj
        # transparently yields the local heads.
        shape = x.shape[:-1]
        q = self.q_proj(x).unflatten(-1, (-1, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (-1, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (-1, self.head_dim))
        if plan is None:
            out = dense_attention(q, k, v, key_bias=key_bias)
        else:
            if key_bias is not None:
                raise ValueError("key_bias is only supported on the dense (unpruned) path")
            out = varlen_attention(q, k, v, plan)
        return self.out_proj(out.reshape(*shape, -1))


class ViTMLP(nn.Module):
    def __init__(self, width: int, mlp_dim: int, approximate: str = "tanh"):
        super().__init__()
        self.approximate = approximate   # "tanh" (SigLIP) or "none" (exact erf GELU, DINOv2)
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float, approximate: str = "tanh"):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = ViTMLP(width, mlp_dim, approximate)

    def forward(self, x: torch.Tensor, plan: Optional[VarlenPlan] = None,
                key_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), plan, key_bias)
        return x + self.mlp(self.norm2(x))


# sin/cos values have an RMS of 1/sqrt(2); scaled by 0.25 (RMS 0.18) they sit at the per-dimension
# spread of a patch embedding at init (std 0.27 on digits frames): position and content both count
SINCOS_SCALE = 0.25


def sincos_2d_position_embedding(grid: int, width: int) -> torch.Tensor:
    """(grid*grid, width) fixed 2-D sin-cos code of each patch's (row, column), row-major (MAE's
    ``get_2d_sincos_pos_embed``): the first half of the dimensions codes the row, the second the
    column, each half sines then cosines over wavelengths 2*pi .. 2*pi*10000."""
    if width % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {width}")
    return group_position_encoding(torch.arange(grid * grid), grid, width, base=10000.0)


class VideoViT(nn.Module):
    """Frames ``(F, 3, H, W)`` float in [-1, 1] -> patch tokens ``(F, N, D)`` via ``forward``;
    the blocks are run by the caller (see ``stts_dist.model.pruned_vit``) so pruning can happen
    between them."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 mlp_dim: int, in_channels: int = 3, eps: float = 1e-6, gelu: str = "tanh",
                 pos_embed_init: str = "normal"):
        super().__init__()
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.num_patches = self.grid * self.grid
        self.width = width
        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, width))
        if pos_embed_init == "sincos":
            with torch.no_grad():
                self.pos_embed.copy_(sincos_2d_position_embedding(self.grid, width)[None] * SINCOS_SCALE)
        elif pos_embed_init == "normal":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            raise ValueError(f"model.vit.pos_embed_init={pos_embed_init!r}: choose 'normal' or 'sincos'")
        approximate = {"tanh": "tanh", "exact": "none"}[gelu]
        self.blocks = nn.ModuleList(ViTBlock(width, heads, mlp_dim, eps, approximate) for _ in range(depth))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Patch embedding: frames (F, C, H, W) -> (F, N, D). Absolute positions are added here,
        so tokens can later be moved/packed without any position bookkeeping. (A module call, not
        a plain method, so ZeRO-3 gathers ``pos_embed`` for it.)"""
        x = self.patch_embed(frames).flatten(2).transpose(1, 2)
        return x + self.pos_embed

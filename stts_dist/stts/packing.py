"""Packing of the kept ViT tokens after hard pruning.

After block ``prune_at + 1`` every frame keeps a different number of patches. The kept tokens of
all frames go into one flat tensor, one sequence per frame, ordered by kept count (descending)
so equal-length frames are contiguous and the CPU kernel batches them (see
``stts_dist.ops.attention``). Frames that keep nothing (``uniform`` drops whole frames) take no
space. ``flat_index`` maps packed rows back to the full ``(F * N)`` layout for the scatter that
the connector needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stts_dist.ops.attention import VarlenPlan


@dataclass
class PackedFrames:
    flat_index: torch.Tensor      # (K,) long: row of the (F*N) layout of each packed token
    plan: VarlenPlan              # one sequence per frame with at least one kept patch
    frame_order: torch.Tensor     # (F,) frames in packed order (including empty ones at the end)
    num_frames: int
    num_patches: int


def pack_kept_tokens(patch_keep: torch.Tensor, backend: str = "auto") -> PackedFrames:
    """patch_keep: (F, N) bool -> PackedFrames."""
    Fr, N = patch_keep.shape
    counts = patch_keep.sum(1)
    order = torch.argsort(-counts, stable=True)
    rows, cols = patch_keep[order].nonzero(as_tuple=True)
    flat_index = order[rows] * N + cols
    lengths = counts[order].tolist()
    plan = VarlenPlan.build(lengths, patch_keep.device, causal=False, backend=backend)
    return PackedFrames(flat_index, plan, order, Fr, N)


def gather_packed(x: torch.Tensor, packed: PackedFrames) -> torch.Tensor:
    """x: (F, N, D) -> (K, D)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, packed.flat_index)


def scatter_packed(x_flat: torch.Tensor, packed: PackedFrames) -> torch.Tensor:
    """x_flat: (K, D) -> (F, N, D) with zeros where tokens were pruned."""
    out = x_flat.new_zeros(packed.num_frames * packed.num_patches, x_flat.shape[-1])
    out = out.index_copy(0, packed.flat_index, x_flat)
    return out.view(packed.num_frames, packed.num_patches, -1)

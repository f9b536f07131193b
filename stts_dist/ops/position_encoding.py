"""A fixed code of *where* a visual token sits in its frame: 2-D sinusoids of its group's row and
column.

Visual tokens reach the LLM as one token per g x g patch group, packed in (frame, group) order.
Unpruned, a token's place in its frame follows from its offset after the frame's ``<frame>``
separator, which the LLM must learn to read; pruned, the offsets no longer say it at all, and the
only trace left is the ViT's input position embedding, after every block. Adding this code to
each token states its row and column. It has no parameters (checkpoints without it load) and
holds for any grid.
"""
from __future__ import annotations

import torch

from stts_dist.ops.time_encoding import BASE, frame_time_encoding


def group_position_encoding(group_index: torch.Tensor, groups_per_row: int, dim: int,
                            base: float = BASE) -> torch.Tensor:
    """group_index: (K,) integer index of each token's group in its frame's row-major group grid
    (``groups_per_row`` groups a row). Returns (K, dim) float32: the sinusoidal code of the row in
    the first ``dim // 2`` dimensions and of the column in the rest (the same sinusoids as
    :func:`frame_time_encoding`, so one wavelength schedule serves time, rows and columns; the
    ViT's sin-cos position start is this code of its patch grid with ``base`` 10000)."""
    rows = torch.div(group_index, groups_per_row, rounding_mode="floor")
    cols = group_index % groups_per_row
    half = dim // 2
    return torch.cat([frame_time_encoding(rows, half, base), frame_time_encoding(cols, dim - half, base)], dim=1)

"""Packing the samples of one micro-batch into packed LLM sequences (``cu_seqlens`` form).

A packed sequence is the concatenation of whole samples; ``cu_seqlens`` marks the sample
boundaries so varlen attention (flash-attention ``cu_seqlens``, Megatron THD) never attends
across samples. The only padding is the alignment of each sample's length to a multiple of
``align`` (e.g. 2 x context-parallel size for THD); no sequence is padded to a fixed length.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def aligned_lengths(lengths: np.ndarray | Sequence[int], align: int = 1) -> np.ndarray:
    """Each length rounded up to a multiple of ``align``; shape ``(n,)`` int64."""
    if align < 1:
        raise ValueError(f"align={align} must be >= 1 (1 = no alignment)")
    arr = np.asarray(lengths, dtype=np.int64).reshape(-1)
    return -(-arr // align) * align


def first_fit_decreasing(sizes: np.ndarray, capacities: Sequence[int]) -> list[list[int]]:
    """Multi-dimensional first-fit-decreasing bin packing.

    ``sizes``: shape ``(n, d)`` non-negative ints (e.g. LLM tokens and ViT frames per sample);
    ``capacities``: ``d`` limits per bin. Items are taken in decreasing order of their largest
    size relative to its capacity and put into the first open bin where every dimension fits.
    Returns bins as lists of item positions (each list ascending by the FFD order).
    Raises if an item alone exceeds a capacity."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.ndim == 1:
        sizes = sizes[:, None]
    caps = np.asarray(capacities, dtype=np.int64).reshape(-1)
    if sizes.shape[1] != len(caps):
        raise ValueError(f"sizes has {sizes.shape[1]} dimensions but {len(caps)} capacities were given")
    if np.any(caps < 1):
        raise ValueError(f"capacities {caps.tolist()} must all be >= 1")
    if len(sizes) == 0:
        return []
    too_big = np.nonzero(np.any(sizes > caps, axis=1))[0]
    if len(too_big):
        i = int(too_big[0])
        raise ValueError(f"item {i} has sizes {sizes[i].tolist()} above the capacities {caps.tolist()}; "
                         "raise the capacity or cap the sample (fewer frames, shorter text)")
    key = (sizes / caps).max(axis=1)
    order = np.argsort(-key, kind="stable")
    bins: list[list[int]] = []
    room: list[np.ndarray] = []
    for i in order.tolist():
        s = sizes[i]
        for b, r in enumerate(room):
            if np.all(s <= r):
                bins[b].append(i)
                r -= s
                break
        else:
            bins.append([i])
            room.append(caps - s)
    return bins


def pack_sequences(lengths: np.ndarray | Sequence[int], max_tokens: int,
                   align: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pack samples into sequences of at most ``max_tokens`` tokens, first-fit-decreasing.

    ``lengths``: shape ``(n,)`` LLM tokens per sample. Returns one ``(sample_ids, cu_seqlens)``
    per packed sequence: ``sample_ids`` shape ``(s,)`` positions into ``lengths``;
    ``cu_seqlens`` shape ``(s+1,)`` int32 cumulative *aligned* lengths starting at 0 (sample j
    occupies tokens ``cu_seqlens[j]:cu_seqlens[j] + lengths[sample_ids[j]]``, the rest of its
    aligned slot is padding). ``cu_seqlens[-1] <= max_tokens``."""
    padded = aligned_lengths(lengths, align)
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    if len(padded) and padded.max() > max_tokens:
        i = int(np.argmax(padded))
        raise ValueError(f"sample {i} needs {int(padded[i])} tokens (aligned to {align}) but a packed sequence holds "
                         f"max_tokens={max_tokens}; raise max_tokens or shorten the sample")
    out = []
    for members in first_fit_decreasing(padded[:, None], [max_tokens]):
        ids = np.asarray(members, dtype=np.int64)
        cu = np.zeros(len(ids) + 1, dtype=np.int32)
        np.cumsum(padded[ids], out=cu[1:])
        out.append((ids, cu))
    return out


def padding_fraction(lengths: np.ndarray | Sequence[int], align: int = 1) -> float:
    """Fraction of packed tokens that are alignment padding: ``1 - sum(len) / sum(aligned)``."""
    padded = aligned_lengths(lengths, align)
    total = int(padded.sum())
    return 0.0 if total == 0 else 1.0 - float(np.asarray(lengths, dtype=np.int64).sum()) / total

"""Which sample every data-parallel rank reads at every position of every epoch: pure numpy.

The order of an epoch is a deterministic function of ``(seed, epoch)`` over the dataset
indexes, so any rank can compute its own slice, a resumed run can jump to any position, and all
ranks agree on the number of steps without talking to each other.

Per dataset, one pass over it ("dataset epoch" ``k``):
  1. shard shuffling: the shards are permuted (seeded by ``seed, dataset, k``);
  2. a shuffle window: samples, in that shard order, are permuted within consecutive windows of
     ``shuffle_window`` samples. This is a deterministic stand-in for WebDataset's shuffle
     buffer: it mixes samples of neighbouring shards while each reader touches only a few shards
     at a time. (A true buffer can emit a sample arbitrarily late; a window cannot -- the price
     of an order that is a closed-form, vectorised function of the seed.)
Blending: an epoch holds ``n_d`` samples of dataset ``d`` (weights x ``samples_per_epoch``, with
largest-remainder rounding), taken from that dataset's endless stream of passes, interleaved by a
seeded permutation. DP split: position ``i`` of the global order goes to rank ``i % dp_size``;
the order is padded by wrapping (like ``DistributedSampler``) or cut so every rank gets exactly
``samples_per_rank`` samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_MASK = (1 << 63) - 1


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([w & _MASK for w in words])


def dataset_pass_order(shard_of_sample: np.ndarray, num_shards: int, seed: int, dataset: int, pass_index: int,
                       shuffle_shards: bool, shuffle_window: int) -> np.ndarray:
    """(N,) int64 sample indices of one pass over a dataset. shard_of_sample: (N,) int64."""
    n = len(shard_of_sample)
    rng = _rng(seed, dataset, pass_index, 0x5A4D)
    shard_rank = rng.permutation(num_shards) if shuffle_shards else np.arange(num_shards)
    order = np.argsort(shard_rank[shard_of_sample], kind="stable")
    if shuffle_window > 1:
        window = np.arange(n) // shuffle_window
        order = order[np.lexsort((rng.random(n), window))]
    return order.astype(np.int64)


def blend_counts(sizes: list[int], weights: list[float], total: int) -> list[int]:
    """Samples per dataset in an epoch of ``total`` samples (0 = sum of sizes); sums to the total."""
    total = total or sum(sizes)
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
    return counts.tolist()


@dataclass(frozen=True)
class DatasetLayout:
    shard_of_sample: np.ndarray  # (N,) int64
    num_shards: int

    @property
    def size(self) -> int:
        return len(self.shard_of_sample)


class EpochPlan:
    """Global and per-rank sample orders. Entries are ``(dataset, sample)`` int64 pairs."""

    def __init__(self, layouts: list[DatasetLayout], weights: list[float], seed: int, samples_per_epoch: int = 0,
                 shuffle_shards: bool = True, shuffle_window: int = 256, dp_size: int = 1,
                 pad_to_equal: bool = True):
        if dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {dp_size}")
        self.layouts, self.weights, self.seed = layouts, list(weights), int(seed)
        self.shuffle_shards, self.shuffle_window = shuffle_shards, shuffle_window
        self.dp_size, self.pad_to_equal = dp_size, pad_to_equal
        self.counts = blend_counts([l.size for l in layouts], self.weights, samples_per_epoch)
        self.epoch_size = sum(self.counts)
        self.samples_per_rank = (math.ceil(self.epoch_size / dp_size) if pad_to_equal
                                 else self.epoch_size // dp_size)
        if self.samples_per_rank == 0:
            raise ValueError(f"an epoch of {self.epoch_size} samples cannot give every one of {dp_size} DP ranks "
                             "a sample; add data or set pad_to_equal=True")

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches every rank runs per epoch (the trailing partial batch is dropped on all ranks)."""
        return self.samples_per_rank // batch_size

    def _dataset_stream(self, d: int, start: int, count: int) -> np.ndarray:
        """Samples ``[start, start + count)`` of dataset ``d``'s endless sequence of passes."""
        layout = self.layouts[d]
        first, last = start // layout.size, (start + count - 1) // layout.size
        passes = [dataset_pass_order(layout.shard_of_sample, layout.num_shards, self.seed, d, k,
                                     self.shuffle_shards, self.shuffle_window) for k in range(first, last + 1)]
        stream = np.concatenate(passes)
        offset = start - first * layout.size
        return stream[offset:offset + count]

    def global_order(self, epoch: int) -> np.ndarray:
        """(epoch_size, 2) int64 rows ``(dataset, sample)`` for ``epoch``."""
        if len(self.layouts) == 1:
            samples = self._dataset_stream(0, epoch * self.counts[0], self.counts[0])
            return np.stack([np.zeros_like(samples), samples], axis=1)
        labels = np.repeat(np.arange(len(self.layouts), dtype=np.int64), self.counts)
        labels = labels[_rng(self.seed, epoch, 0xB1E0D).permutation(len(labels))]
        samples = np.empty(len(labels), dtype=np.int64)
        for d, n in enumerate(self.counts):
            if n:
                samples[labels == d] = self._dataset_stream(d, epoch * n, n)
        return np.stack([labels, samples], axis=1)

    def padded_order(self, epoch: int) -> np.ndarray:
        """(samples_per_rank * dp_size, 2) int64: the global order wrapped or cut so that every
        rank gets ``samples_per_rank``; position ``i`` belongs to rank ``i % dp_size``."""
        order = self.global_order(epoch)
        needed = self.samples_per_rank * self.dp_size
        if needed > len(order):
            order = np.concatenate([order, np.resize(order, (needed - len(order), 2))])
        return order[:needed]

    def rank_order(self, epoch: int, dp_rank: int) -> np.ndarray:
        """(samples_per_rank, 2) int64: what ``dp_rank`` reads in ``epoch``, in order."""
        if not 0 <= dp_rank < self.dp_size:
            raise ValueError(f"dp_rank={dp_rank} outside [0, dp_size={self.dp_size})")
        return self.padded_order(epoch)[dp_rank::self.dp_size]


def split_by_dp(src, dp_rank: int, dp_size: int):
    """WebDataset-style filter: every ``dp_size``-th item from ``dp_rank``.

    Unlike ``webdataset.split_by_node`` (which reads the *global* RANK), this takes the
    data-parallel coordinates explicitly, so tensor-parallel peers of one DP group -- which
    share a ``dp_rank`` -- receive identical items."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} outside [0, dp_size={dp_size})")
    for i, item in enumerate(src):
        if i % dp_size == dp_rank:
            yield item

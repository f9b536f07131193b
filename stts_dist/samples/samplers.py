"""Stage 1 of the sample-source stack: which dataset rows each global step draws.

A sampler hands out, per step, the rows of the *global* batch (every data-parallel rank's share,
shape ``(window,)``); the split stage (:mod:`stts_dist.samples.splits`) decides which of them this
rank reads. Its saved state is its cursor, so a resumed run draws exactly the rows the
uninterrupted run would have.

- :class:`PermutationSampler`: epoch ``e`` is ``default_rng([seed, e]).permutation(n)`` in equal
  windows (``balance.CandidateWindow``'s order); rows are read by index (the in-memory digits,
  and the balancer on any data: it plans over the whole window).
- :class:`ShardOrderSampler`: the data pipeline's epoch order over a shard folder (shards
  shuffled, samples mixed within windows of 256, see ``data_pipeline.epoch_plan``), so
  consecutive rows come from the same few shards -- the sequential read pattern WebDataset
  shards exist for.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from data_pipeline.config import as_loader_config
from data_pipeline.dataset_index import DatasetIndex
from data_pipeline.loader import LoaderStateError, epoch_plan, order_fingerprint
from stts_dist.balance import CandidateWindow


class PermutationSampler:
    """Windows of ``window`` rows of the seeded epoch permutations of ``num_rows`` rows.

    State ``{"epoch", "position", "seed", "size"}``: the window cursor as it is (the epoch moves
    on when the next window is drawn; ``CandidateWindow`` explains why)."""

    def __init__(self, num_rows: int, window: int, seed: int):
        if num_rows < window:
            raise ValueError(f"dataset has {num_rows} samples, fewer than one batch of {window}")
        self.windows = CandidateWindow(num_rows, window, seed)

    @property
    def window(self) -> int:
        return self.windows.window_size

    def next_rows(self) -> np.ndarray:
        """The next window's rows, shape ``(window,)`` int64."""
        return self.windows.next_rows()[1]

    def state_dict(self) -> dict:
        w = self.windows
        return {"epoch": w.cursor_epoch, "position": w.cursor_offset, "seed": w.seed, "size": w.num_samples}

    def load_state_dict(self, state: dict) -> None:
        w = self.windows
        if state.get("size") != w.num_samples or state.get("seed") != w.seed:
            raise ValueError(f"sampler state is for a dataset of {state.get('size')} samples / seed "
                             f"{state.get('seed')}, this run has {w.num_samples} / {w.seed}; resume with the same "
                             "data config")
        w.seek(int(state["epoch"]), int(state["position"]))


class ShardOrderSampler:
    """Windows of the data pipeline's epoch order over one shard folder, for ``dp_size`` ranks.

    Window ``k`` of epoch ``e`` is positions ``[k * window, (k + 1) * window)`` of the epoch's
    global order (padded by wrap-around so every rank gets as many samples); with the strided
    split, rank ``r`` reads exactly what ``data_pipeline.loader.VideoLoader(dp_rank=r)`` reads
    with ``iter_batches(window // dp_size)`` (position ``i`` of the global order belongs to rank
    ``i % dp_size``). The trailing partial window of an epoch is dropped on every rank.

    State: ``VideoLoader``'s format -- ``epoch``, ``position`` (samples of the epoch each rank has
    read) and what must match on resume (seed, DP size, the datasets' fingerprint)."""

    STATE_VERSION = 1

    def __init__(self, index: DatasetIndex, window: int, seed: int, dp_rank: int, dp_size: int):
        if window % dp_size:
            raise ValueError(f"the global batch of {window} samples does not split over {dp_size} data-parallel ranks")
        cfg = as_loader_config({"datasets": [{"path": str(index.root), "name": index.name}], "seed": seed})
        self.indexes = [index]
        self.plan = epoch_plan(self.indexes, cfg, dp_size)
        self.window, self.dp_rank, self.dp_size = window, dp_rank, dp_size
        self.local_batch = window // dp_size
        self.steps_per_epoch = self.plan.steps_per_epoch(self.local_batch)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{index.root} holds too few samples for a global batch of {window} over {dp_size} "
                             "data-parallel ranks")
        self.fingerprint = order_fingerprint(self.indexes, self.plan)
        self.epoch, self.position = 0, 0
        self._orders: dict[int, np.ndarray] = {}

    def _padded_order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s global order of sample rows, padded to ``samples_per_rank * dp_size``."""
        if epoch not in self._orders:   # one dataset: column 1 is the row of the shard index
            self._orders = {epoch: self.plan.padded_order(epoch)[:, 1]}
        return self._orders[epoch]

    def next_rows(self) -> np.ndarray:
        """The next window's rows, shape ``(window,)`` int64."""
        if self.position + self.local_batch > self.steps_per_epoch * self.local_batch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.dp_size
        self.position += self.local_batch
        return self._padded_order(self.epoch)[start:start + self.window].astype(np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.STATE_VERSION, "epoch": self.epoch, "position": self.position,
                "seed": self.plan.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "fingerprint": self.fingerprint, "replaced_unreadable": 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mismatches = [f"{k} (saved {state.get(k)!r}, now {v!r})" for k, v in
                      (("seed", self.plan.seed), ("dp_size", self.dp_size), ("fingerprint", self.fingerprint))
                      if state.get(k) != v]
        if mismatches:
            raise LoaderStateError("cannot resume the data loader: " + ", ".join(mismatches) +
                                   ". Exact resume needs the same datasets, blend, seed and DP size")
        if not 0 <= state["position"] <= self.plan.samples_per_rank:
            raise LoaderStateError(f"saved position {state['position']} outside [0, {self.plan.samples_per_rank}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

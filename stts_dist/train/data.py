"""Training/eval sample sources and an exactly resumable epoch sampler.

The order of samples in epoch ``e`` is a seeded permutation of the dataset; the sampler's state
is just (epoch, position), so a resumed run continues with exactly the samples the uninterrupted
run would have consumed, without replaying or decoding skipped batches.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from stts_dist.balance import CandidateWindow
from stts_dist.data.digits import clip_frames, make_sample


class DigitsDataset(Dataset):
    """The moving-digits QA videos, generated on demand (deterministic in (seed, index, split))."""

    def __init__(self, size: int, seed: int, num_frames: int, image_size: int, tasks: Sequence[str],
                 split: str = "train", min_frames: int = 0, style: str = "mnist"):
        self.size, self.seed, self.num_frames, self.image_size = size, seed, num_frames, image_size
        self.tasks, self.split, self.min_frames, self.style = list(tasks), split, min_frames, style

    def __len__(self) -> int:
        return self.size

    def frames_for(self, index: int) -> int:
        return clip_frames(index, self.seed, self.num_frames, self.min_frames)

    def __getitem__(self, index: int) -> dict:
        return make_sample(index, self.seed, self.frames_for(index), self.image_size, self.tasks, self.split,
                           self.style)


class EpochSampler:
    """Yields batches of indices: epoch ``e`` = permutation(seed, e); state = (epoch, position).

    The order is :class:`~stts_dist.balance.CandidateWindow`'s (one implementation, shared with
    the balancer, so balanced and unbalanced runs draw the same samples). This class adds the
    training sources' list API and keeps their checkpoint format ``{"epoch", "position", "seed",
    "size"}``: the window's cursor as it is (the epoch advances when the next batch is drawn), so
    checkpoints written before the sharing resume unchanged."""

    def __init__(self, size: int, batch_size: int, seed: int):
        if size < batch_size:
            raise ValueError(f"dataset has {size} samples, fewer than one batch of {batch_size}")
        self.windows = CandidateWindow(size, batch_size, seed)

    def next_batch(self) -> list[int]:
        return self.windows.next_rows()[1].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        w = self.windows
        return {"epoch": w.cursor_epoch, "position": w.cursor_offset, "seed": w.seed, "size": w.num_samples}

    def load_state_dict(self, state: dict) -> None:
        w = self.windows
        if state["size"] != w.num_samples or state["seed"] != w.seed:
            raise ValueError(f"sampler state is for a dataset of {state['size']} samples / seed {state['seed']}, "
                             f"this run has {w.num_samples} / {w.seed}; resume with the same data config")
        w.seek(int(state["epoch"]), int(state["position"]))


class _BatchIterable(torch.utils.data.IterableDataset):
    """Worker-side batch assembly: the main process hands out index lists; workers generate and
    collate, so no decoding/generation happens in the training loop."""

    def __init__(self, dataset: Dataset, index_batches: list[list[int]], collate):
        self.dataset, self.index_batches, self.collate = dataset, index_batches, collate

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for i, idx in enumerate(self.index_batches):
            if i % nw == wid:
                yield self.collate([self.dataset[j] for j in idx])


def prefetching_batches(dataset: Dataset, index_batches: list[list[int]], collate, num_workers: int):
    """Iterates collated batches for ``index_batches`` in order, built in ``num_workers`` worker
    processes (0 = in this process)."""
    if num_workers <= 0:
        for idx in index_batches:
            yield collate([dataset[j] for j in idx])
        return
    loader = torch.utils.data.DataLoader(_BatchIterable(dataset, index_batches, collate), batch_size=None,
                                         num_workers=num_workers, prefetch_factor=2, persistent_workers=False)
    yield from loader

"""Stage 3 of the sample-source stack: dataset rows -> samples (and collated batches).

Readers hold no position (the sampler and the split do); only the rows a rank was given are
ever generated or decoded. Each offers

- ``samples(rows)``: the samples of ``rows``, in order, as dicts with ``frames`` (T, H, W, 3)
  uint8, ``question``, ``answer``, ``id``, ``task`` (held-out sets, inference);
- ``batches(row_lists, collate)``: ``collate(samples of row_list)`` per list, in order, built
  ahead in ``num_workers`` loader worker processes (training).

``exact_text`` says whether the rows' text-token metadata is exactly what the sequence builder
produces (the balancer checks equality then, else an upper bound).

- :class:`DigitsReader`   the moving-digits task, generated on demand (``DigitsDataset``);
- :class:`ShardReader`    a shard folder by index row (``data_pipeline.loader.read_positions``:
                          allow-list decoding, frame counts checked against the index);
- :class:`ManifestReader` a JSONL manifest of video files, decoded with PyAV at ``frames``
                          frames uniformly over each clip (held-out data, like ``stts-infer``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from data_pipeline.config import as_loader_config
from data_pipeline.dataset_index import DatasetIndex
from data_pipeline.errors import VideoReadError
from data_pipeline.loader import read_positions
from data_pipeline.manifest import ManifestEntry
from data_pipeline.video import read_clip
from stts_dist.data.digits import clip_frames, make_sample


class DigitsDataset(Dataset):
    """The moving-digits QA videos, generated on demand (deterministic in (seed, index, split));
    ``follow_ups``: the tasks whose clips also carry their follow-up turn (``make_sample``)."""

    def __init__(self, size: int, seed: int, num_frames: int, image_size: int, tasks: Sequence[str],
                 split: str = "train", min_frames: int = 0, style: str = "mnist", follow_ups: Sequence[str] = ()):
        self.size, self.seed, self.num_frames, self.image_size = size, seed, num_frames, image_size
        self.tasks, self.split, self.min_frames, self.style = list(tasks), split, min_frames, style
        self.follow_ups = tuple(follow_ups)

    def __len__(self) -> int:
        return self.size

    def frames_for(self, index: int) -> int:
        return clip_frames(index, self.seed, self.num_frames, self.min_frames)

    def __getitem__(self, index: int) -> dict:
        return make_sample(index, self.seed, self.frames_for(index), self.image_size, self.tasks, self.split,
                           self.style, self.follow_ups)


class _BatchIterable(torch.utils.data.IterableDataset):
    """Worker-side batch assembly: the main process hands out row lists; workers generate and
    collate, so no generation happens in the training loop."""

    def __init__(self, dataset: Dataset, row_lists: list[list[int]], collate):
        self.dataset, self.row_lists, self.collate = dataset, row_lists, collate

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for i, rows in enumerate(self.row_lists):
            if i % nw == wid:
                yield self.collate([self.dataset[j] for j in rows])


def prefetching_batches(dataset: Dataset, row_lists: list[list[int]], collate, num_workers: int):
    """Iterates collated batches for ``row_lists`` in order, built in ``num_workers`` worker
    processes (0 = in this process)."""
    if num_workers <= 0:
        for rows in row_lists:
            yield collate([dataset[j] for j in rows])
        return
    loader = torch.utils.data.DataLoader(_BatchIterable(dataset, row_lists, collate), batch_size=None,
                                         num_workers=num_workers, prefetch_factor=2, persistent_workers=False)
    yield from loader


class DigitsReader:
    """In-memory digits videos by dataset row (generated, and collated, in loader workers)."""

    exact_text = True

    def __init__(self, dataset: DigitsDataset, num_workers: int = 0):
        self.dataset, self.num_workers = dataset, num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def samples(self, rows: Sequence[int]) -> list[dict]:
        return [self.dataset[int(i)] for i in rows]

    def batches(self, row_lists: list[list[int]], collate: Callable) -> Iterator[Any]:
        yield from prefetching_batches(self.dataset, row_lists, collate, self.num_workers)


class ShardReader:
    """Samples of one shard folder by index row, decoded in DataLoader workers."""

    exact_text = False   # the index counts word pieces; the check refuses only longer sequences than budgeted

    def __init__(self, index: DatasetIndex, num_workers: int = 0):
        self.index, self.num_workers = index, num_workers
        self.loader_cfg = as_loader_config({"datasets": [{"path": str(index.root), "name": index.name}]})

    def __len__(self) -> int:
        return len(self.index)

    def _read(self, rows: np.ndarray) -> Iterator[dict]:
        order = np.stack([np.zeros(len(rows), np.int64), np.asarray(rows, np.int64)], axis=1)
        yield from read_positions([self.index], order, 0, len(order), self.loader_cfg,
                                  min(self.num_workers, len(rows)))

    def samples(self, rows: Sequence[int]) -> list[dict]:
        """Plain samples: ``frames`` as a numpy array, the record's text fields (no loader meta)."""
        return [{"frames": s["frames"].numpy(), "question": s["question"], "answer": s["answer"], "id": s["id"],
                 "task": s["task"]} for s in self._read(np.asarray(rows, np.int64))]

    def batches(self, row_lists: list[list[int]], collate: Callable) -> Iterator[Any]:
        if not row_lists:
            return
        samples = self._read(np.concatenate([np.asarray(r, np.int64) for r in row_lists]))
        try:
            for rows in row_lists:
                yield collate([next(samples) for _ in rows])
        finally:
            samples.close()


class ManifestReader:
    """Manifest entries by row, decoded with PyAV: ``frames`` frames uniformly over each clip's
    ``[start, end)``. ``short_clips`` counts the clips read so far that had fewer frames."""

    exact_text = False

    def __init__(self, entries: Sequence[ManifestEntry], image_size: int, frames: int):
        self.entries, self.image_size, self.frames = list(entries), image_size, frames
        self.short_clips = 0

    def __len__(self) -> int:
        return len(self.entries)

    def samples(self, rows: Sequence[int]) -> list[dict]:
        out = []
        for i in rows:
            e = self.entries[int(i)]
            try:
                clip = read_clip(e.video, self.image_size, fps=0.0, max_frames=self.frames, start=e.start, end=e.end)
            except VideoReadError as err:
                raise VideoReadError(f"manifest line {e.line} (id {e.id}): {err}", err.kind) from None
            self.short_clips += len(clip.frames) < self.frames
            out.append({"frames": clip.frames, "question": e.question, "answer": e.answer, "id": e.id, "task": e.task})
        return out

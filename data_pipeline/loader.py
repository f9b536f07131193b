"""Resumable, data-parallel-rank-aware video loader over WebDataset shards.

    loader = VideoLoader(LoaderConfig(datasets=[DatasetSpec(path="shards/")]), dp_rank, dp_size)
    for batch in loader.iter_batches(batch_size=8):   # lists of samples (or collate_fn(batch))
        ...
        ckpt["data"] = loader.state_dict()

How it works (see :mod:`data_pipeline.epoch_plan` for the order itself):
- every rank computes the epoch's order from the shard indexes and takes its DP slice; TP peers
  pass the same ``dp_rank`` and therefore read identical samples;
- the slice is read by torch DataLoader workers -- chunks of ``worker_chunk`` consecutive
  positions are dealt round-robin to the workers, and the DataLoader's round-robin over workers
  returns them in position order; each worker runs a WebDataset pipeline (planned keys -> raw members by
  key -> allow-list decode -> sample), so decoding never happens in the training loop;
- ``state_dict()`` is ``(epoch, position)`` with position = samples handed to the caller;
  restoring reads from that position on, without reading the skipped samples.

Resume contract: same datasets (same index files), seed, blend and DP size. Every DP rank runs
``steps_per_epoch(batch_size)`` batches per epoch, so no rank runs out early inside a collective.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.utils.data

from data_pipeline.config import LoaderConfig, as_loader_config
from data_pipeline.dataset_index import DatasetIndex, load_index
from data_pipeline.epoch_plan import DatasetLayout, EpochPlan
from data_pipeline.errors import DataPipelineError, ShardFormatError
from data_pipeline.safe_decode import decode_sample
from data_pipeline.tar_reader import ShardReader

STATE_VERSION = 1


class LoaderStateError(DataPipelineError, ValueError):
    """A saved loader state does not fit this loader (different data, seed or DP size)."""


_RECORD_KEYS = ("timestamps", "native_fps", "original_size", "source", "question", "answer", "id", "task", "fps",
                "turns")


def _sample_from(decoded: dict[str, Any], index: DatasetIndex, dataset: int, sample: int,
                 frames_dtype: str) -> dict[str, Any]:
    """Decoded members -> the sample handed to the trainer. frames: (T, H, W, 3)."""
    record = decoded.get("json")
    if not isinstance(record, dict) or "frames" not in decoded:
        raise ShardFormatError(f"shard {decoded['__url__']}: sample '{decoded['__key__']}' lacks its json record or frames")
    frames = decoded["frames"]
    if frames.shape[0] != index.frames[sample]:
        raise ShardFormatError(f"shard {decoded['__url__']}: sample '{decoded['__key__']}' has {frames.shape[0]} frames, "
                               f"index.json says {index.frames[sample]}; the shard does not match its index")
    tensor = torch.from_numpy(np.ascontiguousarray(frames))
    if frames_dtype == "float32":
        tensor = tensor.float().div_(255.0)
    missing = [k for k in _RECORD_KEYS if k not in record]
    if missing:
        raise ShardFormatError(f"shard {decoded['__url__']}: sample '{decoded['__key__']}' json record lacks "
                               f"{missing}; it was not written by this project's sharding job, rebuild the shard")
    meta = {"key": decoded["__key__"], "shard": decoded["__url__"], "dataset": index.name,
            "dataset_index": dataset, "timestamps": record["timestamps"], "native_fps": record["native_fps"],
            "original_size": record["original_size"], "source": record["source"],
            "patches_per_frame": int(index.patches_per_frame[sample]),
            "groups_per_frame": int(index.groups_per_frame[sample]),
            "text_tokens": int(index.text_tokens[sample]), "is_video": bool(index.is_video[sample]),
            "user": record.get("meta", {})}
    return {"frames": tensor, "question": record["question"], "answer": record["answer"], "id": record["id"],
            "task": record["task"], "fps": record["fps"], "turns": record["turns"], "meta": meta}


class RankSlice(torch.utils.data.IterableDataset):
    """Positions ``[start, stop)`` of one rank's epoch order, read by DataLoader workers.

    Read through :func:`read_positions`. ``order``: (P, 2) int rows of (dataset, sample) into ``indexes``."""

    def __init__(self, indexes: list[DatasetIndex], order: np.ndarray, start: int, stop: int,
                 frames_dtype: str, on_corrupt: str, chunk: int = 1):
        self.indexes, self.order, self.start, self.stop = indexes, order, start, stop
        self.frames_dtype, self.on_corrupt, self.chunk = frames_dtype, on_corrupt, chunk

    def _load(self, reader: ShardReader, position: int) -> dict[str, Any]:
        dataset, sample = (int(x) for x in self.order[position])
        index = self.indexes[dataset]
        shard = int(index.shard_of_sample[sample])
        raw = reader.read(index.shard_path(shard), index.keys[sample], int(index.shard_bytes[shard]))
        return _sample_from(decode_sample(raw), index, dataset, sample, self.frames_dtype)

    def _load_stage(self, positions: Iterator[int]) -> Iterator[dict[str, Any]]:
        """WebDataset pipeline stage: position -> sample. With on_corrupt=skip an unreadable sample
        is replaced by the next readable one of this rank's order (the step count stays equal
        across ranks); the replacement is reported in ``meta["replaced"]``."""
        reader = ShardReader()
        try:
            for position in positions:
                replaced: list[str] = []
                candidate = position
                while True:
                    try:
                        sample = self._load(reader, candidate)
                        break
                    except ShardFormatError as e:
                        if self.on_corrupt != "skip":
                            raise
                        replaced.append(str(e).split(";")[0])
                        candidate = (candidate + 1) % len(self.order)
                        if len(replaced) >= len(self.order):
                            raise ShardFormatError(f"no readable sample left for this rank; last error: {e}") from None
                sample["meta"]["position"] = position
                sample["meta"]["replaced"] = replaced
                yield sample
        finally:
            reader.close()

    def _worker_positions(self, worker: int, workers: int) -> Iterator[int]:
        """Chunks of ``chunk`` consecutive positions, dealt round-robin to the workers."""
        for chunk_start in range(self.start + worker * self.chunk, self.stop, workers * self.chunk):
            yield from range(chunk_start, min(chunk_start + self.chunk, self.stop))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        if info is None:  # in-process: plain samples
            return iter(wds.DataPipeline(lambda: self._worker_positions(0, 1), self._load_stage))
        return iter(wds.DataPipeline(lambda: self._worker_positions(info.id, info.num_workers), self._load_stage,
                                     self._chunk_stage))

    def _chunk_stage(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Ship each chunk as soon as it is complete (the worker's chunks are full but the last)."""
        chunk: list[dict[str, Any]] = []
        for sample in samples:
            chunk.append(sample)
            if len(chunk) == self.chunk:
                yield pack_chunk(chunk)
                chunk = []
        if chunk:
            yield pack_chunk(chunk)


def pack_chunk(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Worker -> main process transfer unit: the frames of ``samples`` in ONE flat tensor.

    Each tensor crossing the DataLoader queue costs a shared-memory segment; one per chunk
    instead of one per sample is what makes workers pay off for small frames."""
    frames = [s.pop("frames") for s in samples]
    return {"packed_frames": torch.cat([f.reshape(-1) for f in frames]),
            "shapes": [tuple(f.shape) for f in frames], "samples": samples}


def unpack_chunk(chunk: dict[str, Any]) -> list[dict[str, Any]]:
    parts = torch.split(chunk["packed_frames"], [int(np.prod(shape)) for shape in chunk["shapes"]])
    for sample, part, shape in zip(chunk["samples"], parts, chunk["shapes"]):
        sample["frames"] = part.view(shape)
    return chunk["samples"]


def epoch_plan(indexes: list[DatasetIndex], cfg: LoaderConfig, dp_size: int) -> EpochPlan:
    """The epoch order of ``cfg``'s datasets (their ``indexes``) over ``dp_size`` ranks."""
    layouts = [DatasetLayout(ix.shard_of_sample, len(ix.shard_names)) for ix in indexes]
    return EpochPlan(layouts, [d.weight for d in cfg.datasets], cfg.seed, cfg.samples_per_epoch, cfg.shuffle_shards,
                     cfg.shuffle_window, dp_size, cfg.pad_to_equal)


def order_fingerprint(indexes: list[DatasetIndex], plan: EpochPlan) -> str:
    """What a saved position depends on besides seed and DP size: the datasets and the blend."""
    blob = json.dumps({"datasets": [[ix.name, ix.keys[0], ix.keys[-1], len(ix), ix.config] for ix in indexes],
                       "weights": plan.weights, "counts": plan.counts,
                       "shuffle": [plan.shuffle_shards, plan.shuffle_window],
                       "pad": plan.pad_to_equal}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_positions(indexes: list[DatasetIndex], order: np.ndarray, start: int, stop: int, cfg: LoaderConfig,
                   num_workers: int) -> Iterator[dict[str, Any]]:
    """Samples at positions ``[start, stop)`` of ``order`` ((P, 2) rows of (dataset, sample)),
    in order, decoded in ``num_workers`` DataLoader workers (0 = in this process). The one
    reading path of :class:`VideoLoader` and of the trainer's shard reader
    (``stts_dist.samples.readers.ShardReader``)."""
    chunk = max(1, min(cfg.worker_chunk, -(-(stop - start) // max(1, num_workers))))
    rank_slice = RankSlice(indexes, order, start, stop, cfg.frames_dtype, cfg.on_corrupt, chunk)
    workers_iter = None
    if num_workers > 0 and stop > start:
        loader = torch.utils.data.DataLoader(
            rank_slice, batch_size=None, num_workers=min(num_workers, -(-(stop - start) // chunk)),
            prefetch_factor=cfg.prefetch_factor, multiprocessing_context=cfg.worker_start_method,
            persistent_workers=False)
        workers_iter = iter(loader)
        source = (s for c in workers_iter for s in unpack_chunk(c))
    else:
        source = iter(rank_slice)
    expected = start
    try:
        for sample in source:
            if sample["meta"]["position"] != expected:  # the round-robin invariant
                raise RuntimeError(f"loader returned position {sample['meta']['position']}, expected "
                                   f"{expected}; worker output order was broken")
            expected += 1
            yield sample
    finally:
        # Stop the workers now, also when the caller stops early or an error propagates: left
        # to the garbage collector, the iterator can outlive this call (an exception traceback
        # keeps it alive) and be inherited by the next DataLoader's forked workers.
        if workers_iter is not None:
            workers_iter._shutdown_workers()


class VideoLoader:
    """Stateful loader of one DP rank. See the module docstring for the contract."""

    def __init__(self, cfg: LoaderConfig | dict | Any, dp_rank: int = 0, dp_size: int = 1):
        self.cfg = as_loader_config(cfg)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.indexes = [load_index(d.path, d.name) for d in self.cfg.datasets]
        self.plan = epoch_plan(self.indexes, self.cfg, dp_size)
        self.plan.rank_order(0, dp_rank)  # validates dp_rank early
        self.epoch = 0
        self.position = 0
        self.replaced_unreadable = 0

    # -- sizes ------------------------------------------------------------------------------
    @property
    def samples_per_rank(self) -> int:
        """Samples this rank reads per epoch (same on every rank)."""
        return self.plan.samples_per_rank

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.plan.steps_per_epoch(batch_size)

    # -- state ------------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        return order_fingerprint(self.indexes, self.plan)

    def state_dict(self) -> dict[str, Any]:
        """``epoch`` and ``position`` (samples of this epoch already handed out), plus what must
        match on restore."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "seed": self.plan.seed,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "fingerprint": self._fingerprint(),
                "replaced_unreadable": self.replaced_unreadable}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mismatches = [f"{k} (saved {state.get(k)!r}, now {v!r})" for k, v in
                      (("seed", self.plan.seed), ("dp_size", self.dp_size), ("fingerprint", self._fingerprint()))
                      if state.get(k) != v]
        if mismatches:
            raise LoaderStateError("cannot resume the data loader: " + ", ".join(mismatches) +
                                   ". Exact resume needs the same datasets, blend, seed and DP size")
        if not 0 <= state["position"] <= self.samples_per_rank:
            raise LoaderStateError(f"saved position {state['position']} outside [0, {self.samples_per_rank}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.replaced_unreadable = int(state.get("replaced_unreadable", 0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    # -- iteration --------------------------------------------------------------------------
    def _samples(self, stop: int, num_workers: int | None = None) -> Iterator[dict[str, Any]]:
        """Samples of the current epoch from ``self.position`` to ``stop``, advancing position."""
        order = self.plan.rank_order(self.epoch, self.dp_rank)
        workers = self.cfg.num_workers if num_workers is None else num_workers
        for sample in read_positions(self.indexes, order, self.position, stop, self.cfg, workers):
            sample["meta"]["epoch"] = self.epoch
            self.replaced_unreadable += bool(sample["meta"]["replaced"])
            self.position += 1
            yield sample

    def _begin_epoch(self, usable: int) -> None:
        if self.position >= usable:  # the saved state was taken after the epoch's last step
            self.epoch, self.position = self.epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch, one sample at a time; then the epoch counter advances."""
        self._begin_epoch(self.samples_per_rank)
        yield from self._samples(self.samples_per_rank)
        self.epoch, self.position = self.epoch + 1, 0

    def iter_batches(self, batch_size: int, collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None,
                     epochs: int | None = 1) -> Iterator[Any]:
        """Batches of ``batch_size`` samples: exactly ``steps_per_epoch(batch_size)`` per epoch on
        every rank (a resumed epoch yields only its remaining batches). ``epochs=None``: endless.
        Position is advanced before a batch is yielded, so a state saved after consuming it resumes
        at the next batch."""
        steps = self.steps_per_epoch(batch_size)
        if steps == 0:
            raise ValueError(f"batch_size={batch_size} exceeds the {self.samples_per_rank} samples each of the "
                             f"{self.dp_size} DP ranks gets per epoch; lower it or add data")
        usable = steps * batch_size
        done = 0
        while epochs is None or done < epochs:
            self._begin_epoch(usable)
            batch: list[dict[str, Any]] = []
            for sample in self._samples(usable):
                batch.append(sample)
                if len(batch) == batch_size:
                    yield collate_fn(batch) if collate_fn is not None else batch
                    batch = []
            if batch:  # a resumed position that was not a multiple of batch_size
                yield collate_fn(batch) if collate_fn is not None else batch
            self.epoch, self.position = self.epoch + 1, 0
            done += 1

    def token_totals(self) -> dict[str, int]:
        """Visual (ViT patches, LLM tokens before pruning) and text tokens of this rank's current
        epoch, from the index alone."""
        order = self.plan.rank_order(self.epoch, self.dp_rank)
        totals = {"vit_tokens": 0, "llm_visual_tokens_unpruned": 0, "text_tokens": 0}
        for d, ix in enumerate(self.indexes):
            picked = order[order[:, 0] == d, 1]
            totals["vit_tokens"] += int(ix.vit_tokens[picked].sum())
            totals["llm_visual_tokens_unpruned"] += int(ix.llm_visual_tokens_unpruned[picked].sum())
            totals["text_tokens"] += int(ix.text_tokens[picked].sum())
        return totals

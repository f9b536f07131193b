"""Held-out data to evaluate on, one interface for the trainer's evaluation and ``stts-eval``.

- ``digits``          the built-in moving-digits eval split (never-seen digit images), any T;
- ``manifest:FILE``   a JSONL manifest of video files, decoded with PyAV (T frames over each clip);
- ``shards:DIR``      a finished shard folder (frames were sampled at sharding time).

``source.samples(frames, rank, world)`` returns this rank's samples (rows ``rank::world`` of the
held-out set, in order) as dicts with ``frames`` (T, H, W, 3) uint8, ``question``, ``answer``,
``id``, ``task`` (and, for the digits, ``objects``: where every digit is in every frame). The
samples are read through the sample-source stack's readers (``stts_dist.samples.readers``), the
same ones training reads with; the held-out order is the rows' own (no sampler).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from data_pipeline.dataset_index import load_index
from data_pipeline.errors import VideoReadError
from data_pipeline.manifest import read_manifest
from stts_dist.config import DIGITS_SOURCES
from stts_dist.samples import DigitsDataset, DigitsReader, ManifestReader, ShardReader, digits_dataset
from stts_dist.tokenizer import word_pieces


class EvalError(ValueError):
    """Bad evaluation input; the message names it and the fix."""


def rank_rows(count: int, rank: int, world: int) -> np.ndarray:
    """Rows ``rank, rank + world, ...`` of a held-out set of ``count`` samples."""
    return np.arange(rank, count, world, dtype=np.int64)


class DigitsSource:
    """The built-in moving-digits eval split (never-seen digit images), generated at any T."""
    fixed_frames = False

    def __init__(self, cfg: Any, limit: int):
        self.cfg, self.count = cfg, limit or cfg.data.eval_samples
        self.tasks = sorted(set(cfg.data.tasks))
        self.name = "digits"

    def samples(self, frames: int, rank: int, world: int) -> list[dict]:
        d = self.cfg.data
        reader = DigitsReader(DigitsDataset(self.count, d.seed, frames, self.cfg.model.vit.image_size, d.tasks,
                                            "eval", style=d.digit_style))
        return reader.samples(rank_rows(self.count, rank, world))


class ManifestSource:
    """A JSONL manifest of video files (``data_pipeline.manifest``), decoded here with PyAV:
    T frames uniformly over each clip ``[start, end)``, like stts-infer."""
    fixed_frames = False

    def __init__(self, path: str, image_size: int, limit: int):
        self.entries = read_manifest(path)[:limit or None]
        self.image_size = image_size
        self.tasks = sorted({e.task or "all" for e in self.entries})
        self.name = f"manifest:{path}"
        self.short_clips: dict[int, int] = {}   # requested frames -> clips that had fewer (this rank)

    def samples(self, frames: int, rank: int, world: int) -> list[dict]:
        reader = ManifestReader(self.entries, self.image_size, frames)
        try:
            out = reader.samples(rank_rows(len(self.entries), rank, world))
        except VideoReadError as err:
            raise EvalError(str(err)) from None
        if reader.short_clips:
            self.short_clips[frames] = self.short_clips.get(frames, 0) + reader.short_clips
        return out


class ShardSource:
    """A finished shard folder (``data_pipeline``): frames were sampled at sharding time, so the
    frame count is the shards' (``--frames`` and test-time scaling do not apply). Read in shard
    order (the order of the sharding job's output), the first ``limit`` samples."""
    fixed_frames = True

    def __init__(self, path: str, limit: int, workers: int = 0):
        self.index = load_index(path)
        self.reader = ShardReader(self.index, workers)
        self.tasks = sorted({t or "all" for t in self.index.tasks})
        self.name = f"shards:{path}"
        videos = self.index.frames[self.index.is_video]
        self.min_video_frames = int(videos.min()) if len(videos) else 1
        self.frames = int(np.median(self.index.frames))
        self.order = np.argsort(self.index.shard_of_sample, kind="stable")[:limit or None]

    def samples(self, frames: int, rank: int, world: int) -> list[dict]:
        return self.reader.samples(self.order[rank_rows(len(self.order), rank, world)])


def make_source(spec: str, cfg: Any, limit: int, workers: int = 0):
    if spec == "digits":
        return DigitsSource(cfg, limit)
    kind, _, path = spec.partition(":")
    if kind == "manifest" and path:
        return ManifestSource(path, cfg.model.vit.image_size, limit)
    if kind == "shards" and path:
        return ShardSource(path, limit, workers)
    raise EvalError(f"--data '{spec}' must be digits, shards:DIR (a finished shard folder) or manifest:FILE.jsonl")


def run_heldout_source(cfg: Any):
    """The held-out data of a run config: the digits' eval split for the digits sources, else
    ``data.eval_path`` (a manifest or a shard folder); None when a user's run names none."""
    d = cfg.data
    if d.source in DIGITS_SOURCES:
        return DigitsSource(cfg, d.eval_samples)
    if not d.eval_path:
        return None
    kind = "shards" if Path(d.eval_path).is_dir() else "manifest"
    return make_source(f"{kind}:{d.eval_path}", cfg, d.eval_samples)


def training_eval_set(cfg: Any) -> list[dict]:
    """The samples the trainer evaluates on: for the digits sources the eval split with the
    training clip lengths (``data.min_frames``..``data.num_frames``), else ``data.eval_path`` at
    ``data.num_frames`` frames; empty when a user's run names no held-out data."""
    d = cfg.data
    if d.source in DIGITS_SOURCES:
        split = digits_dataset(cfg, "eval")
        return DigitsReader(split).samples(range(len(split)))
    heldout = run_heldout_source(cfg)
    return heldout.samples(d.num_frames, 0, 1) if heldout is not None else []


def unknown_word_report(tokenizer: Any, samples: Sequence[dict]) -> Optional[dict]:
    """Words of the held-out questions and answers outside the training vocabulary (a word
    tokenizer encodes them as ``<unk>``, so an answer made of one can never be matched): counts
    and the most frequent. None for tokenizers without a closed vocabulary (a pretrained LLM's)."""
    if not hasattr(tokenizer, "unknown_words"):
        return None
    texts = [s[k] for s in samples for k in ("question", "answer")]
    unknown: Counter = tokenizer.unknown_words(texts)
    words = sum(len(word_pieces(t)) for t in texts)
    answers = sum(1 for s in samples if tokenizer.unknown_words([s["answer"]]))
    return {"words": words, "unknown": sum(unknown.values()), "share": sum(unknown.values()) / max(words, 1),
            "answers_with_unknown": answers, "top": [w for w, _ in unknown.most_common(10)]}


def describe_unknown_words(report: dict) -> str:
    """One console line for :func:`unknown_word_report`."""
    return (f"{report['unknown']} of {report['words']} words of the held-out questions/answers "
            f"({100 * report['share']:.1f}%) are not in the training vocabulary and read as <unk>; "
            f"{report['answers_with_unknown']} answers contain one (they cannot be answered exactly)"
            + (f"; most frequent: {', '.join(report['top'])}" if report["top"] else ""))

"""Held-out data to evaluate on, one interface for the trainer's evaluation and ``stts-eval``.

- ``digits``          the built-in moving-digits eval split (never-seen digit images), any T;
- ``manifest:FILE``   a JSONL manifest of video files, decoded with PyAV (T frames over each clip);
- ``shards:DIR``      a finished shard folder (frames were sampled at sharding time).

``source.samples(frames, rank, world)`` returns this rank's samples (``rank::world``) as dicts
with ``frames`` (T, H, W, 3) uint8, ``question``, ``answer``, ``id``, ``task`` (and, for the
digits, ``objects``: where every digit is in every frame).
"""
from __future__ import annotations

from typing import Any

from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from stts_dist.config import DIGITS_SOURCES



class EvalError(ValueError):
    """Bad evaluation input; the message names it and the fix."""


class DigitsSource:
    """The built-in moving-digits eval split (never-seen digit images), generated at any T."""
    fixed_frames = False

    def __init__(self, cfg: Any, limit: int):
        self.cfg, self.count = cfg, limit or cfg.data.eval_samples
        self.tasks = sorted(set(cfg.data.tasks))
        self.name = "digits"

    def samples(self, frames: int, rank: int, world: int) -> list[dict]:
        from stts_dist.data.digits import make_sample
        d = self.cfg.data
        return [make_sample(i, d.seed, frames, self.cfg.model.vit.image_size, list(d.tasks), split="eval",
                            style=d.digit_style)
                for i in range(rank, self.count, world)]


class ManifestSource:
    """A JSONL manifest of video files (``data_pipeline.manifest``), decoded here with PyAV:
    T frames uniformly over each clip ``[start, end)``, like stts-infer."""
    fixed_frames = False

    def __init__(self, path: str, image_size: int, limit: int):
        from data_pipeline.manifest import read_manifest
        self.entries = read_manifest(path)[:limit or None]
        self.image_size = image_size
        self.tasks = sorted({e.task or "all" for e in self.entries})
        self.name = f"manifest:{path}"
        self.short_clips: dict[int, int] = {}   # requested frames -> clips that had fewer (this rank)

    def samples(self, frames: int, rank: int, world: int) -> list[dict]:
        from data_pipeline.errors import VideoReadError
        from data_pipeline.video import read_clip
        out = []
        for e in self.entries[rank::world]:
            try:
                clip = read_clip(e.video, self.image_size, fps=0.0, max_frames=frames, start=e.start, end=e.end)
            except VideoReadError as err:
                raise EvalError(f"manifest line {e.line} (id {e.id}): {err}") from None
            if len(clip.frames) < frames:
                self.short_clips[frames] = self.short_clips.get(frames, 0) + 1
            out.append({"frames": clip.frames, "question": e.question, "answer": e.answer, "id": e.id, "task": e.task})
        return out


class ShardSource:
    """A finished shard folder (``data_pipeline``): frames were sampled at sharding time, so the
    frame count is the shards' (``--frames`` and test-time scaling do not apply)."""
    fixed_frames = True

    def __init__(self, path: str, limit: int, workers: int = 0):
        from data_pipeline.dataset_index import load_index
        self.path, self.limit, self.workers = path, limit, workers
        self.index = load_index(path)
        self.tasks = sorted({t or "all" for t in self.index.tasks})
        self.name = f"shards:{path}"
        videos = self.index.frames[self.index.is_video]
        self.min_video_frames = int(videos.min()) if len(videos) else 1
        self.frames = int(np.median(self.index.frames))

    def samples(self, frames: int, rank: int, world: int) -> list[dict]:
        from data_pipeline.loader import VideoLoader
        loader = VideoLoader({"datasets": [{"path": self.path}], "shuffle_shards": False, "shuffle_window": 0,
                              "pad_to_equal": True, "num_workers": self.workers}, dp_rank=rank, dp_size=world)
        total = min(self.limit or loader.plan.epoch_size, loader.plan.epoch_size)
        out = []
        for s in loader:
            position = s["meta"]["position"] * world + rank  # rank r reads global positions r, r+W, ...
            if position >= total:  # the wrap-around padding or beyond --samples
                break
            out.append({"frames": s["frames"].numpy(), "question": s["question"], "answer": s["answer"],
                        "id": s["id"], "task": s["task"]})
        return out


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


def unknown_word_report(tokenizer: Any, samples: Sequence[dict]) -> Optional[dict]:
    """Words of the held-out questions and answers outside the training vocabulary (a word
    tokenizer encodes them as ``<unk>``, so an answer made of one can never be matched): counts
    and the most frequent. None for tokenizers without a closed vocabulary (a pretrained LLM's)."""
    if not hasattr(tokenizer, "unknown_words"):
        return None
    from stts_dist.tokenizer import word_pieces
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

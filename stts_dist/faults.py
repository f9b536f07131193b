"""Observing what a training run consumed, for fault drills (``tools/fault_drill.py``).

With ``STTS_SAMPLE_LOG=<path>`` in the environment, every rank appends one line per training
step to ``<path>``::

    start\t<rank>\t<dp_rank>\t<step the run starts from (0, or the resumed checkpoint's step)>
    step\t<rank>\t<dp_rank>\t<step>\t<JSON list of the sample ids this rank trained on>

Lines are written with one ``write`` on an ``O_APPEND`` descriptor, so ranks and restarts can
share one file and a ``kill -9`` loses at most the step that was running.

A restart resumes from its checkpoint and re-runs the steps after it, so the samples a run
really consumed are the *surviving timeline*: per rank, every ``start N`` line discards the
steps after ``N`` logged before it. :func:`surviving_timeline` rebuilds that, and
:func:`compare_timelines` checks it against an uninterrupted run's: the same ids at every step,
nothing lost, nothing repeated.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SAMPLE_LOG_ENV = "STTS_SAMPLE_LOG"

#: rank -> step (1-based) -> ids trained on at that step by that rank
Timeline = dict[int, dict[int, list[str]]]


class SampleLogCallback:
    """Trainer callback writing the sample log described in the module docstring (every rank)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def _write(self, line: str) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self._fd, line.encode("utf-8"))

    def on_train_start(self, trainer: Any) -> None:
        self._write(f"start\t{trainer.rank}\t{trainer.dp_rank}\t{trainer.step}\n")

    def on_step_end(self, trainer: Any, step: int, metrics: dict) -> None:
        ids = list(getattr(trainer, "last_batch_ids", []))
        self._write(f"step\t{trainer.rank}\t{trainer.dp_rank}\t{step}\t{json.dumps(ids)}\n")

    def on_train_end(self, trainer: Any, status: str) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def sample_log_callbacks() -> list:
    """``[SampleLogCallback]`` when ``STTS_SAMPLE_LOG`` is set, else ``[]``."""
    path = os.environ.get(SAMPLE_LOG_ENV, "")
    return [SampleLogCallback(path)] if path else []


def surviving_timeline(path: str | os.PathLike) -> tuple[Timeline, dict[int, list[int]]]:
    """``(timeline, starts)``: per rank, the steps that survive restarts; and per rank the step
    every launch started from, in order. A torn last line (a killed writer) is ignored."""
    timeline: Timeline = {}
    starts: dict[int, list[int]] = {}
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        parts = raw.split("\t")
        if parts[0] == "start" and len(parts) == 4:
            rank, begin = int(parts[1]), int(parts[3])
            starts.setdefault(rank, []).append(begin)
            steps = timeline.setdefault(rank, {})
            for s in [s for s in steps if s > begin]:
                del steps[s]
        elif parts[0] == "step" and len(parts) == 5:
            try:
                ids = json.loads(parts[4])
            except json.JSONDecodeError:
                continue
            timeline.setdefault(int(parts[1]), {})[int(parts[3])] = [str(i) for i in ids]
    return timeline, starts


@dataclass
class TimelineComparison:
    lost: int                      # ids the uninterrupted run trained on that this run never did
    repeated: int                  # extra occurrences of ids beyond the uninterrupted run's count
    mismatched_steps: list[tuple[int, int]] = field(default_factory=list)  # (rank, step) differing
    missing_steps: list[tuple[int, int]] = field(default_factory=list)     # (rank, step) absent

    @property
    def identical(self) -> bool:
        return not (self.lost or self.repeated or self.mismatched_steps or self.missing_steps)


def compare_timelines(run: Timeline, reference: Timeline) -> TimelineComparison:
    """Compare ``run``'s surviving timeline with an uninterrupted ``reference`` run."""
    got, want = Counter(), Counter()
    mismatched, missing = [], []
    for rank, steps in reference.items():
        for step, ids in steps.items():
            want.update(ids)
            other = run.get(rank, {}).get(step)
            if other is None:
                missing.append((rank, step))
            elif other != ids:
                mismatched.append((rank, step))
    for rank, steps in run.items():
        for step, ids in steps.items():
            got.update(ids)
            if step not in reference.get(rank, {}):
                mismatched.append((rank, step))
    lost = sum((want - got).values())
    repeated = sum((got - want).values())
    return TimelineComparison(lost, repeated, sorted(mismatched), sorted(missing))

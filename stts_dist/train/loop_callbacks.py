"""The training loop's own work between steps, as callbacks the :class:`Trainer` always installs
(ahead of the user's: console, MLflow, ...), each reading its interval from the run config.

Hooks used: ``on_step_begin(trainer, step)`` before a step's batch moves to the device,
``on_step_end(trainer, step, metrics)`` after it (``step`` counts finished steps). Order at a step's
end: the user's callbacks (they log the step), then kept-token snapshots, checkpoints, evaluations.
Checkpoint and evaluation at the last step are the loop's (it always saves and evaluates at the end).
"""
from __future__ import annotations

from typing import Any


class InjectedFault(RuntimeError):
    """A deliberate failure requested by cfg.fault (drills and tests)."""


class FaultInjection:
    """``fault.fail_at_step`` / ``fault.fail_rank``: raise at the start of that step on that rank."""

    def __init__(self, fail_at_step: int, fail_rank: int):
        self.fail_at_step, self.fail_rank = fail_at_step, fail_rank

    def on_step_begin(self, trainer: Any, step: int) -> None:
        if self.fail_at_step == step and self.fail_rank in (-1, trainer.rank):
            raise InjectedFault(f"injected fault at step {step} on rank {trainer.rank} (cfg.fault)")


class KeptTokenSnapshots:
    """``tracking.visualize_every``: a picture of what STTS keeps on a held-out clip."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, trainer: Any, step: int, metrics: dict) -> None:
        if self.every and step % self.every == 0:
            trainer.snapshot_kept_tokens()


class PeriodicCheckpoint:
    """``train.save_every``: a checkpoint every N steps before the last."""

    def __init__(self, every: int, total: int):
        self.every, self.total = every, total

    def on_step_end(self, trainer: Any, step: int, metrics: dict) -> None:
        if self.every and step % self.every == 0 and step < self.total:
            trainer.save()


class PeriodicEvaluation:
    """``train.eval_every``: the held-out evaluation every N steps before the last."""

    def __init__(self, every: int, total: int):
        self.every, self.total = every, total

    def on_step_end(self, trainer: Any, step: int, metrics: dict) -> None:
        if self.every and step % self.every == 0 and step < self.total:
            trainer.evaluate()


def loop_callbacks(cfg: Any) -> tuple[list, list]:
    """``(before, after)``: the loop's callbacks that run before the user's (fault injection) and
    after them (snapshots, checkpoints, evaluations)."""
    t = cfg.train
    return ([FaultInjection(cfg.fault.fail_at_step, cfg.fault.fail_rank)],
            [KeptTokenSnapshots(cfg.tracking.visualize_every), PeriodicCheckpoint(t.save_every, t.steps),
             PeriodicEvaluation(t.eval_every, t.steps)])

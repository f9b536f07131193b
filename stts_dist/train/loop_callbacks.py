"""The training loop's own work between steps, as callbacks the :class:`Trainer` always installs
(ahead of the user's: console, MLflow, ...), each reading its interval from the run config.

Hooks used: ``on_step_begin(trainer, step)`` before a step's batch moves to the device,
``on_step_end(trainer, step, metrics)`` after it (``step`` counts finished steps). Order at a step's
end: the user's callbacks (they log the step), then kept-token snapshots, checkpoints, evaluations.
Checkpoint and evaluation at the last step are the loop's (it always saves and evaluates at the end).
"""
from __future__ import annotations

from typing import Any, Optional


class InjectedFault(RuntimeError):
    """A deliberate failure requested by cfg.fault (drills and tests)."""


class FaultInjection:
    """``fault.fail_at_step`` / ``fault.fail_rank``: raise at the start of that step on that rank."""

    def __init__(self, fail_at_step: int, fail_rank: int):
        self.fail_at_step, self.fail_rank = fail_at_step, fail_rank

    def on_step_begin(self, trainer: Any, step: int) -> None:
        if self.fail_at_step == step and self.fail_rank in (-1, trainer.rank):
            raise InjectedFault(f"injected fault at step {step} on rank {trainer.rank} (cfg.fault)")


class EveryNSteps:
    """Calls ``trainer.<action>()`` after every ``every``-th step (0 = never), at steps below
    ``until`` when given (the loop itself saves and evaluates at the last step)."""

    def __init__(self, every: int, action: str, until: Optional[int] = None):
        self.every, self.action, self.until = every, action, until

    def on_step_end(self, trainer: Any, step: int, metrics: dict) -> None:
        if self.every and step % self.every == 0 and (self.until is None or step < self.until):
            getattr(trainer, self.action)()


def loop_callbacks(cfg: Any) -> tuple[list, list]:
    """``(before, after)``: the loop's callbacks that run before the user's (fault injection) and
    after them (snapshots, checkpoints, evaluations)."""
    t = cfg.train
    return ([FaultInjection(cfg.fault.fail_at_step, cfg.fault.fail_rank)],
            [EveryNSteps(cfg.tracking.visualize_every, "snapshot_kept_tokens"),   # tracking.visualize_every
             EveryNSteps(t.save_every, "save", until=t.steps),                    # train.save_every
             EveryNSteps(t.eval_every, "evaluate", until=t.steps)])               # train.eval_every

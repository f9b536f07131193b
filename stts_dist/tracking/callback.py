"""The callback protocol of the training loop.

Cross-cutting concerns (experiment tracking, speed monitors, profilers) plug into the loop as
callbacks instead of ``if`` statements inside it. The trainer calls every registered callback at
these points, on every rank; a callback that should act on one rank only checks
``trainer.is_rank0`` itself.

Subclass :class:`Callback` and override only the hooks you need; the base hooks do nothing.
"""
from __future__ import annotations

from typing import Any, Protocol

#: Values of ``status`` passed to :meth:`Callback.on_train_end` (MLflow's terminal run states).
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


class TrainerView(Protocol):
    """What a callback may read from (and, for ``state``, write to) the trainer."""

    cfg: Any                 # the resolved OmegaConf RunConfig
    is_rank0: bool           # global rank 0
    state: dict[str, Any]    # saved in every checkpoint and restored on resume
    launch_method: str       # torchrun | slurm | ray | local


class Callback:
    """Base class: every hook is a no-op."""

    def on_train_start(self, trainer: TrainerView) -> None:
        """Before the first step, after a resumed checkpoint (if any) restored ``trainer.state``."""

    def on_step_end(self, trainer: TrainerView, step: int, metrics: dict[str, float]) -> None:
        """After optimizer step ``step``; ``metrics`` maps names to scalars (floats or 0-d tensors)."""

    def on_eval_end(self, trainer: TrainerView, step: int, metrics: dict[str, float]) -> None:
        """After an evaluation at training step ``step``."""

    def on_checkpoint(self, trainer: TrainerView, step: int, path: str) -> None:
        """After a checkpoint of step ``step`` was fully written to ``path``."""

    def on_artifact(self, trainer: TrainerView, path: str, artifact_dir: str | None = None) -> None:
        """A file or folder worth keeping with the run (plots, samples); ``artifact_dir`` groups it."""

    def on_train_end(self, trainer: TrainerView, status: str) -> None:
        """Once, at the end; ``status`` is one of :data:`RUN_STATUSES`."""


def check_status(status: str) -> None:
    """Raise a clear error for a ``status`` outside :data:`RUN_STATUSES` (a trainer bug)."""
    if status not in RUN_STATUSES:
        raise ValueError(f"on_train_end status={status!r} must be one of {RUN_STATUSES}")

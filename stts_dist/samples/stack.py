"""The sample-source stack: sampler -> split -> reader -> collate, one feature per stage.

    rows   = sampler.next_rows()          # the global window of the step      (samplers.py)
    mine   = split.assign(rows)           # this rank's rows (strided/balanced) (splits.py)
    batch  = collate(reader.samples(mine)) # generated / decoded in workers     (readers.py)

:class:`SampleStack` plans ``PLAN_AHEAD`` steps at a time (rows only: metadata, no pixels), hands
their row lists to the reader, which builds the batches ahead in its loader workers, and yields
``(this rank's collated batch, the stack's state after that step)``, so a checkpoint records the
exact position and a resumed run consumes exactly the samples the uninterrupted run would have.

State: ``{"version": 2, "sampler": <the sampler's>, "split": <the split's, None when stateless>}``;
:func:`upgrade_state` reads the formats written before the stack (the unbalanced digits
sampler's, the shard loader's and the balanced source's), so older checkpoints resume.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterator

import numpy as np

from stts_dist.samples.splits import TokenCountMismatch

PLAN_AHEAD = 64     # steps planned (and built ahead by the reader's workers) at a time
STATE_VERSION = 2


def upgrade_state(state: dict) -> dict:
    """A saved source state in the stack's format (older formats converted, see the module doc)."""
    if state.get("version") == STATE_VERSION and "sampler" in state:
        return state
    if "planner" in state and "window" in state:       # the balanced source (version 1)
        return {"version": STATE_VERSION, "sampler": state["window"],
                "split": {"next_step": state["next_step"], "planner": state["planner"]}}
    if "epoch" in state and "position" in state:       # the digits sampler / the shard loader
        return {"version": STATE_VERSION, "sampler": state, "split": None}
    raise ValueError(f"the checkpoint's data-source state (keys {sorted(state)}) was not written by a training "
                     "source of this framework; resume with the data settings the run was started with")


class SampleStack:
    """``sampler`` (``next_rows``, state), ``split`` (``assign``, ``check``, state) and ``reader``
    (``batches``). After each yielded batch, ``last_metrics`` holds the step's split metrics
    (e.g. ``balance/*``, identical on every rank) and ``last_plan`` the balancer's plan (None
    for the strided split)."""

    def __init__(self, sampler: Any, split: Any, reader: Any, plan_ahead: int = PLAN_AHEAD):
        self.sampler, self.split, self.reader, self.plan_ahead = sampler, split, reader, plan_ahead
        self.last_metrics: dict[str, float] = {}
        self.last_plan: Any = None
        self._state = self._live_state()

    # -- state -----------------------------------------------------------------------------------
    def _live_state(self) -> dict:
        return {"version": STATE_VERSION, "sampler": self.sampler.state_dict(), "split": self.split.state_dict()}

    def state_dict(self) -> dict:
        """The state after the last yielded step."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._restore(upgrade_state(state))

    def _restore(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.split.load_state_dict(state["split"])
        self._state = copy.deepcopy(state)

    @property
    def deferred_rows(self) -> np.ndarray:
        """Rows the balancer planned for a later step (in the state; empty for the strided split)."""
        split = self._state["split"] or {}
        return np.asarray(split.get("planner", {}).get("deferred", {}).get("index", []), dtype=np.int64)

    # -- iteration -------------------------------------------------------------------------------
    def batches(self, num_steps: int, collate: Callable) -> Iterator[tuple[Any, dict]]:
        """``num_steps`` pairs ``(this rank's collated batch, state after the step)``."""
        self._restore(self._state)           # an abandoned earlier iterator may have planned ahead
        done = 0
        while done < num_steps:
            ahead = []
            for _ in range(min(self.plan_ahead, num_steps - done)):
                rows, metrics = self.split.assign(self.sampler.next_rows())
                ahead.append((rows, metrics, self.split.last_plan, self._live_state()))
            built = self.reader.batches([a[0].tolist() for a in ahead], collate)
            for (rows, metrics, plan, state), batch in zip(ahead, built):
                try:
                    self.split.check(rows, batch)
                except TokenCountMismatch as err:
                    raise TokenCountMismatch(f"step {plan.step if plan is not None else '?'}: {err}") from None
                self._state, self.last_plan, self.last_metrics = state, plan, metrics
                done += 1
                yield batch, copy.deepcopy(state)


__all__ = ["SampleStack", "PLAN_AHEAD", "upgrade_state"]

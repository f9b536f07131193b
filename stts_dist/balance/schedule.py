"""Which samples each global step draws, and the schedule that feeds them to the planner.

:class:`CandidateWindow` is the run's sample order: epoch ``e`` is the seeded permutation
``default_rng([seed, e])`` of the dataset rows, consumed in equal windows. It is the one
implementation of that order: the balanced schedule here and the sample-source stack's
``PermutationSampler`` (``stts_dist.samples``: the unbalanced digits batches and the balancer's
candidate windows) draw from it, so balanced and unbalanced runs visit the same samples in the
same order. :func:`plan_window` is the one step "window + deferred samples ->
:class:`~stts_dist.balance.planner.Plan`" that :class:`BalancedSchedule` and the stack's
``BalancedSplit`` share.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .cost_model import SampleMeta, SampleTable
from .planner import BalancePlanner, Plan


class CandidateWindow:
    """Which dataset rows are the new candidates of step ``s``: a pure function of (seed, s).

    Epoch ``e`` visits the rows in ``default_rng([seed, e]).permutation(num_samples)`` in windows
    of ``window_size``; the ragged tail of an epoch (``num_samples % window_size`` rows, a
    different set each epoch) is skipped so that a window never straddles two epochs and never
    holds a row twice.

    State, the cursor ``(cursor_epoch, cursor_offset)``: the epoch of the last window drawn and
    the row offset just after it. The move to the next epoch waits until the next window is
    drawn, so ``(e, steps_per_epoch * window_size)`` and ``(e + 1, 0)`` draw the same window;
    the stack's ``PermutationSampler`` checkpoints the cursor as it is. An offset
    off the window grid (a run resumed with another window size, :meth:`seek`) continues from
    there. ``next_step``, ``epoch`` and ``position`` describe the next window on the grid; this
    class's own checkpoint (:meth:`state_dict`) only needs ``next_step``."""

    def __init__(self, num_samples: int, window_size: int, seed: int = 0) -> None:
        if num_samples < 1 or window_size < 1:
            raise ValueError(f"num_samples={num_samples} and window_size={window_size} must be >= 1")
        if window_size > num_samples:
            raise ValueError(f"window_size={window_size} exceeds the {num_samples} samples of the dataset")
        self.num_samples, self.window_size, self.seed = int(num_samples), int(window_size), int(seed)
        self.steps_per_epoch = self.num_samples // self.window_size
        self.cursor_epoch, self.cursor_offset = 0, 0
        self._perm_cache: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s visiting order of the rows, shape ``(num_samples,)`` (cached: the
        permutation of a large dataset costs more than a plan)."""
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 2:
                self._perm_cache.pop(min(self._perm_cache))
            self._perm_cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._perm_cache[epoch]

    def rows(self, step: int) -> np.ndarray:
        """Dataset rows of step ``step``, shape ``(window_size,)``, all distinct."""
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.window_size
        return self.order(epoch)[start:start + self.window_size].astype(np.int64)

    def next_rows(self) -> tuple[int, np.ndarray]:
        """Draws the next window: ``(its step, its rows of shape (window_size,))``."""
        step = self.next_step
        if self.cursor_offset + self.window_size > self.num_samples:   # only the ragged tail is left
            self.cursor_epoch, self.cursor_offset = self.cursor_epoch + 1, 0
        start = self.cursor_offset
        self.cursor_offset += self.window_size
        return step, self.order(self.cursor_epoch)[start:start + self.window_size].astype(np.int64)

    def seek(self, cursor_epoch: int, cursor_offset: int) -> None:
        """Continue after row ``cursor_offset`` of epoch ``cursor_epoch``'s order (see the class doc)."""
        self.cursor_epoch, self.cursor_offset = int(cursor_epoch), int(cursor_offset)

    @property
    def next_step(self) -> int:
        """Windows drawn so far, i.e. the step of the next window."""
        return self.cursor_epoch * self.steps_per_epoch + self.cursor_offset // self.window_size

    @property
    def epoch(self) -> int:
        """Epoch of the next window."""
        return self.next_step // self.steps_per_epoch

    @property
    def position(self) -> int:
        """Row offset of the next window in its epoch's order."""
        return self.next_step % self.steps_per_epoch * self.window_size

    def state_dict(self) -> dict:
        return {"num_samples": self.num_samples, "window_size": self.window_size, "seed": self.seed,
                "next_step": self.next_step, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_samples", "window_size", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"CandidateWindow.load_state_dict: saved {key}={state[key]} but now "
                                 f"{getattr(self, key)}; resume needs the same dataset index, window and seed")
        epoch, k = divmod(int(state["next_step"]), self.steps_per_epoch)
        self.seek(epoch, k * self.window_size)


def plan_window(planner: BalancePlanner, table: SampleTable, step: int, rows: np.ndarray) -> Plan:
    """Plan global step ``step`` for the window ``rows`` (rows of ``table``, shape ``(w,)``) plus
    the samples ``planner`` deferred earlier (those go first).

    A window row whose sample is still deferred has come round again in the next epoch before it
    was placed: it is dropped here, once is enough (the planner refuses a sample twice)."""
    pending = planner.deferred.index
    if len(pending):
        rows = rows[~np.isin(table.index[rows], pending)]
    return planner.plan(step, table.take(rows))


class BalancedSchedule:
    """Window + planner: ``next_plan()`` draws step ``s``'s window from the dataset index and plans
    it (deferred samples first). Every rank holds one and computes the same plans; its state
    (window position + deferred samples) goes into the checkpoint."""

    def __init__(self, index: SampleTable | Sequence[SampleMeta], planner: BalancePlanner, window_size: int,
                 seed: int = 0) -> None:
        self.index = SampleTable.coerce(index)
        self.planner = planner
        self.window = CandidateWindow(len(self.index), window_size, seed)
        if window_size < planner.num_ranks:
            raise ValueError(f"window_size={window_size} < num_ranks={planner.num_ranks}: every rank needs a sample")

    def next_plan(self) -> Plan:
        step, rows = self.window.next_rows()
        return plan_window(self.planner, self.index, step, rows)

    def state_dict(self) -> dict:
        return {"window": self.window.state_dict(), "planner": self.planner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.window.load_state_dict(state["window"])
        self.planner.load_state_dict(state["planner"])

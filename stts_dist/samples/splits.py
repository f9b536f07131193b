"""Stage 2 of the sample-source stack: which rows of the global window this rank reads.

- :class:`StridedSplit`: rank ``r`` of ``R`` takes rows ``r, r+R, ...`` (stateless);
- :class:`BalancedSplit`: the pruning-aware token balancer (``stts_dist.balance``, design in
  docs/balancing.md). Every rank runs :class:`~stts_dist.balance.BalancePlanner` on the window's
  *metadata* plus the samples deferred from earlier steps (``balance.schedule.plan_window``) and
  gets the same :class:`~stts_dist.balance.Plan` as every other rank -- a pure function of seed,
  step, metadata and planner state: no pixels move, no collective, no driver. One micro-batch
  per rank per step, so every rank runs exactly one forward/backward (ZeRO-3 hangs otherwise);
  samples that do not fit the per-micro-batch budgets are deferred to a later step, never
  dropped. State: the step count and the planner's (the deferred samples with their ages).

``assign(rows)`` returns this rank's rows of the step and the step's metrics (``balance/*``,
identical on every rank); ``check(rows, batch)`` verifies a collated batch against what was
planned for it.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np

from stts_dist.balance import BalancePlanner, Plan, SampleTable, balance_metrics, in_order_imbalance
from stts_dist.balance.schedule import plan_window


class TokenCountMismatch(RuntimeError):
    """A collated sample's sequence length differs from the length the planner budgeted."""


class StridedSplit:
    """Rank ``dp_rank`` of ``dp_size`` takes every ``dp_size``-th row of the window."""

    last_plan = None                  # nothing is planned beyond the rows

    def __init__(self, dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} outside [0, dp_size={dp_size})")
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def assign(self, rows: np.ndarray) -> tuple[np.ndarray, dict]:
        """This rank's rows of the window ``rows`` (W,), shape ``(W // dp_size,)``; no metrics."""
        return rows[self.dp_rank::self.dp_size], {}

    def check(self, rows: np.ndarray, batch: Any) -> None:
        """Nothing was planned beyond the rows themselves."""

    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state is not None:
            raise ValueError("the checkpoint's data-source state was written by the balanced source (keys "
                             f"{sorted(state)}); resume with the balance settings the run was started with "
                             "(balance.enabled=true)")


class BalancedSplit:
    """The balancer as a split. ``table``: metadata of every dataset row (``index == row``);
    ``exact_text``: whether the table's text counts are the builder's exactly (else an upper
    bound, checked as such). After each ``assign``, ``last_plan`` holds the step's plan."""

    def __init__(self, table: SampleTable, planner: BalancePlanner, window: int, dp_rank: int,
                 exact_text: bool = True):
        if not np.array_equal(table.index, np.arange(len(table))):
            raise ValueError("BalancedSplit: table.index must be the dataset rows 0..n-1")
        if not 0 <= dp_rank < planner.num_ranks:
            raise ValueError(f"dp_rank={dp_rank} outside the planner's {planner.num_ranks} ranks")
        if window < planner.num_ranks:
            raise ValueError(f"balance.window={window} is smaller than the data-parallel size {planner.num_ranks}: "
                             "every rank needs a sample per step; raise balance.window or train.batch_size")
        if window > len(table):
            raise ValueError(f"balance.window={window} exceeds the {len(table)} samples of the dataset; lower "
                             "balance.window (or train.batch_size) or add data")
        self.table, self.planner, self.dp_rank, self.exact_text = table, planner, dp_rank, exact_text
        self.next_step = 0
        self.last_plan: Optional[Plan] = None
        self._check_budgets()

    def _check_budgets(self) -> None:
        """Fail at start-up, not at step 10,000, if some sample can never fit a micro-batch."""
        p, t = self.planner, self.table
        too_long = np.nonzero((t.llm_tokens > p.max_llm_tokens) | (t.frames > p.max_vit_frames))[0]
        if len(too_long):
            i = int(too_long[np.argmax(t.llm_tokens[too_long])])
            raise ValueError(f"{len(too_long)} samples can never fit one micro-batch (e.g. row {i}: "
                             f"{int(t.llm_tokens[i])} LLM tokens, {int(t.frames[i])} frames) under "
                             f"balance.max_llm_tokens_per_micro={p.max_llm_tokens} / balance.max_vit_frames_per_micro="
                             f"{p.max_vit_frames}; raise the budgets to at least {int(t.llm_tokens.max())} tokens and "
                             f"{int(t.frames.max())} frames (or 0 = unbounded)")

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"next_step": self.next_step, "planner": self.planner.state_dict()}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not state or "planner" not in state:
            raise ValueError("the checkpoint's data-source state was not written by the balanced source (keys "
                             f"{sorted(state or {})}); resume with the balance settings the run was started with")
        self.planner.load_state_dict(state["planner"])
        self.next_step = int(state["next_step"])

    # -- planning --------------------------------------------------------------------------------
    def plan(self, rows: np.ndarray) -> tuple[Plan, dict]:
        """Plan the next global step from its new candidate ``rows`` (identically on every rank);
        returns the plan and its metrics."""
        started = time.perf_counter()
        # the split's step count (checkpointed as next_step), not the sampler's: the two differ once a
        # run resumes with another window size
        plan = plan_window(self.planner, self.table, self.next_step, np.asarray(rows, dtype=np.int64))
        self.next_step += 1
        plan_ms = 1e3 * (time.perf_counter() - started)
        pool = self.table.take(np.concatenate([plan.sample_index, plan.deferred]))
        metrics = balance_metrics(plan, pool, self.planner.cost_model)
        # the step's samples split without balancing (rank r takes every R-th, in row order, which
        # is as random in length as the sampler's order): the end-of-run summary's comparison
        metrics["balance/cost_imbalance_in_order"] = in_order_imbalance(
            self.table, np.sort(plan.sample_index), self.planner.num_ranks, self.planner.cost_model)
        metrics["balance/plan_ms"] = plan_ms
        self.last_plan = plan
        return plan, metrics

    def assign(self, rows: np.ndarray) -> tuple[np.ndarray, dict]:
        plan, metrics = self.plan(rows)
        mine = plan.micro_batch(self.dp_rank, 0)
        if len(mine) == 0:
            raise RuntimeError(f"step {plan.step}: the plan gives rank {self.dp_rank} no sample; every rank "
                               "must run one forward per step (ZeRO-3)")
        return mine, metrics

    def check(self, rows: np.ndarray, batch: Any) -> None:
        """The collated ``batch`` of ``rows`` has the sequence lengths that were budgeted."""
        planned = self.table.llm_tokens[rows]
        actual = np.asarray(batch.seq_lengths, dtype=np.int64)
        bad = actual != planned if self.exact_text else actual > planned
        if np.any(bad):
            i = int(np.nonzero(bad)[0][0])
            raise TokenCountMismatch(
                f"sample {batch.ids[i]} (row {int(rows[i])}) has {int(actual[i])} LLM tokens but the "
                f"balancer budgeted {int(planned[i])} from its metadata ({len(np.nonzero(bad)[0])} such samples); "
                "the metadata (frames, text tokens, follow-up turns, prune ratio, frame separators) disagrees with "
                "the data -- re-shard with the model's settings (shards written before follow-up turns were "
                "counted in index.json need it too)")

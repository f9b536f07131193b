"""Pruning-aware assignment of samples to data-parallel ranks x micro-batches.

Every rank runs :meth:`BalancePlanner.plan` on the same candidate window and gets the same
:class:`Plan` (pure function of seed, step, the candidates and the planner state), then takes its
own row. No pixels move and there is no driver round trip.

Goal: in every micro-step, every rank does the same modelled work, subject to per-micro-batch
budgets (LLM tokens of the packed sequence, ViT frames). Method ``kk``:

1. ``K = ranks x micro_batches`` bins. Karmarkar-Karp largest differencing with equal counts:
   the costs, sorted, are cut into chunks of ``K`` (one item per bin = a partial partition);
   the two partial partitions with the largest spread are merged repeatedly, heaviest bin of
   one with lightest bin of the other. Vectorised: one merge is one sort of ``K`` loads.
2. Budget repair: an over-budget bin hands an item to the lightest bin with room; if no bin has
   room the sample is deferred to the next step. If anything had to be deferred, greedy LPT
   (budget-aware, largest cost first into the lightest bin with room) is tried as the fallback
   and whichever defers fewer samples is kept.
3. Pairwise refinement: bins grouped by the micro-step they will run in, heaviest paired with
   lightest; in every pair at once the best single move or swap (closest to half the gap,
   within budgets) is applied. Moves relax KK's equal counts, which is what lets a bin of
   images balance a bin of videos.
4. LPT fallback: plain LPT (vectorised, exact) is computed as well; the plan with fewer deferred
   samples, then the shorter critical path, is kept (LPT tends to win when bins hold few,
   similar samples; KK + refinement when there are many small ones).
5. Bins are sorted by load and cut into micro-steps of ``ranks`` bins, so the bins that run
   together are the most alike; within a micro-step the ranks get them in a seeded order.

All arithmetic on costs is integer (costs quantised to 2^30 levels per window), so every rank
computes a bit-identical plan whatever its summation order. The partition algorithms of steps 1-4
are pure functions in ``partition.py``; which samples are the candidates of a step, and the
schedule that feeds them to the planner, are in ``schedule.py``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .cost_model import CostModel, SampleMeta, SampleTable
from .partition import (argsort_int, bin_sums, greedy_lpt, greedy_lpt_budgeted, karmarkar_karp_equal, over_budget,
                        quantize_costs, refine_pairs, repair_budgets, stable_order, step_critical_path)
from .seq_packing import aligned_lengths

METHODS = ("kk", "lpt", "naive")


# ------------------------------------------------------------------------------------------
# Plan

@dataclass
class Plan:
    """Assignment of one global step.

    ``sample_index`` shape ``(n_assigned,)``: dataset indices grouped by slot ``r*M + m``
    (rank ``r``, micro-step ``m``); ``slot_offsets`` shape ``(R*M + 1,)`` CSR offsets into it;
    ``slot_cost`` shape ``(R, M)`` modelled cost; ``deferred`` dataset indices carried to the
    next step."""
    step: int
    num_ranks: int
    micro_batches: int
    sample_index: np.ndarray
    slot_offsets: np.ndarray
    slot_cost: np.ndarray
    deferred: np.ndarray
    method: str
    max_llm_tokens: int
    align: int

    def micro_batch(self, rank: int, micro: int) -> np.ndarray:
        if not (0 <= rank < self.num_ranks and 0 <= micro < self.micro_batches):
            raise IndexError(f"rank={rank}, micro={micro} outside the plan's {self.num_ranks} ranks x "
                             f"{self.micro_batches} micro-batches")
        s = rank * self.micro_batches + micro
        return self.sample_index[self.slot_offsets[s]:self.slot_offsets[s + 1]]

    def rank_micro_batches(self, rank: int) -> list[np.ndarray]:
        """This rank's part: one array of dataset indices per micro-step, in execution order."""
        return [self.micro_batch(rank, m) for m in range(self.micro_batches)]

    def to_lists(self) -> list[list[list[int]]]:
        return [[mb.tolist() for mb in self.rank_micro_batches(r)] for r in range(self.num_ranks)]

    @property
    def assigned(self) -> np.ndarray:
        return self.sample_index

    def signature(self) -> str:
        """Hash of the assignment (equal on every rank that computed the same plan)."""
        h = hashlib.sha256()
        for arr in (self.sample_index, self.slot_offsets, self.deferred):
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        h.update(f"{self.step},{self.num_ranks},{self.micro_batches}".encode())
        return h.hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return (self.step, self.num_ranks, self.micro_batches) == (other.step, other.num_ranks, other.micro_batches) \
            and np.array_equal(self.sample_index, other.sample_index) \
            and np.array_equal(self.slot_offsets, other.slot_offsets) \
            and np.array_equal(self.deferred, other.deferred)


# ------------------------------------------------------------------------------------------
# Planner

class BalancePlanner:
    """Plans each global step: candidates -> (rank, micro-step) -> sample indices.

    ``micro_batches_per_rank=None``: the fewest micro-batches that hold the window within the
    budgets at ``fill`` (headroom for packing granularity). ``align``: LLM token alignment of
    each sample inside a packed sequence (budgets count aligned tokens). ``cost_model=None``
    balances aligned LLM tokens only. Samples that fit no budget this step are deferred to the
    next one (they go first); a sample deferred ``pin_after`` times is placed before all others.
    """

    def __init__(self, num_ranks: int, micro_batches_per_rank: Optional[int], max_llm_tokens_per_micro: int,
                 max_vit_frames_per_micro: int, seed: int = 0, method: str = "kk",
                 cost_model: Optional[CostModel] = None, align: int = 1, fill: float = 0.95,
                 refine_rounds: int = 4, pin_after: int = 2) -> None:
        if num_ranks < 1:
            raise ValueError(f"num_ranks={num_ranks} must be >= 1")
        if micro_batches_per_rank is not None and micro_batches_per_rank < 1:
            raise ValueError(f"micro_batches_per_rank={micro_batches_per_rank} must be >= 1 or None (auto)")
        if max_llm_tokens_per_micro < 1 or max_vit_frames_per_micro < 1:
            raise ValueError("max_llm_tokens_per_micro and max_vit_frames_per_micro must be >= 1")
        if method not in METHODS:
            raise ValueError(f"method='{method}' is not one of {METHODS}")
        if not 0 < fill <= 1:
            raise ValueError(f"fill={fill} must be in (0, 1]")
        self.num_ranks = int(num_ranks)
        self.micro_batches_per_rank = micro_batches_per_rank
        self.max_llm_tokens = int(max_llm_tokens_per_micro)
        self.max_vit_frames = int(max_vit_frames_per_micro)
        self.seed = int(seed)
        self.method = method
        self.cost_model = cost_model
        self.align = int(align)
        self.fill = float(fill)
        self.refine_rounds = int(refine_rounds)
        self.pin_after = int(pin_after)
        aligned_lengths([0], self.align)                  # validates align
        self._deferred = SampleTable.empty()
        self._deferred_age = np.zeros(0, np.int64)
        self._last_step: Optional[int] = None
        self.last_start: Optional[str] = None            # which start won the last kk plan (for benchmarks)

    # -- state ----------------------------------------------------------------------------------
    @property
    def deferred(self) -> SampleTable:
        return self._deferred

    def _config(self) -> dict:
        """Everything the plans depend on besides the data; a resume must match it exactly."""
        cm = None
        if self.cost_model is not None:
            cm = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.cost_model).items()}
        return {"num_ranks": self.num_ranks, "micro_batches_per_rank": self.micro_batches_per_rank,
                "max_llm_tokens_per_micro": self.max_llm_tokens, "max_vit_frames_per_micro": self.max_vit_frames,
                "seed": self.seed, "method": self.method, "align": self.align, "fill": self.fill,
                "refine_rounds": self.refine_rounds, "pin_after": self.pin_after, "cost_model": cm}

    def state_dict(self) -> dict:
        d = self._deferred
        return {"version": 1, "config": self._config(), "last_step": self._last_step,
                "deferred": {name: getattr(d, name).tolist() for name in
                             ("index", "frames", "patches_per_frame", "groups_per_frame", "llm_visual_tokens",
                              "text_tokens", "is_video", "vit_patches_kept")},
                "deferred_age": self._deferred_age.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(f"BalancePlanner state version {state.get('version')} is not supported (expected 1)")
        mine = self._config()
        saved = state["config"]
        diff = {k: (saved.get(k), mine[k]) for k in mine if saved.get(k) != mine[k]}
        if diff:
            raise ValueError("BalancePlanner.load_state_dict: the checkpoint was planned with a different setup "
                             + ", ".join(f"{k}: saved {a} vs now {b}" for k, (a, b) in diff.items())
                             + "; resume with the same DP degree, budgets, seed and method")
        self._deferred = SampleTable(**state["deferred"])
        self._deferred_age = np.asarray(state["deferred_age"], dtype=np.int64)
        self._last_step = state["last_step"]

    # -- planning -------------------------------------------------------------------------------
    def plan(self, step: int, candidates: SampleTable | Sequence[SampleMeta]) -> Plan:
        """Assign the deferred samples plus ``candidates`` for global step ``step``."""
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"plan(step={step}) after step {self._last_step}: steps must increase "
                             "(to replay a step, load the planner state saved before it)")
        new = SampleTable.coerce(candidates)
        pool = SampleTable.concat([self._deferred, new])
        age = np.concatenate([self._deferred_age, np.zeros(len(new), np.int64)])
        sorted_index = np.sort(pool.index)
        if np.any(sorted_index[1:] == sorted_index[:-1]):
            raise ValueError(f"plan(step={step}): a sample index appears twice among the deferred samples and the "
                             "candidates; the window must not repeat samples within an epoch")
        R = self.num_ranks
        if len(pool) < R:
            raise ValueError(f"plan(step={step}): {len(pool)} candidate samples for {R} ranks; every rank needs at "
                             "least one sample per micro-step, use a window of at least num_ranks samples")
        tokens = aligned_lengths(pool.llm_tokens, self.align)
        sizes = np.stack([tokens, pool.frames], axis=1)
        caps = np.array([self.max_llm_tokens, self.max_vit_frames], np.int64)
        self._check_fits(pool, sizes, caps)
        real_costs = self.cost_model.costs(pool) if self.cost_model is not None else tokens.astype(np.float64)
        costs = quantize_costs(real_costs)
        M = self._micro_batches(sizes, caps, len(pool))
        K = R * M
        pinned = age >= self.pin_after
        if self.method == "naive":
            bin_of = self._naive(sizes, caps, M)
        else:
            bin_of = self._balanced(costs, sizes, caps, K, pinned)
        plan = self._arrange(step, pool, bin_of, costs, real_costs, M)
        deferred = bin_of < 0
        if deferred.sum() > max(len(new), 1):
            warnings.warn(f"BalancePlanner: {int(deferred.sum())} samples deferred at step {step}, more than a window "
                          f"brings ({len(new)}); the budgets hold less than the window: raise micro_batches_per_rank "
                          "(or pass None for auto) or the per-micro-batch budgets", RuntimeWarning, stacklevel=2)
        self._deferred = pool.take(np.nonzero(deferred)[0])
        self._deferred_age = age[deferred] + 1
        self._last_step = step
        return plan

    def _check_fits(self, pool: SampleTable, sizes: np.ndarray, caps: np.ndarray) -> None:
        bad = np.nonzero(np.any(sizes > caps, axis=1))[0]
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                f"sample {int(pool.index[i])} needs {int(sizes[i, 0])} LLM tokens and {int(sizes[i, 1])} ViT frames but "
                f"a micro-batch holds max_llm_tokens_per_micro={self.max_llm_tokens}, "
                f"max_vit_frames_per_micro={self.max_vit_frames}; raise the budgets or cap the frames per video "
                f"({len(bad)} such samples in this window)")

    def _micro_batches(self, sizes: np.ndarray, caps: np.ndarray, n: int) -> int:
        if self.micro_batches_per_rank is not None:
            M = self.micro_batches_per_rank
        else:
            need = sizes.sum(axis=0) / (self.num_ranks * caps * self.fill)
            M = max(1, int(np.ceil(need.max())))
        if self.num_ranks * M > n:
            if self.micro_batches_per_rank is not None:
                raise ValueError(f"{n} samples cannot fill {self.num_ranks} ranks x {M} micro-batches; use a larger "
                                 "window or fewer micro_batches_per_rank")
            M = n // self.num_ranks
        return M

    def _balanced(self, costs: np.ndarray, sizes: np.ndarray, caps: np.ndarray, K: int,
                  pinned: np.ndarray) -> np.ndarray:
        """kk: KK (equal counts) refined by pairwise moves/swaps, and plain LPT as the fallback;
        the better plan is kept (fewer deferred samples, then shorter critical path).
        lpt: plain LPT only. Each start is repaired to the budgets first."""
        starts = [(karmarkar_karp_equal, True), (greedy_lpt, False)] if self.method == "kk" else [(greedy_lpt, False)]
        best, best_key = None, None
        for start, refine in starts:
            name = "kk" if start is karmarkar_karp_equal else "lpt"
            bin_of = start(costs, K)
            if np.any(over_budget(bin_of, sizes, caps, K)):
                bin_of = repair_budgets(bin_of, costs, sizes, caps, K, pinned)
                if np.any(bin_of < 0):                   # budget-aware LPT; keep whichever defers less
                    fallback = greedy_lpt_budgeted(costs, K, sizes, caps, first=pinned)
                    if _deferral_key(fallback, pinned) < _deferral_key(bin_of, pinned):
                        bin_of = fallback
            if refine and self.refine_rounds:
                bin_of = refine_pairs(bin_of, costs, K, sizes, caps, allow_moves=True,
                                      rounds=self.refine_rounds, block=self.num_ranks)
            key = (*_deferral_key(bin_of, pinned), step_critical_path(bin_sums(bin_of, costs, K), self.num_ranks))
            if best_key is None or key < best_key:
                best, best_key, self.last_start = bin_of, key, name
        return best

    def _naive(self, sizes: np.ndarray, caps: np.ndarray, M: int) -> np.ndarray:
        """Sequential, what a plain trainer does: sample i -> rank i mod R (DistributedSampler
        order); each rank cuts its samples, in order, into M micro-batches of equal count. A
        sample that would break a micro-batch's budget is deferred instead."""
        R = self.num_ranks
        bin_of = np.full(len(sizes), -1, np.int64)
        cols = [sizes[:, d].tolist() for d in range(sizes.shape[1])]
        limits = caps.tolist()
        for r in range(R):
            mine = list(range(r, len(sizes), R))
            for m, chunk in enumerate(np.array_split(np.asarray(mine, dtype=np.int64), M)):
                used = [0] * len(cols)
                for i in chunk.tolist():
                    if all(u + col[i] <= cap for u, col, cap in zip(used, cols, limits)):
                        used = [u + col[i] for u, col in zip(used, cols)]
                        bin_of[i] = r * M + m
        return bin_of

    def _arrange(self, step: int, pool: SampleTable, bin_of: np.ndarray, costs: np.ndarray,
                 real_costs: np.ndarray, M: int) -> Plan:
        """Bins -> (rank, micro-step) slots: micro-steps take bins in load order, ranks get them in a
        seeded (per step) order reversed on every other micro-step so no rank is always heaviest."""
        R, K = self.num_ranks, self.num_ranks * M
        if self.method == "naive":
            slot_of_bin = np.arange(K)                     # naive bins are already r*M + m
        else:
            loads = bin_sums(bin_of, costs, K)
            by_load = argsort_int(loads, descending=True)  # heaviest first, ties by bin id
            rank_order = np.random.default_rng([self.seed, step]).permutation(R)
            slot_of_bin = np.empty(K, np.int64)
            for m in range(M):
                ranks = rank_order if m % 2 == 0 else rank_order[::-1]
                slot_of_bin[by_load[m * R:(m + 1) * R]] = ranks * M + m
        placed = np.nonzero(bin_of >= 0)[0]
        slots = slot_of_bin[bin_of[placed]]
        members = placed[stable_order(slots)]
        offsets = np.zeros(K + 1, np.int64)
        np.cumsum(np.bincount(slots, minlength=K), out=offsets[1:])
        slot_cost = np.bincount(slots, weights=real_costs[placed], minlength=K).reshape(R, M)
        return Plan(step=int(step), num_ranks=R, micro_batches=M, sample_index=pool.index[members],
                    slot_offsets=offsets, slot_cost=slot_cost, deferred=pool.index[bin_of < 0],
                    method=self.method, max_llm_tokens=self.max_llm_tokens, align=self.align)


def _deferral_key(bin_of: np.ndarray, pinned: np.ndarray) -> tuple[int, int]:
    """(pinned samples deferred, samples deferred): smaller is better, pinned ones count first
    because they have already waited ``pin_after`` steps."""
    deferred = bin_of < 0
    return int(np.sum(deferred & pinned)), int(np.sum(deferred))

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
computes a bit-identical plan whatever its summation order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .cost_model import CostModel, SampleMeta, SampleTable
from .seq_packing import aligned_lengths

METHODS = ("kk", "lpt", "naive")
_QUANT = 1 << 30           # max quantised cost of one sample; sums stay exact in float64 up to 2^53
_KEY = 1 << 31             # key stride for (pair, cost) integer search keys


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
# Partitioning primitives (pure functions on integer costs)

def quantize_costs(costs: np.ndarray) -> np.ndarray:
    """Costs as int64 in ``[1, 2^30]`` (relative resolution 1e-9); shape kept."""
    costs = np.asarray(costs, dtype=np.float64)
    if len(costs) == 0:
        return np.zeros(0, np.int64)
    if not np.all(np.isfinite(costs)) or costs.min() < 0:
        raise ValueError("sample costs must be finite and >= 0; check the cost model's inputs")
    top = costs.max()
    if top == 0:
        return np.ones(len(costs), np.int64)
    return np.maximum(np.rint(costs * (_QUANT / top)), 1).astype(np.int64)


def _argsort_int(values: np.ndarray, descending: bool = False) -> np.ndarray:
    """Stable argsort of non-negative int64 values, fast and identical on every machine.

    Packs ``(value, position)`` into one unique int64 key so a plain (SIMD, unstable) sort
    gives the stable order — unstable sorts may order ties differently on different CPUs,
    which would give ranks different plans. Falls back to a stable sort when it cannot pack."""
    values = np.asarray(values, dtype=np.int64)
    n = len(values)
    if n == 0:
        return np.zeros(0, np.int64)
    bits = max(int(n - 1).bit_length(), 1)
    top = int(values.max())
    if values.min() < 0 or top >= (1 << (62 - bits)):
        return np.argsort(-values if descending else values, kind="stable")
    v = (top - values) if descending else values
    keys = np.sort((v << bits) | np.arange(n, dtype=np.int64))
    return keys & ((1 << bits) - 1)


def karmarkar_karp_equal(costs: np.ndarray, k: int) -> np.ndarray:
    """k-way largest differencing with equal counts; returns bin per item, shape ``(n,)``.

    Items (sorted, padded with zero-cost dummies to a multiple of ``k``) are cut into chunks of
    ``k``; each chunk is a partial partition with one item per bin. The two partial partitions
    with the largest spread (max - min load) are merged, pairing the heaviest bin of one with
    the lightest of the other, until one remains. Every bin gets ``ceil`` or ``floor(n/k)`` items.
    """
    costs = np.asarray(costs, dtype=np.int64)
    n = len(costs)
    if k < 1:
        raise ValueError(f"k={k} partitions must be >= 1")
    if n == 0:
        return np.zeros(0, np.int64)
    order = _argsort_int(costs, descending=True)
    pad = (-n) % k
    vals = np.concatenate([costs[order], np.zeros(pad, np.int64)])
    ids = np.concatenate([order, np.full(pad, -1, np.int64)])
    chunks = len(vals) // k
    # each state: loads ascending (k,), members (k, items) — the item lists of each bin
    heap = []
    for c in range(chunks):
        v = vals[c * k:(c + 1) * k][::-1].copy()          # ascending
        m = ids[c * k:(c + 1) * k][::-1].reshape(k, 1).copy()
        heap.append((-int(v[-1] - v[0]), c, v, m))
    heapq.heapify(heap)
    counter = chunks
    while len(heap) > 1:
        _, _, va, ma = heapq.heappop(heap)
        _, _, vb, mb = heapq.heappop(heap)
        v = va + vb[::-1]
        m = np.concatenate([ma, mb[::-1]], axis=1)
        o = _argsort_int(v)
        v, m = v[o], m[o]
        heapq.heappush(heap, (-int(v[-1] - v[0]), counter, v, m))
        counter += 1
    members = heap[0][3]
    bin_of = np.empty(n, np.int64)
    bins = np.broadcast_to(np.arange(k)[:, None], members.shape)
    real = members >= 0
    bin_of[members[real]] = bins[real]
    return bin_of


def greedy_lpt(costs: np.ndarray, k: int) -> np.ndarray:
    """Longest-processing-time greedy (largest cost first into the lightest bin), vectorised.

    Exactly LPT, done in rounds: with bins sorted by load ``l`` and the next items ``x`` sorted
    descending, item ``i`` goes to bin ``i`` as long as that bin is still the lightest when
    its turn comes (``l_i <= min_{j<i} (l_j + x_j)``); the first violation ends the round.
    A handful of rounds for realistic windows (3-20 measured at 32k items). Returns bin per item."""
    costs = np.asarray(costs, dtype=np.int64)
    n = len(costs)
    if k < 1:
        raise ValueError(f"k={k} partitions must be >= 1")
    order = _argsort_int(costs, descending=True)
    x = costs[order]
    bin_sorted = np.empty(n, np.int64)
    loads, bins = np.zeros(k, np.int64), np.arange(k, dtype=np.int64)   # ascending loads
    pos = 0
    while pos < n:
        m = min(k, n - pos)
        xs = x[pos:pos + m]
        reach = np.minimum.accumulate(loads[:m] + xs)
        still_lightest = loads[1:m] <= reach[:-1]
        b = m if still_lightest.all() else int(np.argmin(still_lightest)) + 1
        bin_sorted[pos:pos + b] = bins[:b]
        loads[:b] += xs[:b]
        o = _argsort_int(loads)
        loads, bins = loads[o], bins[o]
        pos += b
    bin_of = np.empty(n, np.int64)
    bin_of[order] = bin_sorted
    return bin_of


def greedy_lpt_budgeted(costs: np.ndarray, k: int, sizes: np.ndarray, capacities: np.ndarray,
                        first: Optional[np.ndarray] = None) -> np.ndarray:
    """LPT with budgets: largest cost first into the lightest bin that has room in every budget.

    ``sizes`` shape ``(n, d)``, ``capacities`` shape ``(d,)``; ``first``: bool ``(n,)`` items
    placed before all others (samples already deferred too often). Returns bin per item,
    ``-1`` where no bin had room (the caller defers those). Heap-based; used as the fallback."""
    costs = np.asarray(costs, dtype=np.int64)
    n = len(costs)
    bin_of = np.full(n, -1, np.int64)
    prio = np.zeros(n, np.int64) if first is None else np.asarray(first, dtype=np.int64)
    order = np.lexsort((-costs, -prio))
    sizes = np.asarray(sizes, dtype=np.int64).reshape(n, -1)
    caps = np.asarray(capacities, dtype=np.int64).reshape(-1)
    loads = np.zeros(k, np.int64)
    used = np.zeros((k, sizes.shape[1]), np.int64)
    heap = [(0, b) for b in range(k)]                      # lazy: stale entries are skipped
    for i in order.tolist():
        s = sizes[i]
        while heap[0][0] != loads[heap[0][1]]:
            heapq.heappop(heap)
        b = heap[0][1]
        if not np.all(used[b] + s <= caps):              # lightest bin is full: search all bins
            room = np.all(used + s <= caps, axis=1)
            if not room.any():
                continue
            cand = np.nonzero(room)[0]
            b = int(cand[np.argmin(loads[cand])])
        loads[b] += costs[i]
        used[b] += s
        bin_of[i] = b
        heapq.heappush(heap, (int(loads[b]), b))
    return bin_of


def _bin_sums(bin_of: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """Per-bin sums of integer values (float64 bincount is exact below 2^53); ``-1`` skipped."""
    if len(bin_of) == 0 or bin_of.min() >= 0:            # common case: nothing deferred, no masking
        return np.bincount(bin_of, weights=values, minlength=k).astype(np.int64)
    keep = bin_of >= 0
    return np.bincount(bin_of[keep], weights=values[keep], minlength=k).astype(np.int64)


def repair_budgets(bin_of: np.ndarray, costs: np.ndarray, sizes: np.ndarray, capacities: np.ndarray,
                   k: int, pinned: Optional[np.ndarray] = None) -> np.ndarray:
    """Move items out of over-budget bins into the lightest bin with room; defer (``-1``) if none.

    The item moved is the cheapest one whose removal fixes the bin, else the one with the
    largest overflow share; pinned items move but are deferred only if nothing else can be."""
    bin_of = bin_of.copy()
    caps = np.asarray(capacities, dtype=np.int64)
    used = np.stack([_bin_sums(bin_of, sizes[:, d], k) for d in range(sizes.shape[1])], axis=1)
    loads = _bin_sums(bin_of, costs, k)
    pinned = np.zeros(len(costs), bool) if pinned is None else pinned
    for b in np.nonzero(np.any(used > caps, axis=1))[0].tolist():
        while np.any(used[b] > caps):
            members = np.nonzero(bin_of == b)[0]
            excess = np.maximum(used[b] - caps, 0)
            fixes = np.all(sizes[members] >= excess, axis=1)
            if fixes.any():
                cand = members[fixes]
                i = int(cand[np.lexsort((costs[cand], pinned[cand]))[0]])
            else:
                share = (sizes[members] * (excess > 0)).sum(axis=1)
                i = int(members[np.lexsort((-share, pinned[members]))[0]])
            room = np.all(used + sizes[i] <= caps, axis=1)
            room[b] = False
            used[b] -= sizes[i]
            loads[b] -= costs[i]
            if room.any():
                cand = np.nonzero(room)[0]
                t = int(cand[np.argmin(loads[cand])])
                bin_of[i] = t
                used[t] += sizes[i]
                loads[t] += costs[i]
            else:
                bin_of[i] = -1
    return bin_of


def _stable_order(small_ints: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative ints; radix sort (O(n)) when they fit 16 bits."""
    if len(small_ints) and small_ints.max() < (1 << 16):
        return np.argsort(small_ints.astype(np.uint16), kind="stable")
    return np.argsort(small_ints, kind="stable")


def refine_pairs(bin_of: np.ndarray, costs: np.ndarray, k: int, sizes: Optional[np.ndarray] = None,
                 capacities: Optional[np.ndarray] = None, allow_moves: bool = True,
                 rounds: int = 4, block: Optional[int] = None) -> np.ndarray:
    """Pairwise improvement: heavy bins paired with light ones, the best move/swap per pair.

    Pairing: heaviest with lightest over all bins, or with ``block=R`` within each group of
    ``R`` bins of similar load (the bins that will run in the same micro-step), heaviest with
    lightest. For loads ``Lh > Ll`` a move of item ``a`` or a swap ``a <-> b`` shifts
    ``d = a - b``; the pair's max drops most when ``d`` is closest to ``(Lh - Ll) / 2``. For each
    heavy item the best partner is one binary search over the light bins' costs sorted by
    (pair, cost), so a round is ``O(n log n)`` for all pairs at once. Moves never empty a bin;
    nothing breaks a budget. Stops early when a round changes nothing or (with ``block``)
    does not shorten the critical path."""
    bin_of = bin_of.copy()
    costs = np.asarray(costs, dtype=np.int64)
    if sizes is None:
        sizes = np.zeros((len(costs), 0), np.int64)
        capacities = np.zeros(0, np.int64)
    caps = np.asarray(capacities, dtype=np.int64).tolist()
    size_cols = [np.ascontiguousarray(sizes[:, d], dtype=np.int64) for d in range(sizes.shape[1])]
    by_cost = _argsort_int(costs)
    best_path, best = None, bin_of
    for round_index in range(rounds + 1):
        placed = bin_of >= 0
        loads = _bin_sums(bin_of, costs, k)
        if block is not None:                             # keep the best assignment seen; stop when no gain
            path = step_critical_path(loads, block)
            if best_path is not None and path >= best_path:
                break
            best_path, best = path, bin_of.copy()
        if round_index == rounds:
            break
        counts = np.bincount(bin_of[placed], minlength=k)
        used = [_bin_sums(bin_of, col, k) for col in size_cols]
        if block is None:
            order = _argsort_int(loads)
            light, heavy = order[:k // 2], order[::-1][:k // 2]
        else:
            order = _argsort_int(loads, descending=True).reshape(-1, block)
            heavy, light = order[:, :block // 2].ravel(), order[:, ::-1][:, :block // 2].ravel()
        active = loads[heavy] > loads[light] + 1
        if not active.any():
            break
        light, heavy = light[active], heavy[active]
        n_pairs = len(light)
        pair_of = np.full(k, -1, np.int64)
        pair_of[heavy] = np.arange(n_pairs)
        pair_of[light] = np.arange(n_pairs)
        role = np.zeros(k, np.int8)                       # 1 heavy, 2 light
        role[heavy], role[light] = 1, 2
        item_role = np.where(placed, role[np.maximum(bin_of, 0)], 0)
        hi = np.nonzero(item_role == 1)[0]
        hi = hi[_stable_order(pair_of[bin_of[hi]])]       # grouped by pair: local binary searches
        ph = pair_of[bin_of[hi]]
        Lh, Ll = loads[heavy][ph], loads[light][ph]
        a = costs[hi]
        half_gap = (Lh - Ll) >> 1                         # Lh >= Ll
        room_h = [(cap - u[heavy])[ph] for u, cap in zip(used, caps)]   # budget left per pair side
        room_l = [(cap - u[light])[ph] for u, cap in zip(used, caps)]
        sz_a = [col[hi] for col in size_cols]
        cand_pair, cand_gain, cand_a, cand_b = [], [], [], []
        if allow_moves:
            gain = Lh - np.maximum(Lh - a, Ll + a)
            ok = (gain > 0) & (counts[heavy][ph] >= 2)
            for sa, rl in zip(sz_a, room_l):
                ok &= sa <= rl
            cand_pair.append(ph[ok]); cand_gain.append(gain[ok]); cand_a.append(hi[ok])
            cand_b.append(np.full(int(ok.sum()), -1, np.int64))
        li = by_cost[item_role[by_cost] == 2]             # light items, ascending cost
        if len(li) and len(hi):
            li = li[_stable_order(pair_of[bin_of[li]])]   # ... grouped by pair
            keys = pair_of[bin_of[li]] * _KEY + costs[li]
            pos = np.searchsorted(keys, ph * _KEY + np.clip(a - half_gap, 0, _KEY - 1))
            for cand in (pos - 1, pos):
                cand = np.clip(cand, 0, len(keys) - 1)
                bi = li[cand]
                d = a - costs[bi]
                gain = Lh - np.maximum(Lh - d, Ll + d)
                ok = ((keys[cand] // _KEY) == ph) & (gain > 0)
                for sa, col, rh, rl in zip(sz_a, size_cols, room_h, room_l):
                    delta = sa - col[bi]
                    ok &= (-delta <= rh) & (delta <= rl)
                cand_pair.append(ph[ok]); cand_gain.append(gain[ok]); cand_a.append(hi[ok]); cand_b.append(bi[ok])
        pairs = np.concatenate(cand_pair)
        if len(pairs) == 0:
            break
        gains, ca, cb = np.concatenate(cand_gain), np.concatenate(cand_a), np.concatenate(cand_b)
        srt = _stable_order(pairs)                        # per pair: first candidate with the largest gain
        pairs, gains, ca, cb = pairs[srt], gains[srt], ca[srt], cb[srt]
        new_seg = np.r_[True, pairs[1:] != pairs[:-1]]
        seg = np.cumsum(new_seg) - 1
        is_max = gains == np.maximum.reduceat(gains, np.nonzero(new_seg)[0])[seg]
        winners = np.nonzero(is_max)[0]
        winners = winners[np.r_[True, seg[winners][1:] != seg[winners][:-1]]]
        p, ia, ib = pairs[winners], ca[winners], cb[winners]
        bin_of[ia] = light[p]
        swap = ib >= 0
        bin_of[ib[swap]] = heavy[p[swap]]
    return best if block is not None else bin_of


def step_critical_path(bin_loads: np.ndarray, num_ranks: int) -> int:
    """Sum over micro-steps of the heaviest bin when bins are grouped by sorted load."""
    srt = np.sort(np.asarray(bin_loads, dtype=np.int64))[::-1]
    return int(srt.reshape(-1, num_ranks).max(axis=1).sum())


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
            if np.any(_over_budget(bin_of, sizes, caps, K)):
                bin_of = repair_budgets(bin_of, costs, sizes, caps, K, pinned)
                if np.any(bin_of < 0):                   # budget-aware LPT; keep whichever defers less
                    fallback = greedy_lpt_budgeted(costs, K, sizes, caps, first=pinned)
                    if _deferral_key(fallback, pinned) < _deferral_key(bin_of, pinned):
                        bin_of = fallback
            if refine and self.refine_rounds:
                bin_of = refine_pairs(bin_of, costs, K, sizes, caps, allow_moves=True,
                                      rounds=self.refine_rounds, block=self.num_ranks)
            key = (*_deferral_key(bin_of, pinned), step_critical_path(_bin_sums(bin_of, costs, K), self.num_ranks))
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
            loads = _bin_sums(bin_of, costs, K)
            by_load = _argsort_int(loads, descending=True)  # heaviest first, ties by bin id
            rank_order = np.random.default_rng([self.seed, step]).permutation(R)
            slot_of_bin = np.empty(K, np.int64)
            for m in range(M):
                ranks = rank_order if m % 2 == 0 else rank_order[::-1]
                slot_of_bin[by_load[m * R:(m + 1) * R]] = ranks * M + m
        placed = np.nonzero(bin_of >= 0)[0]
        slots = slot_of_bin[bin_of[placed]]
        members = placed[_stable_order(slots)]
        offsets = np.zeros(K + 1, np.int64)
        np.cumsum(np.bincount(slots, minlength=K), out=offsets[1:])
        slot_cost = np.bincount(slots, weights=real_costs[placed], minlength=K).reshape(R, M)
        return Plan(step=int(step), num_ranks=R, micro_batches=M, sample_index=pool.index[members],
                    slot_offsets=offsets, slot_cost=slot_cost, deferred=pool.index[bin_of < 0],
                    method=self.method, max_llm_tokens=self.max_llm_tokens, align=self.align)


def _over_budget(bin_of: np.ndarray, sizes: np.ndarray, caps: np.ndarray, k: int) -> np.ndarray:
    used = np.stack([_bin_sums(bin_of, sizes[:, d], k) for d in range(sizes.shape[1])], axis=1)
    return np.any(used > caps, axis=1)


def _deferral_key(bin_of: np.ndarray, pinned: np.ndarray) -> tuple[int, int]:
    deferred = bin_of < 0
    return int(np.sum(deferred & pinned)), int(np.sum(deferred))


# ------------------------------------------------------------------------------------------
# Candidate window and the per-step schedule

class CandidateWindow:
    """Which dataset rows are the new candidates of step ``s``: a pure function of (seed, s).

    Epoch ``e`` visits the rows in ``default_rng([seed, e]).permutation(num_samples)`` in windows
    of ``window_size``; the ragged tail of an epoch (``num_samples % window_size`` rows, a
    different set each epoch) is skipped so that a window never straddles two epochs and never
    holds a row twice. ``next_step`` is the state; resuming only needs it."""

    def __init__(self, num_samples: int, window_size: int, seed: int = 0) -> None:
        if num_samples < 1 or window_size < 1:
            raise ValueError(f"num_samples={num_samples} and window_size={window_size} must be >= 1")
        if window_size > num_samples:
            raise ValueError(f"window_size={window_size} exceeds the {num_samples} samples of the dataset")
        self.num_samples, self.window_size, self.seed = int(num_samples), int(window_size), int(seed)
        self.steps_per_epoch = self.num_samples // self.window_size
        self.next_step = 0
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 2:
                self._perm_cache.pop(min(self._perm_cache))
            self._perm_cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._perm_cache[epoch]

    def rows(self, step: int) -> np.ndarray:
        """Dataset rows of step ``step``, shape ``(window_size,)``, all distinct."""
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.window_size
        return self._perm(epoch)[start:start + self.window_size].astype(np.int64)

    def next_rows(self) -> tuple[int, np.ndarray]:
        step = self.next_step
        self.next_step += 1
        return step, self.rows(step)

    @property
    def epoch(self) -> int:
        return self.next_step // self.steps_per_epoch

    @property
    def position(self) -> int:
        return self.next_step % self.steps_per_epoch * self.window_size

    def state_dict(self) -> dict:
        return {"num_samples": self.num_samples, "window_size": self.window_size, "seed": self.seed,
                "next_step": self.next_step, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_samples", "window_size", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"CandidateWindow.load_state_dict: saved {key}={state[key]} but now "
                                 f"{getattr(self, key)}; resume needs the same dataset index, window and seed")
        self.next_step = int(state["next_step"])


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
        pending = set(self.planner.deferred.index.tolist())
        if pending:                                      # a deferred sample may come round again next epoch
            rows = rows[~np.isin(self.index.index[rows], list(pending))]
        return self.planner.plan(step, self.index.take(rows))

    def state_dict(self) -> dict:
        return {"window": self.window.state_dict(), "planner": self.planner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.window.load_state_dict(state["window"])
        self.planner.load_state_dict(state["planner"])

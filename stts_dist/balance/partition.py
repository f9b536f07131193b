"""Partition algorithms of the balancer: pure functions from integer costs (and budgets) to a bin
per item. No state, no seed: :class:`~stts_dist.balance.planner.BalancePlanner` combines them.

* :func:`karmarkar_karp_equal`: k-way largest differencing with equal counts (the ``kk`` start);
* :func:`greedy_lpt`: longest-processing-time greedy, vectorised and exact (the ``lpt`` start);
* :func:`greedy_lpt_budgeted`: LPT that respects per-bin budgets (fallback when repair defers);
* :func:`repair_budgets`: moves items out of over-budget bins, deferring (``-1``) what fits nowhere;
* :func:`refine_pairs`: heavy/light bin pairs exchange the best single move or swap.

Costs are integers (:func:`quantize_costs`) and every sort is stable and machine-independent
(:func:`argsort_int`), so every rank computes a bit-identical assignment whatever its summation
order or CPU. First-fit-decreasing packing of sequences lives in ``seq_packing.py``.
"""
from __future__ import annotations

import heapq
from typing import Optional

import numpy as np

_QUANT = 1 << 30           # max quantised cost of one sample; sums stay exact in float64 up to 2^53
_KEY = 1 << 31             # key stride for (pair, cost) integer search keys


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


def argsort_int(values: np.ndarray, descending: bool = False) -> np.ndarray:
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
    order = argsort_int(costs, descending=True)
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
        o = argsort_int(v)
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
    order = argsort_int(costs, descending=True)
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
        o = argsort_int(loads)
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


def bin_sums(bin_of: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
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
    used = np.stack([bin_sums(bin_of, sizes[:, d], k) for d in range(sizes.shape[1])], axis=1)
    loads = bin_sums(bin_of, costs, k)
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


def stable_order(small_ints: np.ndarray) -> np.ndarray:
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
    by_cost = argsort_int(costs)
    best_path, best = None, bin_of
    for round_index in range(rounds + 1):
        placed = bin_of >= 0
        loads = bin_sums(bin_of, costs, k)
        if block is not None:                             # keep the best assignment seen; stop when no gain
            path = step_critical_path(loads, block)
            if best_path is not None and path >= best_path:
                break
            best_path, best = path, bin_of.copy()
        if round_index == rounds:
            break
        counts = np.bincount(bin_of[placed], minlength=k)
        used = [bin_sums(bin_of, col, k) for col in size_cols]
        if block is None:
            order = argsort_int(loads)
            light, heavy = order[:k // 2], order[::-1][:k // 2]
        else:
            order = argsort_int(loads, descending=True).reshape(-1, block)
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
        hi = hi[stable_order(pair_of[bin_of[hi]])]       # grouped by pair: local binary searches
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
            li = li[stable_order(pair_of[bin_of[li]])]   # ... grouped by pair
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
        srt = stable_order(pairs)                        # per pair: first candidate with the largest gain
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


def over_budget(bin_of: np.ndarray, sizes: np.ndarray, caps: np.ndarray, k: int) -> np.ndarray:
    """Bool per bin, shape ``(k,)``: some budget column of ``sizes`` ``(n, d)`` exceeds ``caps`` ``(d,)``."""
    used = np.stack([bin_sums(bin_of, sizes[:, d], k) for d in range(sizes.shape[1])], axis=1)
    return np.any(used > caps, axis=1)

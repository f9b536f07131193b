"""Per-step balance metrics of a :class:`~stts_dist.balance.planner.Plan` (for the trainer's logger)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .cost_model import CostModel, SampleMeta, SampleTable
from .seq_packing import aligned_lengths


def slot_totals(plan, metas: SampleTable | Sequence[SampleMeta], cost_model: Optional[CostModel]) -> dict:
    """Per (rank, micro-step) sums, each shape ``(R, M)``: ViT patches before / after pruning,
    LLM tokens (unaligned), aligned LLM tokens, samples, modelled cost."""
    table = SampleTable.coerce(metas)
    R, M = plan.num_ranks, plan.micro_batches
    rows = table.rows_of(plan.sample_index)
    slots = np.repeat(np.arange(R * M), np.diff(plan.slot_offsets))
    t = table.take(rows)
    cost = cost_model.costs(t) if cost_model is not None else aligned_lengths(t.llm_tokens, plan.align).astype(float)

    def per_slot(values: np.ndarray) -> np.ndarray:
        return np.bincount(slots, weights=np.asarray(values, dtype=np.float64), minlength=R * M).reshape(R, M)

    return {"vit_tokens_pre": per_slot(t.vit_patches), "vit_tokens_post": per_slot(t.vit_patches_kept),
            "llm_tokens": per_slot(t.llm_tokens), "llm_tokens_aligned": per_slot(aligned_lengths(t.llm_tokens, plan.align)),
            "samples": per_slot(np.ones(len(t))), "cost": per_slot(cost)}


def cost_imbalance(slot_cost: np.ndarray) -> float:
    """Critical path over ideal: ``sum_m max_r c[r, m] / (sum c / R)``; 1.0 = perfectly balanced.

    Every micro-step ends when its slowest rank ends (ZeRO-3 gathers and reduces per layer), so
    the step takes ``sum_m max_r``; a perfectly balanced plan takes the mean."""
    slot_cost = np.asarray(slot_cost, dtype=np.float64)
    total = slot_cost.sum()
    return 1.0 if total == 0 else float(slot_cost.max(axis=0).sum() / (total / slot_cost.shape[0]))


def balance_metrics(plan, metas: SampleTable | Sequence[SampleMeta], cost_model: Optional[CostModel]) -> dict:
    """``balance/*`` scalars of one step. ``*_max`` / ``*_mean`` are over ranks of the per-rank step
    totals; ``cost_imbalance`` is :func:`cost_imbalance`, ``cost_imbalance_worst_micro`` the
    largest per-micro-step max/mean; ``padding_fraction`` the alignment padding of the packed
    LLM tokens. ``metas``: the metadata of every sample in the plan."""
    tot = slot_totals(plan, metas, cost_model)
    out: dict[str, float] = {}
    for name in ("vit_tokens_pre", "vit_tokens_post", "llm_tokens", "cost"):
        per_rank = tot[name].sum(axis=1)
        out[f"balance/{name}_max"] = float(per_rank.max())
        out[f"balance/{name}_mean"] = float(per_rank.mean())
    c = tot["cost"]
    out["balance/cost_imbalance"] = cost_imbalance(c)
    means = c.mean(axis=0)
    ratios = np.where(means > 0, c.max(axis=0) / np.where(means > 0, means, 1), 1.0)
    out["balance/cost_imbalance_worst_micro"] = float(ratios.max()) if len(ratios) else 1.0
    aligned = tot["llm_tokens_aligned"].sum()
    out["balance/padding_fraction"] = 0.0 if aligned == 0 else float(1.0 - tot["llm_tokens"].sum() / aligned)
    out["balance/samples"] = float(tot["samples"].sum())
    out["balance/deferred"] = float(len(plan.deferred))
    out["balance/micro_batches"] = float(plan.micro_batches)
    return out


def in_order_imbalance(table: SampleTable, indices: np.ndarray, num_ranks: int, cost_model: Optional[CostModel]) -> float:
    """:func:`cost_imbalance` of the samples ``indices`` (shape ``(n,)``, the table's ``index``
    values) split the way an unbalanced run splits its batch: rank ``r`` takes
    ``indices[r::num_ranks]``, one micro-step. The counterfactual the balancer's own
    ``cost_imbalance`` is compared with."""
    t = table.take(table.rows_of(np.asarray(indices, dtype=np.int64)))
    cost = cost_model.costs(t) if cost_model is not None else t.llm_tokens.astype(np.float64)
    per_rank = np.array([cost[r::num_ranks].sum() for r in range(num_ranks)], dtype=np.float64)
    return cost_imbalance(per_rank[:, None])

"""Pruning-aware token balancing: cost model, partition algorithms, planner (ranks x micro-batches),
schedule (epoch windows), packing, metrics.

Pure numpy; no framework imports (``measure_kernel_rates`` imports torch when called). See docs/balancing.md.
"""
from .cost_model import TERMS, CostModel, KernelRateCostModel, SampleMeta, SampleTable, measure_kernel_rates
from .metrics import balance_metrics, cost_imbalance, in_order_imbalance
from .partition import greedy_lpt, karmarkar_karp_equal, refine_pairs
from .planner import BalancePlanner, Plan
from .schedule import BalancedSchedule, CandidateWindow
from .seq_packing import first_fit_decreasing, pack_sequences, padding_fraction

__all__ = ["CostModel", "KernelRateCostModel", "measure_kernel_rates", "TERMS", "SampleMeta", "SampleTable",
           "BalancePlanner", "BalancedSchedule", "CandidateWindow", "Plan", "greedy_lpt", "karmarkar_karp_equal",
           "refine_pairs", "pack_sequences", "first_fit_decreasing", "padding_fraction", "balance_metrics",
           "cost_imbalance", "in_order_imbalance"]

"""Console view of the token balancer's per-step metrics.

The ``balance/*`` scalars themselves reach the step metrics dict (and so MLflow) through the
trainer, which merges ``source.last_metrics`` after every step; this callback only prints a
compact line every ``log_every`` steps (rank 0, via ``trainer.log``)."""
from __future__ import annotations

import numpy as np

# (metric stem, short label, scale, unit) -- max/mean over ranks of the step's per-rank totals
_PAIRS = (("vit_tokens_pre", "vit_pre", 1.0, ""), ("vit_tokens_post", "vit_post", 1.0, ""),
          ("llm_tokens", "llm", 1.0, ""), ("cost", "cost", 1e-9, "GF"))


def format_balance(step: int, metrics: dict) -> str:
    """``[balance step N] vit_pre max/mean=... llm ... cost ... imbalance=... padding=... deferred=...``."""
    parts = []
    for stem, label, scale, unit in _PAIRS:
        hi, mean = metrics.get(f"balance/{stem}_max"), metrics.get(f"balance/{stem}_mean")
        if hi is not None and mean is not None:
            parts.append(f"{label} max/mean={hi * scale:.4g}/{mean * scale:.4g}{unit}")
    for key, label, fmt in (("cost_imbalance", "imbalance", ".4f"), ("padding_fraction", "padding", ".3f"),
                            ("deferred", "deferred", ".0f"), ("samples", "samples", ".0f"),
                            ("plan_ms", "plan_ms", ".2f")):
        if f"balance/{key}" in metrics:
            parts.append(f"{label}={metrics[f'balance/{key}']:{fmt}}")
    return f"[balance step {step}] " + " ".join(parts)


def format_summary(imbalance: list[float], in_order: list[float], num_ranks: int) -> str:
    """The end-of-run line: medians over the run's steps of the balanced plan's cost imbalance
    (slowest rank's modelled cost / mean; 1.0 = even) and of the same samples split in order."""
    med = lambda xs: float(np.median(xs))                                 # noqa: E731
    saved = 1.0 - med(imbalance) / med(in_order)
    return (f"[balance] {len(imbalance)} steps over {num_ranks} data-parallel ranks: slowest rank's modelled cost "
            f"/ mean {med(imbalance):.3f} balanced (median; worst {max(imbalance):.3f}) vs {med(in_order):.3f} for "
            f"the same samples split in order, i.e. {100 * saved:.1f}% less of each step spent waiting for the "
            f"slowest rank (balance/* in train_log.jsonl and MLflow)")


class BalanceLogger:
    """Prints the ``balance/*`` metrics every ``every`` steps (and at step 1), and at the end of
    the run the summary of :func:`format_summary` over every step it saw."""

    def __init__(self, every: int):
        self.every = max(1, every)
        self.imbalance: list[float] = []
        self.in_order: list[float] = []

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        if "balance/cost_imbalance" in metrics:
            self.imbalance.append(metrics["balance/cost_imbalance"])
            self.in_order.append(metrics.get("balance/cost_imbalance_in_order", float("nan")))
        if (step % self.every == 0 or step == 1) and any(k.startswith("balance/") for k in metrics):
            trainer.log(format_balance(step, metrics))

    def on_train_end(self, trainer, status: str) -> None:
        if self.imbalance:
            trainer.log(format_summary(self.imbalance, self.in_order, getattr(trainer, "dp_size", 1)))

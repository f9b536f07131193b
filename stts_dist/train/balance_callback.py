"""Console view of the token balancer's per-step metrics.

The ``balance/*`` scalars themselves reach the step metrics dict (and so MLflow) through the
trainer, which merges ``source.last_metrics`` after every step; this callback only prints a
compact line every ``log_every`` steps (rank 0, via ``trainer.log``)."""
from __future__ import annotations

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


class BalanceLogger:
    """Prints the ``balance/*`` metrics every ``every`` steps (and at step 1)."""

    def __init__(self, every: int):
        self.every = max(1, every)

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        if (step % self.every == 0 or step == 1) and any(k.startswith("balance/") for k in metrics):
            trainer.log(format_balance(step, metrics))

"""Figures of evaluation results (matplotlib, headless): shared by ``stts-eval`` and the trainer's
final evaluation (logged to MLflow)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_accuracy_vs_tokens(rows: Sequence[dict], path: Path, title: str) -> None:
    """Accuracy vs mean LLM visual tokens per video, one line per method (each through the
    unpruned baseline); test-time-scaling points as stars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_objects = any("obj_recall" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if with_objects else 1, figsize=(11.5 if with_objects else 6.4, 4.4), dpi=100,
                             squeeze=False)
    ax = axes[0, 0]
    base = rows[0]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["kind"] != "baseline"))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(methods):
        pts = sorted([(r["llm_visual_tokens"], r["acc"]) for r in rows if r["method"] == m and r["kind"] == "sweep"]
                     + [(base["llm_visual_tokens"], base["acc"])])
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", color=colors[i % len(colors)], label=m)
        adaptive = sorted([(r["llm_visual_tokens"], r["acc"]) for r in rows if r["method"] == m and r["kind"] == "adaptive"])
        if adaptive:
            ax.plot([p[0] for p in adaptive], [100 * p[1] for p in adaptive], "x--", color=colors[i % len(colors)],
                    label=f"{m}, adaptive budgets")
        for r in rows:
            if r["method"] == m and r["kind"] == "tts":
                ax.plot(r["llm_visual_tokens"], 100 * r["acc"], "*", ms=13, color=colors[i % len(colors)],
                        label=f"{m}, {r['frames']} frames (same budget)")
    ax.plot(base["llm_visual_tokens"], 100 * base["acc"], "ks", ms=8, label="none (unpruned)")
    accs = [100 * r["acc"] for r in rows if r["acc"] == r["acc"]]
    if accs:  # at least a 10-point window, so equal accuracies do not fill the axis with noise
        ax.set_ylim(max(-1.0, min(accs) - 5), min(101.0, max(accs) + 5))
    ax.set_xlabel("LLM visual tokens kept per video")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if with_objects:   # object recall of the kept groups (frames >= 1) vs tokens kept, per method
        ax2 = axes[0, 1]
        for i, m in enumerate(methods):
            pts = sorted((r["llm_visual_tokens"], r["obj_recall"]) for r in rows
                         if r["method"] == m and r["kind"] == "sweep" and "obj_recall" in r)
            if pts:
                ax2.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", color=colors[i % len(colors)], label=m)
        ax2.set_xlabel("LLM visual tokens kept per video")
        ax2.set_ylabel("object recall, frames >= 1 (%)")
        ax2.set_title("share of the digits' groups kept", fontsize=9)
        ax2.grid(alpha=0.3)
        if ax2.get_lines():
            ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def rows_from_trainer_eval(results: dict[str, float]) -> list[dict]:
    """The trainer's ``eval/<method>@<ratio>/<metric>`` results as plot rows (baseline first)."""
    rows = []
    for tag in sorted({k.split("/")[1] for k in results if k.startswith("eval/") and k.endswith("/acc")}):
        method, _, ratio = tag.partition("@")
        row = {"setting": tag, "method": method, "prune_ratio": float(ratio or 0),
               "kind": "baseline" if method == "none" else "sweep", "frames": 0,
               "acc": results[f"eval/{tag}/acc"], "llm_visual_tokens": results[f"eval/{tag}/llm_visual_tokens"]}
        if f"eval/{tag}/obj_recall" in results:
            row["obj_recall"] = results[f"eval/{tag}/obj_recall"]
        rows.append(row)
    return sorted(rows, key=lambda r: r["kind"] != "baseline")

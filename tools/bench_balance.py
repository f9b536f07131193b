#!/usr/bin/env python
"""Benchmark of the pruning-aware token balancer (simulated ranks, modelled costs).

Compares, on the same candidate windows:
  planner        BalancePlanner(method="kk"): KK + refinement with LPT fallback, all ranks x micro-steps
  naive          sequential: sample i -> rank i mod R, equal-count micro-batches, padded batches
  per_rank_ffd   what per-worker packers do: each rank packs its own samples first-fit-decreasing
                 under the same budgets; ranks end up with different numbers of micro-batches
for DP = 8, 64, 512, 4096 and two length distributions (video only; mixed images + videos).

Reported per (case, DP, method), averaged over steps: imbalance = critical path / ideal
(sum over micro-steps of the slowest rank, over total/R; 1.0 is perfect), the worst single
micro-step max/mean, padding fraction, planner milliseconds per global step (the whole plan,
as every rank computes it; wall median and max, and CPU time of the process, which other jobs
on a shared machine do not inflate), simulated step time (critical path at an assumed sustained
throughput), deferred samples per step and micro-batches per rank. The last printed line is one
JSON object. ``--plot`` writes a PNG of per-rank cost per micro-step for one DP=64 step.

Model: SigLIP so400m/14 at 378 px (729 patches/frame, 3x3 groups -> 81 LLM tokens/frame),
pruning 50% after block 3, Qwen3-4B LLM. Budgets per micro-batch: 16384 LLM tokens (one packed
sequence), 384 ViT frames.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stts_dist.balance import BalancedSchedule, BalancePlanner, CostModel, SampleTable, first_fit_decreasing  # noqa: E402
from stts_dist.balance.metrics import balance_metrics, cost_imbalance  # noqa: E402
from stts_dist.balance.seq_packing import aligned_lengths  # noqa: E402

PATCHES_PER_FRAME = 729     # (378 / 14)^2
GROUPS_PER_FRAME = 81       # ceil(27 / 3)^2
MAX_FRAMES = 128
MAX_LLM_TOKENS = 16384
MAX_VIT_FRAMES = 384
ALIGN = 8
THROUGHPUT_FLOPS = 400e12   # assumed sustained training FLOP/s per GPU (about 40% of H100 bf16 peak)


def reference_cost_model() -> CostModel:
    """SigLIP so400m/14 (width 1152, 27 blocks, MLP 4304) + Qwen3-4B (2560 x 36, FFN 9728, 32/8 heads)."""
    return CostModel.from_dims(vit_width=1152, vit_depth=27, vit_mlp=4304, prune_at=3, llm_hidden=2560,
                               llm_layers=36, llm_ffn=9728, llm_kv_ratio=8 / 32,
                               patches_per_frame=PATCHES_PER_FRAME, llm_vocab=151936)


def synthetic_index(n: int, seed: int, image_fraction: float = 0.0, prune_ratio: float = 0.5,
                    max_frames: int = MAX_FRAMES, fps: float = 2.0) -> SampleTable:
    """Shard-index metadata of ``n`` samples.

    Videos: durations log-normal (median 60 s, sigma 1.0) clipped to [5 s, 10 min], sampled at
    ``fps`` and capped at ``max_frames``; LLM visual tokens ``G*T - int(G*r*T)``. Images: one
    frame, never pruned. Text: log-normal tokens (median 120, sigma 0.9) in [16, 2048]."""
    rng = np.random.default_rng(seed)
    duration = np.exp(rng.normal(np.log(60.0), 1.0, n)).clip(5.0, 600.0)
    is_video = rng.random(n) >= image_fraction
    frames = np.where(is_video, np.minimum(np.maximum(np.rint(duration * fps), 1), max_frames), 1).astype(np.int64)
    pruned = np.where(is_video & (frames > 1), np.floor(GROUPS_PER_FRAME * prune_ratio * frames), 0).astype(np.int64)
    visual = GROUPS_PER_FRAME * frames - pruned
    text = np.exp(rng.normal(np.log(120.0), 0.9, n)).clip(16, 2048).astype(np.int64)
    return SampleTable(index=np.arange(n), frames=frames, patches_per_frame=np.full(n, PATCHES_PER_FRAME),
                       groups_per_frame=np.full(n, GROUPS_PER_FRAME), llm_visual_tokens=visual, text_tokens=text,
                       is_video=is_video)


def per_rank_ffd(window: SampleTable, num_ranks: int, cost_model: CostModel) -> np.ndarray:
    """Per-worker packing baseline: rank r packs samples r, r+R, ... first-fit-decreasing into
    as many micro-batches as it needs. Returns cost per (rank, micro-step), shape ``(R, M_max)``,
    zero where a rank has no micro-batch left (it idles)."""
    costs = cost_model.costs(window)
    sizes = np.stack([aligned_lengths(window.llm_tokens, ALIGN), window.frames], axis=1)
    per_rank = []
    for r in range(num_ranks):
        mine = np.arange(r, len(window), num_ranks)
        bins = first_fit_decreasing(sizes[mine], [MAX_LLM_TOKENS, MAX_VIT_FRAMES])
        per_rank.append([float(costs[mine[b]].sum()) for b in bins])
    width = max(len(c) for c in per_rank)
    out = np.zeros((num_ranks, width))
    for r, c in enumerate(per_rank):
        out[r, :len(c)] = c
    return out


def padded_batch_padding(plan, table: SampleTable) -> float:
    """Padding of the naive trainer: each micro-batch is a (samples, longest) padded tensor."""
    real = padded = 0
    tokens = table.llm_tokens
    for r in range(plan.num_ranks):
        for mb in plan.rank_micro_batches(r):
            lens = tokens[table.rows_of(mb)] if len(mb) else tokens[:0]
            if len(lens):
                real += int(lens.sum())
                padded += int(lens.max()) * len(lens)
    return 0.0 if padded == 0 else 1.0 - real / padded


def run_case(name: str, image_fraction: float, dp: int, steps: int, samples_per_rank: int, seed: int,
             cost_model: CostModel, keep_step: int | None = None) -> dict:
    index = synthetic_index(max(200_000, dp * samples_per_rank * (steps + 2)), seed, image_fraction)
    window = dp * samples_per_rank
    schedules = {m: BalancedSchedule(index, BalancePlanner(dp, None, MAX_LLM_TOKENS, MAX_VIT_FRAMES, seed=seed,
                                                           method=m, cost_model=cost_model, align=ALIGN),
                                     window, seed=seed)
                 for m in ("kk", "naive")}
    rec = {k: [] for k in ("cpu_ms", "imb_planner", "imb_naive", "imb_ffd", "worst_planner", "worst_naive", "worst_ffd",
                           "ms", "pad_planner", "pad_naive", "pad_ffd", "t_planner", "t_naive", "t_ffd",
                           "deferred_planner", "deferred_naive", "micro_planner", "micro_ffd_max", "kk_won")}
    kept = {}
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        plan = schedules["kk"].next_plan()
        rec["ms"].append((time.perf_counter() - t0) * 1e3)
        rec["cpu_ms"].append((time.process_time() - c0) * 1e3)
        rec["kk_won"].append(schedules["kk"].planner.last_start == "kk")
        naive = schedules["naive"].next_plan()
        rows = schedules["kk"].window.rows(step)
        window_table = index.take(rows)
        ffd = per_rank_ffd(window_table, dp, cost_model)
        mp = balance_metrics(plan, index, cost_model)
        mn = balance_metrics(naive, index, cost_model)
        for key, slot_cost, m in (("planner", plan.slot_cost, mp), ("naive", naive.slot_cost, mn), ("ffd", ffd, None)):
            rec[f"imb_{key}"].append(cost_imbalance(slot_cost))
            means = slot_cost.mean(axis=0)
            rec[f"worst_{key}"].append(float((slot_cost.max(axis=0) / np.where(means > 0, means, 1)).max()))
            rec[f"t_{key}"].append(float(slot_cost.max(axis=0).sum()) / THROUGHPUT_FLOPS)
        rec["pad_planner"].append(mp["balance/padding_fraction"])
        rec["pad_ffd"].append(1.0 - window_table.llm_tokens.sum() / aligned_lengths(window_table.llm_tokens, ALIGN).sum())
        rec["pad_naive"].append(padded_batch_padding(naive, index))
        rec["deferred_planner"].append(len(plan.deferred))
        rec["deferred_naive"].append(len(naive.deferred))
        rec["micro_planner"].append(plan.micro_batches)
        rec["micro_ffd_max"].append(ffd.shape[1])
        if keep_step is not None and step == keep_step:
            kept = {"planner": plan.slot_cost, "naive": naive.slot_cost, "per_rank_ffd": ffd}
    out = {"case": name, "dp": dp, "steps": steps, "samples_per_rank": samples_per_rank}
    for k, v in rec.items():
        out[k] = float(np.median(v)) if k in ("ms", "cpu_ms") else float(np.mean(v))
    out["ms_max"] = float(np.max(rec["ms"]))
    out["_kept"] = kept
    return out


def plot_per_rank(kept: dict, path: Path, dp: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    titles = {"naive": "naive (sequential)", "per_rank_ffd": "per-rank greedy packing", "planner": "planner (kk)"}
    fig, axes = plt.subplots(3, 1, figsize=(12, 9), sharex=True)
    top = max(c.sum(axis=1).max() for c in kept.values()) / 1e15
    for ax, key in zip(axes, ("naive", "per_rank_ffd", "planner")):
        c = kept[key] / 1e15
        bottom = np.zeros(c.shape[0])
        for m in range(c.shape[1]):
            ax.bar(np.arange(c.shape[0]), c[:, m], bottom=bottom, width=0.85, label=f"micro-step {m}")
            bottom += c[:, m]
        crit = c.max(axis=0).sum()
        ax.axhline(crit, color="k", ls="--", lw=1)
        ax.text(c.shape[0] - 0.5, crit, " critical path", va="bottom", ha="right", fontsize=8)
        ax.set_title(f"{titles[key]}: imbalance {cost_imbalance(kept[key]):.3f}", fontsize=10)
        ax.set_ylabel("PFLOP")
        ax.set_ylim(0, top * 1.15)
        ax.legend(fontsize=7, ncol=6, loc="upper left")
    axes[-1].set_xlabel(f"rank (DP={dp})")
    fig.suptitle("Modelled cost per rank and micro-step, one global step (video case)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dp", type=int, nargs="+", default=[8, 64, 512, 4096])
    ap.add_argument("--steps", type=int, default=20, help="global steps per (case, DP); 1/4 of it at DP>=4096")
    ap.add_argument("--samples-per-rank", type=int, default=8, help="new samples drawn per rank per step")
    ap.add_argument("--sweep", type=int, nargs="*", default=[4, 8, 16, 32],
                    help="samples per rank for the window-size sweep (mixed case, DP=64); empty to skip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path, default=None, help="PNG of per-rank cost for one DP=64 step")
    args = ap.parse_args()
    cost_model = reference_cost_model()
    cases = [("video", 0.0), ("mixed", 0.5)]
    results = []
    header = (f"{'case':6} {'DP':>5} | {'imbalance planner/naive/per-rank':>33} | {'worst micro-step':>20} | "
              f"{'padding pl/naive':>17} | {'plan ms wall med/max, cpu':>25} | {'sim step s pl/naive/ffd':>24} | "
              f"{'defer':>5} | {'M':>4} | kk won")
    print(header)
    print("-" * len(header))
    for name, frac in cases:
        for dp in args.dp:
            steps = max(2, args.steps // 4) if dp >= 4096 else args.steps
            r = run_case(name, frac, dp, steps, args.samples_per_rank, args.seed, cost_model,
                         keep_step=0 if (dp == 64 and name == "video") else None)
            results.append(r)
            print(f"{name:6} {dp:5d} | {r['imb_planner']:9.4f} {r['imb_naive']:11.4f} {r['imb_ffd']:11.4f} | "
                  f"{r['worst_planner']:6.3f} {r['worst_naive']:6.3f} {r['worst_ffd']:6.3f} | "
                  f"{r['pad_planner']:7.4f} {r['pad_naive']:8.4f} | {r['ms']:7.1f} {r['ms_max']:7.1f} {r['cpu_ms']:9.1f} | "
                  f"{r['t_planner']:7.3f} {r['t_naive']:7.3f} {r['t_ffd']:7.3f} | {r['deferred_planner']:5.1f} | "
                  f"{r['micro_planner']:4.1f} | {r['kk_won']:.2f}", flush=True)
            if r["_kept"] and args.plot:
                plot_per_rank(r["_kept"], args.plot, dp)
    sweep = []
    if args.sweep:
        print("\nwindow-size sweep, mixed case, DP=64 (samples per rank per step -> imbalance planner / naive / per-rank)")
        for spr in args.sweep:
            r = run_case("mixed", 0.5, 64, args.steps, spr, args.seed, cost_model)
            sweep.append({"samples_per_rank": spr, "imbalance_planner": r["imb_planner"],
                          "imbalance_naive": r["imb_naive"], "imbalance_per_rank_greedy": r["imb_ffd"],
                          "micro_batches": r["micro_planner"], "planner_ms": r["ms"]})
            print(f"  {spr:3d}: {r['imb_planner']:.4f} / {r['imb_naive']:.4f} / {r['imb_ffd']:.4f}  "
                  f"(M={r['micro_planner']:.1f}, {r['ms']:.1f} ms)")

    def pick(case: str, dp: int) -> dict:
        return next(r for r in results if r["case"] == case and r["dp"] == dp)

    summary: dict = {"cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0]}
    if 64 in args.dp:
        v, m = pick("video", 64), pick("mixed", 64)
        summary.update({"imbalance_planner": v["imb_planner"], "imbalance_naive": v["imb_naive"],
                        "imbalance_per_rank_greedy": v["imb_ffd"], "planner_ms_per_step": v["ms"],
                        "planner_cpu_ms_per_step": v["cpu_ms"],
                        "imbalance_planner_mixed": m["imb_planner"], "imbalance_naive_mixed": m["imb_naive"],
                        "imbalance_per_rank_greedy_mixed": m["imb_ffd"]})
    if 4096 in args.dp:
        summary["planner_ms_per_step_dp4096"] = max(pick(c, 4096)["ms"] for c, _ in cases)
        summary["planner_ms_max_dp4096"] = max(pick(c, 4096)["ms_max"] for c, _ in cases)
        summary["planner_cpu_ms_per_step_dp4096"] = max(pick(c, 4096)["cpu_ms"] for c, _ in cases)
        summary["imbalance_planner_dp4096"] = pick("video", 4096)["imb_planner"]
    summary["per_dp"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    summary["sweep_mixed_dp64"] = sweep
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""End-to-end benchmark of the pruning-aware token balancer: 2 CPU ranks training a small
video VLM (DeepSpeed ZeRO-3 over gloo, through ``Trainer.fit``) on a skewed length mix, with the
planner (``balance.method=kk``) vs the naive sequential split (``balance.method=naive``: sample
``i`` of the window -> rank ``i mod 2``, what the unbalanced trainer does).

Both methods run in ONE training job, alternating step by step on the same candidate windows
(step ``2k`` trains window ``k`` split by the planner, step ``2k+1`` the same window split
naively), so a shared, noisy machine slows both alike. One thread per rank.

Per rank and step, around ``train_step`` (after an untimed barrier, so data generation never
counts as waiting), from ``/proc/thread-self/schedstat`` of the training thread:

* ``run``      CPU time the thread ran (forward, backward, optimizer: the rank's compute);
* ``queued``   time it was runnable but not running (other processes on the shared cores);
* ``blocked``  ``wall - run - queued``: time asleep, i.e. blocked in ZeRO-3's collectives
  (parameter all-gathers, gradient reduce-scatters) waiting for the other rank or the wire.

On a busy shared machine a rank's ``blocked`` time is dominated by the OTHER rank's ``queued``
time (it waits while its peer is preempted), which has nothing to do with the split. So the
faster rank's wait is reported as what it would be on dedicated cores:

* ``comm``     ``wall - max_r(run_r + queued_r)``: both ranks off the CPU at once, in a collective;
* ``wait``     ``run_slow - run_fast + comm``: the faster rank's time blocked in the step's
  collectives with one core per rank (its compute deficit plus the collectives' own time);
* ``wait_reduction = 1 - wait(planner) / wait(naive)``; ``..._imbalance_only`` leaves ``comm``
  out; ``..._raw_blocked`` uses the measured ``blocked`` time of the faster rank as is;
  ``..._systematic`` uses ``gap_by_plan`` = CPU time of the rank with more PLANNED work minus
  the other's (signed, so preemption noise averages out instead of adding ``|noise|``).
* step times: measured wall (mean, median) and ``dedicated`` = ``run_slow + comm``.

The last printed line is one JSON object.

Second part (skip with ``--no-ratio``, run alone with ``--ratio-only``): the cost model's
predicted step-time ratio between model configurations (``RATIO_MODELS`` vs the benchmark model)
against measured single-process step times (CPU time of the step, one thread, interleaved), on
the same batch; predicted twice, from FLOPs and from FLOPs over each config's kernel rates
(``measure_kernel_rates`` of its own shapes, same process, one thread). Also printed (with part
one): ``CostModel.calibrate`` fitted to the per-rank (modelled FLOPs, CPU seconds) pairs of part one.

    .venv/bin/python tools/bench_balance_e2e.py                # both parts, ~2-3 min on 2 busy cores
    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_balance_e2e.py --ratio-only --ratio-reps 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]

# The benchmark model: compute-bound on CPU (a 32-frame video is 4608 ViT patches), small enough
# for a few seconds per step.
MODEL = {"model.vit.image_size": 96, "model.vit.patch_size": 8, "model.vit.width": 128, "model.vit.depth": 4,
         "model.vit.heads": 4, "model.vit.mlp_dim": 512, "model.connector.pool_size": 2,
         "model.connector.pool_heads": 4, "model.llm.hidden": 128, "model.llm.layers": 2, "model.llm.heads": 4,
         "model.llm.kv_heads": 2, "model.llm.ffn": 352, "model.stts.prune_at": 1, "model.stts.scorer_hidden": 64,
         "model.stts.scorer_heads": 2, "model.stts.prune_ratio": 0.5}
# Configurations for the cost-model ratio check against MODEL: twice the blocks (same kernel
# shapes), and wider + deeper (larger matrices, which a CPU runs at a higher FLOP rate).
RATIO_MODELS = {
    "deeper": {**MODEL, "model.vit.depth": 8, "model.llm.layers": 4},
    "wider": {**MODEL, "model.vit.width": 256, "model.vit.depth": 6, "model.vit.mlp_dim": 1024,
              "model.llm.hidden": 256, "model.llm.layers": 4, "model.llm.ffn": 704},
}


def overrides(model: dict, out_dir: str, steps: int, args) -> list[str]:
    ov = {**model, "data.num_frames": args.max_frames, "data.min_frames": args.min_frames,
          "data.train_samples": 512, "data.eval_samples": 2, "data.num_workers": 0, "data.seed": args.seed,
          "train.batch_size": args.batch, "train.steps": steps, "train.out_dir": out_dir, "train.resume": False,
          "train.progress_bar": False, "train.log_every": 1000, "train.eval_prune_ratios": "[0.5]",
          "tracking.enabled": False, "balance.enabled": True, "balance.method": "kk",
          "parallel.engine": "deepspeed", "parallel.timeout_s": 300, "parallel.zero_stage": args.zero_stage}
    return [f"{k}={v}" for k, v in ov.items()]


def schedstat() -> tuple[int, int]:
    """(ns on CPU, ns waiting on a run queue) of the calling thread."""
    with open("/proc/thread-self/schedstat") as f:
        run, queued, _ = f.read().split()
    return int(run), int(queued)


# ---------------------------------------------------------------------------------------------
# Worker (one per rank, started by torchrun)

class AlternatingSource:
    """Step ``i`` comes from ``sources[i % 2]``; both draw the same windows (same seed)."""

    def __init__(self, sources):
        self.sources = sources
        self.current = 0
        self.last_metrics: dict = {}

    def batches(self, num_steps, collate):
        its = [s.batches((num_steps + 1 - i) // 2, collate) for i, s in enumerate(self.sources)]
        for i in range(num_steps):
            self.current = i % 2
            batch, _ = next(its[self.current])
            self.last_metrics = dict(self.sources[self.current].last_metrics)
            yield batch, self.state_dict()

    @property
    def last_plan(self):
        return self.sources[self.current].last_plan

    def state_dict(self):
        return {"sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state):
        for s, st in zip(self.sources, state["sources"]):
            s.load_state_dict(st)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from stts_dist.config import load_config
    from stts_dist.samples import training_stack
    from stts_dist.train.trainer import Trainer

    torch.set_num_threads(1)
    steps = 2 * (args.warmup + args.steps)
    cfg = load_config(None, overrides(MODEL, args.out_dir, steps, args))
    trainer = Trainer(cfg, callbacks=[])
    naive_cfg = load_config(None, overrides(MODEL, args.out_dir, steps, args) + ["balance.method=naive"])
    planner_source = trainer.source
    naive_source = training_stack(naive_cfg, trainer.budget, trainer.dp_rank, trainer.dp_size, None,
                                  trainer.tokenizer)
    source = AlternatingSource([planner_source, naive_source])
    trainer.source = source
    table, cost_model = planner_source.split.table, planner_source.split.planner.cost_model
    records = []
    inner = trainer.module.train_step

    def timed_step(batch, step, gen):
        dist.barrier()                        # untimed: both ranks start the step together
        run0, q0 = schedstat()
        t0 = time.perf_counter()
        out = inner(batch, step, gen)
        wall = time.perf_counter() - t0
        run1, q1 = schedstat()
        plan = source.last_plan
        rows = plan.micro_batch(trainer.dp_rank, 0)
        mine = table.take(rows)
        records.append({"step": step, "method": ["planner", "naive"][source.current], "wall": wall,
                        "run": (run1 - run0) / 1e9, "queued": (q1 - q0) / 1e9,
                        "samples": len(rows), "frames": int(mine.frames.sum()),
                        "vit_tokens": int(mine.vit_patches.sum()), "llm_tokens": int(mine.llm_tokens.sum()),
                        "breakdown": cost_model.breakdown(mine).sum(axis=0).tolist(),
                        "cost_imbalance": source.last_metrics["balance/cost_imbalance"],
                        "loss": float(out["loss"])})
        return out

    trainer.module.train_step = timed_step
    trainer.fit()
    Path(args.out_dir, f"rank{trainer.dp_rank}.json").write_text(json.dumps(records))


# ---------------------------------------------------------------------------------------------
# Driver

def run_e2e(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_balance_e2e_") as tmp:
        port = 29600 + os.getpid() % 300
        cmd = [str(ROOT / ".venv/bin/torchrun"), "--nproc_per_node=2", f"--master_port={port}", __file__,
               "--worker", "--out-dir", tmp, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--min-frames", str(args.min_frames),
               "--max-frames", str(args.max_frames), "--seed", str(args.seed), "--zero-stage", str(args.zero_stage)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"torchrun failed with exit code {proc.returncode}")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
        if args.dump:
            Path(args.dump).write_text(json.dumps(ranks))
        elapsed = time.perf_counter() - started
    return summarize(ranks, args.warmup, elapsed)


def summarize(ranks: list[list[dict]], warmup: int, elapsed: float) -> dict:
    """Per method, means over the measured steps (see the module docstring for the terms)."""
    per_method: dict[str, list[dict]] = {"planner": [], "naive": []}
    for a, b in zip(*ranks):
        assert a["step"] == b["step"] and a["method"] == b["method"]
        fast, slow = (a, b) if a["run"] <= b["run"] else (b, a)
        wall = max(a["wall"], b["wall"])
        # time both ranks were off the CPU at once, neither queued: inside the collectives
        comm = max(0.0, wall - max(a["run"] + a["queued"], b["run"] + b["queued"]))
        heavy, light = (a, b) if sum(a["breakdown"]) >= sum(b["breakdown"]) else (b, a)
        per_method[a["method"]].append({
            "gap_by_plan": heavy["run"] - light["run"],
            "wall": wall, "run_max": slow["run"], "run_mean": (a["run"] + b["run"]) / 2, "comm": comm,
            "wait_compute": slow["run"] - fast["run"], "wait": slow["run"] - fast["run"] + comm,
            "blocked_fast": fast["wall"] - fast["run"] - fast["queued"], "queued": (a["queued"] + b["queued"]) / 2,
            "step_dedicated": slow["run"] + comm, "cost_imbalance": a["cost_imbalance"],
            "vit_ratio": max(a["vit_tokens"], b["vit_tokens"]) / ((a["vit_tokens"] + b["vit_tokens"]) / 2)})
    out: dict = {}
    for method, steps in per_method.items():
        steps = steps[warmup:]
        mean = lambda key: statistics.fmean(s[key] for s in steps)   # noqa: E731
        out[method] = {"steps": len(steps), "step_time": mean("wall"),
                       "step_time_median": statistics.median(s["wall"] for s in steps),
                       "step_dedicated": mean("step_dedicated"), "compute_max": mean("run_max"),
                       "compute_mean": mean("run_mean"), "comm": mean("comm"), "wait": mean("wait"),
                       "wait_compute": mean("wait_compute"), "blocked_fast": mean("blocked_fast"),
                       "queued": mean("queued"), "cost_imbalance": mean("cost_imbalance"),
                       "vit_token_ratio": mean("vit_ratio"), "gap_by_plan": mean("gap_by_plan"),
                       "gap_by_plan_se": statistics.stdev(s["gap_by_plan"] for s in steps) / len(steps) ** 0.5}
    # calibration of the cost model from per-rank (breakdown, CPU seconds) pairs, both methods
    out["calibration_pairs"] = [(r["breakdown"], r["run"]) for rank in ranks for r in rank[2 * warmup:]]
    out["elapsed_s"] = elapsed
    return out


def ratio_check(args) -> dict:
    """Single process, one thread: step time of each RATIO_MODELS entry vs MODEL on the same batch,
    against the cost model's predicted ratio. Steps of all configs are interleaved, so load
    changes on a shared machine hit them alike; CPU time of the thread is compared (wall too).
    Predicted twice: FLOPs, and kernel seconds (FLOPs over each config's measured kernel rates)."""
    import numpy as np
    import torch

    from stts_dist.balance import CostModel, measure_kernel_rates
    from stts_dist.config import load_config
    from stts_dist.data.batch import SequenceBuilder
    from stts_dist.model.vlm import build_model
    from stts_dist.tokenizer import default_tokenizer
    from stts_dist.stts.budget import TokenBudget
    from stts_dist.samples import DigitsDataset, digits_text_tokens, sample_table
    from stts_dist.train.train_module import LocalTrainModule

    torch.set_num_threads(1)
    tok = default_tokenizer()
    frames = [4, 8, 16, 32]
    configs = {"base": MODEL, **RATIO_MODELS}
    modules, batches, costs, kernel_costs = {}, {}, {}, {}
    for name, model in configs.items():
        cfg = load_config(None, overrides(model, "unused", 1, args) + ["parallel.engine=local"])
        torch.manual_seed(0)
        modules[name] = LocalTrainModule(build_model(cfg.model, tok), cfg, torch.device("cpu"))
        budget = TokenBudget.from_model_config(cfg.model)
        builder = SequenceBuilder(tok, budget, cfg.model.vit.image_size)
        samples = [DigitsDataset(64, args.seed, t, cfg.model.vit.image_size, cfg.data.tasks, "train")[i]
                   for i, t in enumerate(frames)]
        batches[name] = builder(samples)
        texts = digits_text_tokens(DigitsDataset(len(frames), args.seed, 1, cfg.model.vit.image_size,
                                                 cfg.data.tasks, "train"), tok)
        table = sample_table(budget, np.asarray(frames), texts)
        assert table.llm_tokens.tolist() == batches[name].seq_lengths
        cost_model = CostModel.from_model_config(cfg.model)
        costs[name] = float(cost_model.costs(table).sum())
        # the config's own kernel shapes on this batch, one thread like the steps below
        rates = measure_kernel_rates(cost_model, table, vit_heads=cfg.model.vit.heads, llm_heads=cfg.model.llm.heads)
        kernel_costs[name] = float(cost_model.with_kernel_rates(rates).costs(table).sum())
    gen = torch.Generator().manual_seed(0)
    cpu: dict[str, list[float]] = {name: [] for name in configs}
    wall: dict[str, list[float]] = {name: [] for name in configs}
    for rep in range(args.ratio_reps + 2):
        for name in configs:
            run0, _ = schedstat()
            t0 = time.perf_counter()
            modules[name].train_step(batches[name], 10, gen)
            elapsed = time.perf_counter() - t0
            run1, _ = schedstat()
            if rep >= 2:                              # the first two steps warm up allocators
                cpu[name].append((run1 - run0) / 1e9)
                wall[name].append(elapsed)
    med = {name: statistics.median(v) for name, v in cpu.items()}
    out: dict = {"batch_frames": frames, "step_cpu_s_base": med["base"], "gflop_base": costs["base"] / 1e9,
                 "kernel_s_base": kernel_costs["base"]}
    for name in RATIO_MODELS:
        predicted = costs[name] / costs["base"]
        predicted_kernel = kernel_costs[name] / kernel_costs["base"]
        measured = med[name] / med["base"]
        out.update({f"predicted_ratio_{name}": predicted, f"measured_ratio_{name}": measured,
                    f"measured_wall_ratio_{name}": statistics.median(wall[name]) / statistics.median(wall["base"]),
                    f"ratio_error_{name}": measured / predicted - 1.0, f"step_cpu_s_{name}": med[name],
                    f"gflop_{name}": costs[name] / 1e9, f"predicted_ratio_kernel_{name}": predicted_kernel,
                    f"ratio_error_kernel_{name}": measured / predicted_kernel - 1.0,
                    f"kernel_s_{name}": kernel_costs[name]})
    return out


def print_ratio_summary(ratio: dict) -> None:
    """One line per RATIO_MODELS entry: FLOP and kernel-rate predictions against the measurement."""
    for name in RATIO_MODELS:
        print(f"cost-model ratio {name}/base (1 process, 1 thread, frames {ratio['batch_frames']}, base step "
              f"{ratio['step_cpu_s_base']:.3f} s CPU for {ratio['gflop_base']:.1f} GFLOP, "
              f"{ratio['kernel_s_base']:.3f} s of kernels): predicted {ratio[f'predicted_ratio_{name}']:.3f} "
              f"(FLOPs) / {ratio[f'predicted_ratio_kernel_{name}']:.3f} (kernel rates), measured CPU "
              f"{ratio[f'measured_ratio_{name}']:.3f} (wall {ratio[f'measured_wall_ratio_{name}']:.3f}), error "
              f"{100 * ratio[f'ratio_error_{name}']:+.1f}% (FLOPs) / "
              f"{100 * ratio[f'ratio_error_kernel_{name}']:+.1f}% (kernel rates)")


def ratio_only(args) -> int:
    """``--ratio-only``: the second part alone, then its JSON line."""
    load_before = os.getloadavg()
    ratio = ratio_check(args)
    load_after = os.getloadavg()
    print_ratio_summary(ratio)
    summary = {**{k: v for k, v in ratio.items() if k != "batch_frames"}, "cpu_count": os.cpu_count(),
               "load_avg_1min_before": load_before[0], "load_avg_1min_after": load_after[0]}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="measured steps per method")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per method")
    p.add_argument("--batch", type=int, default=8, help="global batch = candidate window per step")
    p.add_argument("--min-frames", type=int, default=2)
    p.add_argument("--max-frames", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zero-stage", type=int, default=3, help="DeepSpeed ZeRO stage of the 2-rank job")
    p.add_argument("--ratio-reps", type=int, default=6, help="measured steps per config in the ratio check")
    p.add_argument("--dump", default="", help="write the raw per-rank step records to this JSON file")
    p.add_argument("--no-ratio", action="store_true", help="skip the cost-model ratio check")
    p.add_argument("--ratio-only", action="store_true", help="run only the cost-model ratio check (skip part one)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.ratio_only:
        return ratio_only(args)
    load_before = os.getloadavg()
    e2e = run_e2e(args)
    ratio = {} if args.no_ratio else ratio_check(args)
    load_after = os.getloadavg()

    from stts_dist.balance import CostModel
    from stts_dist.config import load_config
    import numpy as np
    cm = CostModel.from_model_config(load_config(None, overrides(MODEL, "unused", 1, args)).model)
    pairs = e2e.pop("calibration_pairs")
    fitted = cm.calibrate([(float(np.sum(b)), s) for b, s in pairs])   # one scale: seconds per FLOP
    flops, secs = np.array([np.sum(b) for b, _ in pairs]), np.array([s for _, s in pairs])
    per_flop, overhead = np.polyfit(flops, secs, 1)                     # with a fixed per-step overhead

    pl, nv = e2e["planner"], e2e["naive"]
    print(f"2 ranks x 1 thread, DeepSpeed ZeRO-{args.zero_stage} / gloo, global batch {args.batch}, frames "
          f"{args.min_frames}..{args.max_frames}, {pl['steps']} measured steps per method (alternating), "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'':8s} {'step s':>7s} {'median':>7s} {'dedicated':>9s} {'CPU max':>7s} {'CPU mean':>8s} "
          f"{'comm':>6s} {'wait fast':>9s} {'(imbalance)':>11s} {'gap by plan':>14s} {'blocked raw':>11s} "
          f"{'queued':>6s} {'imbalance':>9s} {'ViT max/mean':>12s}")
    for name, r in (("planner", pl), ("naive", nv)):
        print(f"{name:8s} {r['step_time']:7.3f} {r['step_time_median']:7.3f} {r['step_dedicated']:9.3f} "
              f"{r['compute_max']:7.3f} {r['compute_mean']:8.3f} {r['comm']:6.3f} {r['wait']:9.3f} "
              f"{r['wait_compute']:11.3f} {r['gap_by_plan']:7.3f}+-{r['gap_by_plan_se']:5.3f} "
              f"{r['blocked_fast']:11.3f} {r['queued']:6.3f} {r['cost_imbalance']:9.4f} {r['vit_token_ratio']:12.4f}")
    if ratio:
        print_ratio_summary(ratio)
    print(f"calibration, per rank and step: CostModel.calibrate -> {fitted.scale[0] * 1e9:.4f} s per GFLOP; "
          f"with an intercept: {overhead:.3f} s + {per_flop * 1e9:.4f} s per GFLOP")
    reduction = lambda key: 1.0 - pl[key] / nv[key] if nv[key] > 0 else None   # noqa: E731
    summary = {"wait_reduction": reduction("wait"), "step_time_planner": pl["step_time"],
               "step_time_naive": nv["step_time"], "wait_planner": pl["wait"], "wait_naive": nv["wait"],
               "wait_reduction_imbalance_only": reduction("wait_compute"),
               "wait_imbalance_planner": pl["wait_compute"], "wait_imbalance_naive": nv["wait_compute"],
               "wait_reduction_systematic": reduction("gap_by_plan"),
               "gap_by_plan_planner": pl["gap_by_plan"], "gap_by_plan_se_planner": pl["gap_by_plan_se"],
               "gap_by_plan_naive": nv["gap_by_plan"], "gap_by_plan_se_naive": nv["gap_by_plan_se"],
               "comm_planner": pl["comm"], "comm_naive": nv["comm"],
               "step_time_dedicated_planner": pl["step_dedicated"], "step_time_dedicated_naive": nv["step_dedicated"],
               "step_time_median_planner": pl["step_time_median"], "step_time_median_naive": nv["step_time_median"],
               "wait_reduction_raw_blocked": reduction("blocked_fast"),
               "blocked_raw_planner": pl["blocked_fast"], "blocked_raw_naive": nv["blocked_fast"],
               "queued_planner": pl["queued"], "queued_naive": nv["queued"],
               "compute_max_planner": pl["compute_max"], "compute_max_naive": nv["compute_max"],
               "cost_imbalance_planner": pl["cost_imbalance"], "cost_imbalance_naive": nv["cost_imbalance"],
               "calibrated_s_per_gflop": fitted.scale[0] * 1e9, "fit_overhead_s": float(overhead),
               "fit_s_per_gflop": float(per_flop) * 1e9, "e2e_elapsed_s": e2e["elapsed_s"],
               **{k: v for k, v in ratio.items() if k != "batch_frames"},
               "cpu_count": os.cpu_count(), "load_avg_1min_before": load_before[0],
               "load_avg_1min_after": load_after[0]}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

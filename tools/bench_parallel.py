"""Distributed-engine step time: ZeRO-3 vs ZeRO-1 and TP=2 vs TP=1, side by side in one run.

Launches the real trainer with torchrun once per layout, in sequence, on the same machine and
config (2 ranks each, a few steps), and compares medians of the trainer's ``step_time`` after
warm-up:

    layout     ranks  TP  DP  ZeRO
    zero1        2     1   2    1
    zero3        2     1   2    3
    tp2_zero3    2     2   1    3

    zero3_over_zero1_step_time = zero3 / zero1        (same TP=1 x DP=2, only the ZeRO stage differs)
    tp2_over_tp1_step_time     = tp2_zero3 / zero3    (same 2 ranks and global batch, TP=2 x DP=1 vs TP=1 x DP=2)

    .venv/bin/python tools/bench_parallel.py --config jobs/bench_cpu.yaml [--steps 8 --warmup 3] [key=value ...]

``--rounds N`` repeats the whole sequence N times (medians over all rounds), which evens out a
machine whose load drifts. The last line is one JSON object. Each rank runs with one thread
(OMP_NUM_THREADS=1, as torchrun sets for several ranks); on a 2-core host 2 ranks use both cores.
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

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {  # name: (tensor_parallel, zero_stage)
    "zero1": (1, 1),
    "zero3": (1, 3),
    "tp2_zero3": (2, 3),
}
RANKS = 2


def _worker(args) -> int:
    """One rank of one layout (under torchrun): train, and on rank 0 write the step times."""
    from stts_dist.config import load_config
    from stts_dist.train.trainer import Trainer

    class StepTimes:
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, trainer, step: int, metrics: dict) -> None:
            self.times.append(float(metrics["step_time"]))

    cfg = load_config(args.config, args.overrides)
    recorder = StepTimes()
    trainer = Trainer(cfg, callbacks=[recorder])
    trainer.fit()
    if trainer.is_rank0:
        Path(args.worker_out).write_text(json.dumps({"step_times": recorder.times,
                                                     "parameters": sum(getattr(p, "ds_numel", p.numel())
                                                                       for p in trainer.model.parameters())}))
    return 0


def _launch(name: str, args, out_dir: Path) -> dict:
    tp, zero = LAYOUTS[name]
    result = out_dir / f"{name}.json"
    overrides = list(args.overrides) + [
        f"parallel.tensor_parallel={tp}", f"parallel.zero_stage={zero}", "parallel.engine=deepspeed",
        f"train.steps={args.warmup + args.steps}", f"train.out_dir={out_dir / name}", "train.resume=false",
        "train.save_every=0", "train.eval_every=0", "train.progress_bar=false", "train.log_every=1000000",
        "tracking.enabled=false", "data.eval_samples=1", "train.eval_prune_ratios=[0.5]", "data.num_workers=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
           str(Path(__file__).resolve()), "--worker-out", str(result), "--config", args.config, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               # as tools/bench_stts.py: keep glibc from page-faulting on every large tensor
               MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="100000000000")
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"layout {name} (TP={tp}, ZeRO-{zero}) failed with exit code {proc.returncode}:\n{tail}")
    data = json.loads(result.read_text())
    times = data["step_times"][args.warmup:]
    return {"step_times": times, "median_step_time": statistics.median(times), "wall_s": time.perf_counter() - t0,
            "load_avg_1min_before": load_before, "parameters_per_rank": data["parameters"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="ZeRO-3 vs ZeRO-1 and TP=2 vs TP=1 step time (torchrun, 2 ranks)")
    ap.add_argument("--config", default="jobs/bench_cpu.yaml")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per layout (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps per layout")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the layout sequence this many times")
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)  # set when this file runs as a torchrun rank
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.num_frames=8")
    args = ap.parse_args(argv)
    if args.worker_out:
        return _worker(args)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        ap.error("--steps and --rounds must be >= 1 and --warmup >= 0")

    runs: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory(prefix="bench_parallel_") as tmp:
        for r in range(args.rounds):
            for name in LAYOUTS:
                res = _launch(name, args, Path(tmp) / f"round{r}")
                runs[name].append(res)
                print(f"[bench] round {r} {name}: median step {res['median_step_time']:.3f} s over "
                      f"{len(res['step_times'])} steps (launch {res['wall_s']:.0f} s, load avg "
                      f"{res['load_avg_1min_before']:.1f})", flush=True)
    median = {name: statistics.median(t for res in rs for t in res["step_times"]) for name, rs in runs.items()}
    summary = {
        "config": args.config, "overrides": args.overrides, "ranks": RANKS, "steps": args.steps,
        "warmup": args.warmup, "rounds": args.rounds, "cpu_count": os.cpu_count(),
        "load_avg_1min_end": round(os.getloadavg()[0], 2),
        "median_step_time_s": {k: round(v, 4) for k, v in median.items()},
        "zero3_over_zero1_step_time": round(median["zero3"] / median["zero1"], 3),
        "tp2_over_tp1_step_time": round(median["tp2_zero3"] / median["zero3"], 3),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

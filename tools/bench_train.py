#!/usr/bin/env python
"""End-to-end training benchmark: the REAL trainer (``torchrun -m stts_dist.train``, DeepSpeed
ZeRO from the config's ``parallel`` settings, the config's data source and loader, the balancer
on or off) pruned vs unpruned, where ``tools/bench_stts.py`` times one model step in isolation.

    .venv/bin/python tools/bench_train.py --config jobs/bench_cpu.yaml --nproc 2 --steps 6 \\
        --warmup 2 --rounds 2 [--double-frames] [key=value ...]
    .venv/bin/python tools/bench_train.py --variable-length --min-frames 4 --frames 32 ...

Every run is a separate ``torchrun --nproc_per_node N -m stts_dist.train`` of ``warmup + steps``
steps; the runs are INTERLEAVED round by round (round ``r``: unpruned, pruned, [unpruned at 2T,
pruned at 2T], the order reversed on odd rounds), so drifts of a shared machine's load hit both
methods alike. ``STTS_PHASE_TIMES=1`` makes the trainer write, per step, where the step's wall
time went into the run's ``train_log.jsonl`` (``stts_dist/train/phase_timer.py``: loader wait,
forward, backward, optimizer step without the time blocked in collectives, ``comm`` = blocked in
collectives (ZeRO-3 gathers / reduce-scatters, all-reduces), logging callbacks, other). A step's
time is its window from one step's metrics to the next (all phases, loader and callbacks
included), mean over ranks; the first ``--warmup`` steps of every run are discarded.

Each run stops right after its last measured step through ``fault.fail_at_step`` (the run exits
with an injected fault instead of writing its final checkpoint and evaluation, which are no part
of a step and at GPU scale write gigabytes); the tool checks that this, and nothing else, ended it.

Modes (the last stdout line is one JSON object; progress goes to stderr):

* default: ``model.stts.method=none`` vs ``--pruned-method`` (scorer) at the config's
  ``model.stts.prune_ratio``. ``train_speedup_e2e`` = median unpruned step / median pruned step;
  ``train_speedup_e2e_paired`` = median over rounds of the per-round ratio; ``flop_ideal_speedup``
  from the project's FLOP model (``stts_dist/flops.py`` through ``tools/bench_stts.py``'s
  ``flop_ratio``, on one batch of the config's size, with the scorer's real keep mask of a model
  at initialisation); ``phase_shares_*`` sum to 1. ``--double-frames`` adds a second pair at
  twice ``data.num_frames`` (``*_2x`` keys). ``--compare-host-memory`` runs every pair a second
  time with ``train.keep_freed_host_memory=false`` (glibc's default malloc, which unmaps large
  freed blocks; ``*_glibc_default`` keys), interleaved with the rest.
* ``--variable-length``: clips of ``data.min_frames=--min-frames`` .. ``data.num_frames`` frames,
  pruned, balancer (``balance.enabled``) off vs on. Per setting: step time, and the time blocked
  in collectives per step of the rank that waited most (``wait_s_max_rank``: it finished its
  compute first and waited for the straggler) and least (``wait_s_min_rank``: the straggler's
  own, pure communication), medians over steps; the balancer's ``balance/*`` stats when on.

On a GPU (``--nproc 1``) the config's ``train.dtype`` applies (auto = bf16) and the phase timer
synchronises the device at every phase boundary (kernels charged to the phase that launched them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("loader", "forward", "backward", "optimizer", "comm", "logging", "other")   # phase_timer.PHASES
PHASE_ENV = "STTS_PHASE_TIMES"                                                      # phase_timer.ENV
INJECTED = "InjectedFault"
HOST_MEMORY_KEY = "train.keep_freed_host_memory"      # stts_dist/host_allocator.py
HOST_DEFAULT_SUFFIX = "_glibc_default"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "STTS_LAUNCHER", "STTS_SAMPLE_LOG")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# one training run

def run_overrides(args, out_dir: Path, method: str, frames: Optional[int], balance: bool,
                  min_frames: Optional[int] = None, extra: tuple[str, ...] = ()) -> list[str]:
    """Defaults the user's trailing overrides may change, the user's, the setting's ``extra``,
    then the benchmark's own."""
    steps = args.warmup + args.steps
    defaults = [f"parallel.engine={args.engine}", "tracking.enabled=false", "train.log_every=1000000",
                "train.progress_bar=false"]
    if args.device != "auto":
        defaults.append(f"train.device={args.device}")
    forced = [f"model.stts.method={method}", f"train.steps={steps + 1}", f"fault.fail_at_step={steps}",
              "fault.fail_rank=-1", f"train.out_dir={out_dir}", "train.resume=false", "train.save_every=0",
              "train.eval_every=0", "tracking.visualize_every=0", f"balance.enabled={str(balance).lower()}"]
    if frames is not None:
        forced.append(f"data.num_frames={frames}")
    if min_frames is not None:
        forced.append(f"data.min_frames={min_frames}")
    return defaults + list(args.overrides) + list(extra) + forced


def launch(args, out_dir: Path, overrides: list[str]) -> Path:
    """One ``torchrun -m stts_dist.train``; returns its ``train_log.jsonl``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = launcher + ["--nproc_per_node", str(args.nproc), "--master_addr", "127.0.0.1",
                      "--master_port", str(_free_port()), "-m", "stts_dist.train", "--config", args.config,
                      *overrides]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update({PHASE_ENV: "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])})
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""        # the distributed module takes a GPU whenever it sees one
    logfile = out_dir / "torchrun.log"
    with open(logfile, "wb") as f:
        f.write((" ".join(cmd) + "\n").encode())
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(args.run_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise SystemExit(f"run in {out_dir} still running after {args.run_timeout} s; killed (log: {logfile})")
    text = logfile.read_text(errors="replace")
    train_log = out_dir / "train_log.jsonl"
    if rc != 0 and INJECTED not in text or not train_log.is_file():
        log(text[-6000:])
        raise SystemExit(f"torchrun exited with {rc} before its last measured step (log above, {logfile})")
    return train_log


def read_steps(train_log: Path, warmup: int, steps: int) -> list[dict]:
    rows = [json.loads(line) for line in train_log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if warmup < r["step"] <= warmup + steps]
    if len(rows) != steps:
        raise SystemExit(f"{train_log}: {len(rows)} measured steps, expected {steps}")
    if "phase/wall_s" not in rows[0]:
        raise SystemExit(f"{train_log} has no phase/* columns: does the trainer call stts_dist.train.phase_timer?")
    return rows


# ---------------------------------------------------------------------------------------------
# summaries

def spread(values: list[float], prefix: str) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {f"{prefix}_median": statistics.median(values), f"{prefix}_min": min(values),
            f"{prefix}_max": max(values), f"{prefix}_iqr": q[2] - q[0]}


def phase_shares(rows: list[dict]) -> dict[str, float]:
    """Share of the summed step time per phase (rank means); sums to 1."""
    total = sum(sum(r[f"phase/{p}_s"] for p in PHASES) for r in rows)
    return {p: sum(r[f"phase/{p}_s"] for r in rows) / total for p in PHASES}


def phase_seconds(rows: list[dict]) -> dict[str, float]:
    return {p: statistics.median(r[f"phase/{p}_s"] for r in rows) for p in PHASES}


class Case:
    """One setting (e.g. pruned at T frames): its runs' steady-state rows, round by round."""

    def __init__(self, name: str, method: str, frames: Optional[int], balance: bool,
                 min_frames: Optional[int] = None, extra: tuple[str, ...] = ()):
        self.name, self.method, self.frames, self.balance, self.min_frames = name, method, frames, balance, min_frames
        self.extra = extra
        self.rounds: list[list[dict]] = []

    @property
    def rows(self) -> list[dict]:
        return [r for rows in self.rounds for r in rows]

    def step_times(self) -> list[float]:
        return [r["phase/wall_s"] for r in self.rows]

    def round_medians(self) -> list[float]:
        return [statistics.median(r["phase/wall_s"] for r in rows) for rows in self.rounds]

    def summary(self, tag: str) -> dict[str, Any]:
        rows = self.rows
        out: dict[str, Any] = spread(self.step_times(), f"step_s_{tag}")
        out[f"trainer_step_time_s_{tag}"] = statistics.median(r["step_time"] for r in rows)
        out[f"phase_shares_{tag}"] = phase_shares(rows)
        out[f"phase_s_{tag}"] = phase_seconds(rows)
        return out


def run_rounds(args, cases: list[Case], tmp: Path) -> int:
    world = 0
    for rnd in range(args.rounds):
        for case in (cases if rnd % 2 == 0 else cases[::-1]):
            out_dir = tmp / f"r{rnd}_{case.name}"
            t0 = time.perf_counter()
            train_log = launch(args, out_dir, run_overrides(args, out_dir, case.method, case.frames,
                                                            case.balance, case.min_frames, case.extra))
            rows = read_steps(train_log, args.warmup, args.steps)
            case.rounds.append(rows)
            world = int(rows[0]["phase/ranks"])
            log(f"  round {rnd} {case.name}: step {statistics.median(r['phase/wall_s'] for r in rows):.3f}s "
                f"(median of {len(rows)}), run {time.perf_counter() - t0:.0f}s, load {os.getloadavg()[0]:.2f}")
            if not args.keep:
                shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return world


# ---------------------------------------------------------------------------------------------
# the FLOP ideal (tools/bench_stts.py's flop_ratio over stts_dist/flops.py)

def _bench_stts():
    """``tools/bench_stts.py`` as a module (importing it restarts nothing)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_stts
    return bench_stts


def flop_ideal(args, frame_counts: list[int], method: str) -> list[float]:
    """Unpruned / pruned forward FLOPs of one global batch at each frame count (training ~ 3x
    forward for both, so the ratio is the training ideal)."""
    import contextlib

    import torch

    from stts_dist.config import load_config
    from stts_dist.model.vlm import build_model
    from stts_dist.tokenizer import default_tokenizer

    bs = _bench_stts()
    cfg = load_config(args.config, list(args.overrides) + [f"model.stts.method={method}"])
    cuda = args.device != "cpu" and torch.cuda.is_available()
    bs.DEVICE = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    tok = default_tokenizer()
    model = build_model(cfg.model, tok).to(bs.DEVICE)
    model.train()
    gen = torch.Generator().manual_seed(0)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    out = []
    for frames in frame_counts:
        case = bs.FrameCase(cfg, model, tok, frames)
        with torch.no_grad(), amp:
            pruned = model(case.b_pruned, generator=gen)      # the batch carries the pruning setting
        out.append(bs.flop_ratio(cfg, model, case.b_none, case.b_pruned, pruned))
    del model
    if cuda:
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------

def device_name(args) -> str:
    if args.device != "cpu":
        try:
            import torch
            if torch.cuda.is_available():
                return torch.cuda.get_device_name()
        except Exception:   # noqa: BLE001 - only a label
            pass
    return f"cpu ({os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"


def bench_pruning(args, tmp: Path) -> dict[str, Any]:
    from stts_dist.config import load_config
    cfg = load_config(args.config, list(args.overrides))
    frames = args.frames or cfg.data.num_frames
    frame_counts = [frames, 2 * frames] if args.double_frames else [frames]
    balance = args.balance == "on"
    # (key suffix, overrides) of each allocator setting; the trainer's default first
    variants = [("", ())] + ([(HOST_DEFAULT_SUFFIX, (f"{HOST_MEMORY_KEY}=false",))] if args.compare_host_memory else [])
    pairs = []      # (key suffix, frames, unpruned case, pruned case)
    for i, f in enumerate(frame_counts):
        for vsfx, extra in variants:
            sfx = ("" if i == 0 else "_2x") + vsfx
            pairs.append((sfx, f, Case(f"unpruned{sfx}", "none", f, balance, extra=extra),
                          Case(f"pruned{sfx}", args.pruned_method, f, balance, extra=extra)))
    cases = [c for _, _, none, pruned in pairs for c in (none, pruned)]
    world = run_rounds(args, cases, tmp)
    ideals = flop_ideal(args, frame_counts, args.pruned_method)    # after the runs: no memory held during them
    result: dict[str, Any] = {"mode": "pruned_vs_unpruned", "frames": frames, "world_size": world,
                              "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                              "prune_ratio": cfg.model.stts.prune_ratio, "pruned_method": args.pruned_method,
                              "balance": args.balance}
    for sfx, f, none, pruned in pairs:
        i = frame_counts.index(f)
        part: dict[str, Any] = {
            "train_speedup_e2e": statistics.median(none.step_times()) / statistics.median(pruned.step_times()),
            "train_speedup_e2e_paired": statistics.median(a / b for a, b in zip(none.round_medians(),
                                                                                pruned.round_medians())),
            "flop_ideal_speedup": ideals[i],
            **none.summary("unpruned"), **pruned.summary("pruned")}
        part["ratio_of_ideal"] = part["train_speedup_e2e"] / ideals[i]
        if i:
            part["frames"] = f
        result.update({f"{k}{sfx}": v for k, v in part.items()})
    if args.compare_host_memory:    # what keeping freed blocks buys each method (default malloc / kept)
        for sfx in ("", "_2x")[:len(frame_counts)]:
            for tag in ("unpruned", "pruned"):
                result[f"host_memory_speedup_{tag}{sfx}"] = (result[f"step_s_{tag}_median{sfx}{HOST_DEFAULT_SUFFIX}"]
                                                             / result[f"step_s_{tag}_median{sfx}"])
    return result


def bench_variable_length(args, tmp: Path) -> dict[str, Any]:
    from stts_dist.config import load_config
    cfg = load_config(args.config, list(args.overrides))
    frames = args.frames or cfg.data.num_frames
    cases = [Case("balance_off", args.pruned_method, frames, False, args.min_frames),
             Case("balance_on", args.pruned_method, frames, True, args.min_frames)]
    world = run_rounds(args, cases, tmp)
    result: dict[str, Any] = {"mode": "variable_length", "frames": frames, "min_frames": args.min_frames,
                              "world_size": world, "steps": args.steps, "warmup": args.warmup,
                              "rounds": args.rounds, "prune_ratio": cfg.model.stts.prune_ratio,
                              "pruned_method": args.pruned_method}
    for case in cases:
        tag = case.name
        rows = case.rows
        result.update(case.summary(tag))
        result[f"wait_s_max_rank_{tag}"] = statistics.median(r["phase/comm_s_max"] for r in rows)
        result[f"wait_s_min_rank_{tag}"] = statistics.median(r["phase/comm_s_min"] for r in rows)
        result[f"loader_s_max_rank_{tag}"] = statistics.median(r["phase/loader_s_max"] for r in rows)
        stats = sorted({k for r in rows for k in r if k.startswith("balance/")})
        if stats:
            result[f"balance_stats_{tag}"] = {k[len("balance/"):]: statistics.median(r[k] for r in rows if k in r)
                                              for k in stats}
    off, on = cases
    result["balancer_speedup"] = statistics.median(off.step_times()) / statistics.median(on.step_times())
    result["balancer_speedup_paired"] = statistics.median(a / b for a, b in zip(off.round_medians(),
                                                                               on.round_medians()))
    w_off, w_on = result["wait_s_max_rank_balance_off"], result["wait_s_max_rank_balance_on"]
    result["wait_reduction"] = 1 - w_on / w_off if w_off > 0 else 0.0
    return result


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    return x


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="jobs/bench_cpu.yaml")
    ap.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per run (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2, help="steps discarded at the start of every run")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (one run per setting each)")
    ap.add_argument("--frames", type=int, default=0, help="data.num_frames (0: the config's)")
    ap.add_argument("--balance", choices=("on", "off"), default="off", help="balance.enabled for both methods")
    ap.add_argument("--double-frames", action="store_true", help="also a pair at 2x the frames (*_2x keys)")
    ap.add_argument("--compare-host-memory", action="store_true",
                    help=f"also every pair with {HOST_MEMORY_KEY}=false (glibc's default malloc; "
                         f"*{HOST_DEFAULT_SUFFIX} keys)")
    ap.add_argument("--variable-length", action="store_true",
                    help="clips of --min-frames..frames, pruned, balancer off vs on")
    ap.add_argument("--min-frames", type=int, default=4, help="data.min_frames for --variable-length")
    ap.add_argument("--pruned-method", default="scorer", help="model.stts.method of the pruned runs")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="cpu hides GPUs from the ranks; auto/cuda: the trainer's choice")
    ap.add_argument("--engine", default="deepspeed",
                    help="parallel.engine (deepspeed: ZeRO from the config also with --nproc 1)")
    ap.add_argument("--run-timeout", type=float, default=3600, help="seconds one run may take")
    ap.add_argument("--keep", default="", help="keep the run folders (logs, train_log.jsonl) here")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.nproc < 1:
        ap.error("--steps, --rounds and --nproc must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started, load0 = time.perf_counter(), os.getloadavg()
    log(f"bench_train: {args.config} x{args.nproc} ranks, {args.rounds} rounds of {args.warmup}+{args.steps} steps, "
        f"load {load0[0]:.2f}")
    if args.keep:
        tmp_ctx: Any = None
        tmp = Path(args.keep)
        tmp.mkdir(parents=True, exist_ok=True)
    else:
        tmp_ctx = tempfile.TemporaryDirectory(prefix="bench_train_")
        tmp = Path(tmp_ctx.name)
    try:
        result = bench_variable_length(args, tmp) if args.variable_length else bench_pruning(args, tmp)
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    result.update(nproc=args.nproc, config=args.config, overrides=list(args.overrides), device=device_name(args),
                  load_avg_start=load0[0], load_avg_end=os.getloadavg()[0],
                  wall_s=time.perf_counter() - started)
    if not args.variable_length:
        log(f"T={result['frames']}: e2e {result['train_speedup_e2e']:.2f}x "
            f"(FLOP ideal {result['flop_ideal_speedup']:.2f}x), step {result['step_s_unpruned_median']:.3f}s "
            f"vs {result['step_s_pruned_median']:.3f}s")
    print(json.dumps(_round(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

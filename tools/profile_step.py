#!/usr/bin/env python
"""Where one training step of a config's model goes, pruned vs unpruned (torch.profiler).

    .venv/bin/python tools/profile_step.py [--config jobs/default.yaml] [--steps 5] [--top 12] [key=value ...]

Builds the config's model once (one process, this process's threads), takes one batch of
``train.batch_size`` moving-digits clips at the config's frames, warms both paths up, then times
``--steps`` full training steps (forward + backward + AdamW) of each, unpruned and pruned, A/B
interleaved, and profiles one more step of each with ``torch.profiler``. Prints the top operators
by self CPU time for both, and one JSON line: step times, the step-rate ratio next to the FLOP
ideal (the same FLOP model as ``tools/bench_stts.py``), operator calls per step, and the top
operators with their share of the step. A small model whose step rate gains far less than its
FLOPs shrink is paying per-operator costs (launch, dispatch, small-tensor overheads) that do not
scale with tokens; the operator counts show how many.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench_stts import FrameCase, flop_ratio, reexec_with_tuned_allocator  # noqa: E402
from stts_dist.config import load_config  # noqa: E402
from stts_dist.model.vlm import build_model  # noqa: E402
from stts_dist.tokenizer import default_tokenizer  # noqa: E402


def top_operators(prof, top: int, step_s: float) -> list[dict]:
    """The ``top`` operators by self CPU time of one profiled step: name, calls, self seconds and
    share of the step's wall time."""
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "calls": e.count, "self_s": round(e.self_cpu_time_total / 1e6, 5),
             "share": round(e.self_cpu_time_total / 1e6 / step_s, 4)} for e in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="jobs/default.yaml")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per path (after 2 warm-up steps)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, "model.pretrained.digits_vit_steps=0"])
    torch.manual_seed(0)
    tok = default_tokenizer()
    model = build_model(cfg.model, tok)
    case = FrameCase(cfg, model, tok, cfg.data.num_frames)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)

    def train(batch):
        out = model(batch, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return out

    paths = {"unpruned": case.b_none, "pruned": case.b_pruned}
    for _ in range(2):
        case.out_pruned = train(case.b_pruned)
        train(case.b_none)
    times: dict[str, list[float]] = {k: [] for k in paths}
    for rep in range(args.steps):
        for key in (("unpruned", "pruned") if rep % 2 == 0 else ("pruned", "unpruned")):
            t0 = time.perf_counter()
            train(paths[key])
            times[key].append(time.perf_counter() - t0)
    step_s = {k: statistics.median(v) for k, v in times.items()}
    result = {"config": args.config, "frames": cfg.data.num_frames, "batch_size": cfg.train.batch_size,
              "threads": torch.get_num_threads(), "steps": args.steps,
              "step_s_unpruned": round(step_s["unpruned"], 4), "step_s_pruned": round(step_s["pruned"], 4),
              "step_rate_ratio": round(step_s["unpruned"] / step_s["pruned"], 4),
              "flop_ideal_speedup": round(flop_ratio(cfg, model, case.b_none, case.b_pruned, case.out_pruned), 4)}
    for key, batch in paths.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            train(batch)
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        result[f"op_calls_{key}"] = int(sum(e.count for e in events if not e.key.startswith("ProfilerStep")))
        result[f"top_ops_{key}"] = top_operators(prof, args.top, wall)
        print(f"--- {key}: one profiled step {wall:.3f} s", file=sys.stderr)
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.top), file=sys.stderr)
    result["ratio_of_ideal"] = round(result["step_rate_ratio"] / result["flop_ideal_speedup"], 4)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    reexec_with_tuned_allocator()     # time the model as tools/bench_stts.py does
    sys.exit(main())

"""STTS speed benchmark: pruned (r=0.5) vs unpruned, side by side in one run.

Times full training steps (forward + backward + AdamW) and inference prefill of the SAME model
at prune ratio 0.5 and with no pruning, interleaved (A/B/B/A ...) over several repeats, at the
config's frames and at twice the frames (both on one model, alternating within every repeat), and
reports medians of the paired per-repeat speed-ups (and the ratio of medians); also the
analytical FLOP-ideal speed-up, and the overhead of scoring + selection + packing as a fraction
of a pruned step.

    .venv/bin/python tools/bench_stts.py --config jobs/bench_cpu.yaml [--repeats 5] [key=value ...]

The last line is one JSON object. glibc's allocator page-faults on every use of tensors > 32 MB,
which slows the unpruned model most and inflates speed-ups beyond the FLOP ideal; the script
re-executes itself with MALLOC_MMAP_MAX_=0 / MALLOC_TRIM_THRESHOLD_ set to avoid that trap.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time


def reexec_with_tuned_allocator() -> None:
    """Restart this script with glibc's mmap threshold off (the variables only act at process
    start). For the timing scripts' own process; a module importing this one is not restarted."""
    if os.environ.get("MALLOC_MMAP_MAX_") != "0":
        os.environ.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="100000000000")
        os.execv(sys.executable, [sys.executable] + sys.argv)


if __name__ == "__main__":
    reexec_with_tuned_allocator()     # before torch loads: the restart is cheap

import torch  # noqa: E402

from stts_dist.config import load_config  # noqa: E402
from stts_dist.data.batch import SequenceBuilder  # noqa: E402
from stts_dist.data.digits import make_sample  # noqa: E402
from stts_dist.flops import model_forward_flops  # noqa: E402
from stts_dist.ops.groups import ungroup_mask  # noqa: E402
from stts_dist.model.vlm import build_model  # noqa: E402
from stts_dist.stts.packing import gather_packed, pack_kept_tokens, scatter_packed  # noqa: E402
from stts_dist.stts.scorer import group_features, temporal_novelty_loss, key_bias_from_scores  # noqa: E402
from stts_dist.stts.selection import select_groups  # noqa: E402
from stts_dist.tokenizer import default_tokenizer  # noqa: E402


def flop_ratio(cfg, model, batch_none, batch_pruned, out_pruned) -> float:
    n = model.budget.patches_per_frame
    full = [[n] * T for T in batch_none.layout.lengths]
    patch_keep = ungroup_mask(out_pruned.vit.keep, model.vit.grid, cfg.model.connector.pool_size).sum(1).tolist()
    kept, i = [], 0
    for T in batch_pruned.layout.lengths:
        kept.append(patch_keep[i:i + T])
        i += T
    f0 = model_forward_flops(cfg.model, batch_none.budget, full, batch_none.seq_lengths,
                             sum(len(f) for f in full) * batch_none.budget.groups_per_frame)
    f1 = model_forward_flops(cfg.model, batch_pruned.budget, kept, batch_pruned.seq_lengths, int(out_pruned.vit.keep.sum()))
    return f0.total / f1.total


DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


class FrameCase:
    """One frame count: its batches (unpruned and pruned) and timings, on the shared model."""

    def __init__(self, cfg, model, tok, frames: int):
        self.frames = frames
        samples = [make_sample(i, 0, frames, cfg.model.vit.image_size) for i in range(cfg.train.batch_size)]
        size = cfg.model.vit.image_size
        self.b_none = SequenceBuilder(tok, model.budget.with_setting("none", 0.0), size)(samples).to(DEVICE)
        self.b_pruned = SequenceBuilder(tok, model.budget.with_setting("scorer", cfg.model.stts.prune_ratio),
                                        size)(samples).to(DEVICE)
        self.times: dict[str, list[float]] = {k: [] for k in ("train_none", "train_pruned", "infer_none", "infer_pruned")}
        self.out_pruned = None
        self.peak: dict[str, float] = {}


def bench(cfg, frame_counts: list[int], repeats: int, log) -> list[dict]:
    """Every frame count on ONE model, interleaved within each repeat (A/B/B/A per frame count,
    the frame counts alternating too), so slow drifts of a shared machine hit all cases alike.
    Speed-ups are medians of the per-repeat paired ratios (unpruned / pruned timed back to back),
    which cancels drifts slower than one repeat; the ratio of medians is reported next to it."""
    torch.manual_seed(0)
    tok = default_tokenizer()
    model = build_model(cfg.model, tok).to(DEVICE)
    cases = [FrameCase(cfg, model, tok, f) for f in frame_counts]
    r = cfg.model.stts.prune_ratio
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    # bf16 autocast on GPU (the production setting), fp32 on CPU
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if DEVICE.type == "cuda" else contextlib.nullcontext

    def train(batch):
        with amp():
            out = model(batch, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return out

    @torch.no_grad()
    def infer(batch):
        with amp():
            return model(batch, generator=gen)

    for c in cases:   # warm-up every path and shape (allocator, kernels)
        c.out_pruned = train(c.b_pruned)
        train(c.b_none)
        infer(c.b_pruned)
        infer(c.b_none)
    for rep in range(repeats):
        for c in (cases if rep % 2 == 0 else cases[::-1]):
            order = [("none", c.b_none), ("pruned", c.b_pruned)]
            if rep % 2:
                order.reverse()
            for key, batch in order:
                c.times[f"train_{key}"].append(time_call(lambda: train(batch)))
            for key, batch in order:
                c.times[f"infer_{key}"].append(time_call(lambda: infer(batch)))
            log(f"  T={c.frames} rep {rep}: " + " ".join(f"{k}={v[-1]:.3f}s" for k, v in c.times.items()))
    if DEVICE.type == "cuda":   # peak memory of a full training step (optimizer state included)
        for c in cases:
            for key, batch in (("none", c.b_none), ("pruned", c.b_pruned)):
                torch.cuda.reset_peak_memory_stats()
                train(batch)
                c.peak[f"train_peak_mem_gb_{key}"] = torch.cuda.max_memory_allocated() / 2**30
    return [summarize_case(cfg, model, c, r, repeats) for c in cases]


def paired_speedup(slow: list[float], fast: list[float]) -> float:
    """Median over repeats of slow[i] / fast[i] (timed back to back in repeat i)."""
    return statistics.median(a / b for a, b in zip(slow, fast))


def summarize_case(cfg, model, c: FrameCase, r: float, repeats: int) -> dict:
    med = {k: statistics.median(v) for k, v in c.times.items()}
    # overhead of scorer + selection + key bias + packing, timed on the same tensors
    with torch.no_grad():
        x = model.vit.blocks[0](model.vit(c.b_pruned.frames))   # features entering the scorer
    x.requires_grad_(True)
    grid, g = model.vit.grid, cfg.model.connector.pool_size
    layout = c.b_pruned.layout

    def overhead():
        scores = model.scorer(x, grid, layout)
        aux = temporal_novelty_loss(scores, group_features(x, grid, g), layout)
        keep = select_groups(c.b_pruned.budget, layout, scores=scores)
        bias = key_bias_from_scores(scores, grid, g, layout, -2.0)
        packed = pack_kept_tokens(ungroup_mask(keep, grid, g))
        y = scatter_packed(gather_packed(x, packed), packed)
        (aux + bias.sum() * 1e-6 + y.sum() * 1e-6).backward()

    overhead()
    ov = statistics.median(time_call(overhead) for _ in range(max(3, repeats)))
    return {
        "frames": c.frames,
        "train_speedup": paired_speedup(c.times["train_none"], c.times["train_pruned"]),
        "infer_speedup": paired_speedup(c.times["infer_none"], c.times["infer_pruned"]),
        "flop_ideal_speedup": flop_ratio(cfg, model, c.b_none, c.b_pruned, c.out_pruned),
        "train_speedup_of_medians": med["train_none"] / med["train_pruned"],
        "infer_speedup_of_medians": med["infer_none"] / med["infer_pruned"],
        "train_step_s_unpruned": med["train_none"], "train_step_s_pruned": med["train_pruned"],
        "prefill_s_unpruned": med["infer_none"], "prefill_s_pruned": med["infer_pruned"],
        "stts_overhead_fraction": ov / med["train_pruned"],
        **c.peak,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="jobs/bench_cpu.yaml")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (bf16 autocast, synchronised timing)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    global DEVICE
    DEVICE = torch.device(args.device)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    log(f"device={name} config={args.config}")
    base = cfg.data.num_frames
    r1, r2 = bench(cfg, [base, base * 2], args.repeats, log)
    result = dict(r1)
    for k in ("train_speedup", "infer_speedup", "flop_ideal_speedup", "stts_overhead_fraction",
              "train_speedup_of_medians", "infer_speedup_of_medians",
              "train_step_s_unpruned", "train_step_s_pruned", "prefill_s_unpruned", "prefill_s_pruned"):
        result[f"{k}_2x"] = r2[k]
    result["frames_2x"] = r2["frames"]
    result["prune_ratio"] = cfg.model.stts.prune_ratio
    result["repeats"] = args.repeats
    result["device"] = name
    result = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
    print(f"T={r1['frames']}: train {r1['train_speedup']:.2f}x infer {r1['infer_speedup']:.2f}x "
          f"(FLOP ideal {r1['flop_ideal_speedup']:.2f}x), STTS overhead {100 * r1['stts_overhead_fraction']:.1f}% of a step")
    print(f"T={r2['frames']}: train {r2['train_speedup']:.2f}x infer {r2['infer_speedup']:.2f}x "
          f"(FLOP ideal {r2['flop_ideal_speedup']:.2f}x)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

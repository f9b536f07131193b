"""Running ``stts-eval``'s planned settings over the held-out samples, data parallel.

Under torchrun each rank takes samples ``rank::world_size``; counts are summed with
``all_reduce`` (gloo) and batch timings gathered (``evaluation.reduce_tallies``), so every rank
ends with the same rows (:func:`summarize`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Any, Optional, Sequence

import torch

from stts_dist.device import resolve_device
from stts_dist.eval.settings import plan_for_source
from stts_dist.evaluation import Setting, Tally, reduce_tallies, run_setting
from stts_dist.heldout import EvalError, describe_unknown_words, make_source, unknown_word_report


def dist_context() -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist
    created = False
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        created = True
    return dist.get_rank(), dist.get_world_size(), created


def _on_every_rank(flag: bool, world: int) -> bool:
    """True when ``flag`` holds on every data-parallel rank (one tiny all-reduce)."""
    if world <= 1:
        return flag
    import torch.distributed as dist
    t = torch.tensor([0 if flag else 1], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) == 0


def gather_unknown_words(tokenizer, samples: Sequence[dict], world: int) -> Optional[dict]:
    """:func:`unknown_word_report` over every rank's samples (None for an open vocabulary)."""
    mine = unknown_word_report(tokenizer, samples)
    if mine is None or world <= 1:
        return mine
    import torch.distributed as dist
    reports: list[Any] = [None] * world
    dist.all_gather_object(reports, mine)
    out = {k: sum(r[k] for r in reports) for k in ("words", "unknown", "answers_with_unknown")}
    out["share"] = out["unknown"] / max(out["words"], 1)
    out["top"] = list(dict.fromkeys(w for r in reports for w in r["top"]))[:10]
    return out


def run_settings(model, tokenizer, source, settings: Sequence[Setting], frames: int, *, batch_size: int, seed: int,
                 max_new_tokens: int, adaptive: float, autocast, rank: int,
                 world: int) -> tuple[list[Setting], list[Tally], list[dict], list[str]]:
    """Every setting over this rank's samples, all on the same samples in the same batches, with
    one untimed warm-up batch per frame count. A test-time-scaling setting is skipped when no clip
    on any rank has its frames. Returns (settings evaluated, this rank's tallies, this rank's
    samples of the first frame count, notes)."""
    cache: dict[int, list[dict]] = {}
    warmed: set[int] = set()
    tallies = []
    evaluated = []
    notes: list[str] = []
    for s in settings:
        if s.frames not in cache:
            cache[s.frames] = source.samples(s.frames, rank, world)
        samples = cache[s.frames]
        if s.frames > frames and _on_every_rank(all(len(x["frames"]) < s.frames for x in samples), world):
            # no clip has that many frames: the setting would repeat the 1x rows
            getattr(source, "short_clips", {}).pop(s.frames, None)
            notes.append(f"{s.label} skipped: no clip has {s.frames} frames (test-time scaling needs longer clips)")
            continue
        evaluated.append(s)
        if s.frames not in warmed and samples:  # warm-up per input shape (allocator, kernels): not counted
            warmed.add(s.frames)
            run_setting(model, tokenizer, samples[:batch_size], s, batch_size, seed, max_new_tokens, autocast)
        tallies.append(run_setting(model, tokenizer, samples, s, batch_size, seed + 7919 * rank, max_new_tokens,
                                   autocast, adaptive_strength=adaptive if s.kind == "adaptive" else None))
    return evaluated, tallies, next(iter(cache.values()), []), notes


def summarize(settings: Sequence[Setting], tallies: Sequence[Tally], tasks: Sequence[str]) -> list[dict]:
    """One row per setting with accuracy, tokens and timing; speed-up relative to the baseline row."""
    rows = []
    for s, t in zip(settings, tallies):
        n = sum(t.total.values())
        row: dict[str, Any] = {"setting": s.label, "method": s.method, "prune_ratio": s.prune_ratio,
                               "frames": s.frames, "kind": s.kind, "n": n,
                               "acc": sum(t.correct.values()) / n if n else float("nan")}
        for k in tasks:
            row[f"acc/{k}"] = t.correct.get(k, 0) / t.total[k] if t.total.get(k) else float("nan")
        row.update(frames_mean=t.frames / max(n, 1), llm_visual_tokens=t.llm_tokens / max(n, 1), llm_visual_tokens_unpruned=t.llm_tokens_unpruned / max(n, 1),
                   vit_patches=t.vit_patches / max(n, 1), vit_patches_kept=t.vit_patches_kept / max(n, 1),
                   prefill_ms=statistics.median(t.prefill_s) * 1e3 if t.prefill_s else float("nan"),
                   batches=len(t.prefill_s))
        if t.coverage.videos:
            row.update(t.coverage.metrics())
        rows.append(row)
    base = rows[0]["prefill_ms"]
    for row in rows:
        row["speedup"] = base / row["prefill_ms"] if row["prefill_ms"] > 0 else float("nan")
    return rows


def evaluate(args: argparse.Namespace, methods: Sequence[str], ratios: Sequence[float], rank: int, world: int) -> dict:
    """Open the checkpoint, plan the settings for the source, run them on this rank's samples and
    reduce over ranks. ``args``: ``stts-eval``'s options (``cli.build_parser``), already checked.
    Returns the report (the same on every rank)."""
    from stts_dist.trained_model import open_trained_model

    device = resolve_device(args.device, "--device")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    cfg, tokenizer, model, step_dir = open_trained_model(args.checkpoint, device=device, verify=not args.no_verify)
    source = make_source(args.data, cfg, args.samples, args.workers)
    G = model.budget.groups_per_frame
    settings, frames, tts, notes = plan_for_source(source, methods, ratios, G, args.frames or cfg.data.num_frames,
                                                   args.tts_factor, adaptive=args.adaptive > 0,
                                                   requested_frames=args.frames)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (
        device.type == "cuda" and cfg.train.dtype in ("auto", "bf16")) else None
    settings, tallies, samples, skipped = run_settings(
        model, tokenizer, source, settings, frames, batch_size=args.batch_size, seed=args.seed,
        max_new_tokens=args.max_new_tokens, adaptive=args.adaptive, autocast=autocast, rank=rank, world=world)
    notes += skipped
    tasks = list(source.tasks)
    tallies = reduce_tallies(tallies, tasks, world)
    unknown = gather_unknown_words(tokenizer, samples, world)
    if unknown and unknown["unknown"]:
        notes.append(describe_unknown_words(unknown))
    for n, count in sorted(getattr(source, "short_clips", {}).items()):
        notes.append(f"{count} clip(s) on rank {rank} have fewer than {n} frames: evaluated with all their frames "
                     f"(see the frames and token columns)")
    if sum(tallies[0].total.values()) == 0:
        raise EvalError(f"no samples to evaluate in {source.name}")
    rows = summarize(settings, tallies, tasks)
    manifest = json.loads((step_dir / "manifest.json").read_text()) if (step_dir / "manifest.json").is_file() else {}
    return {"checkpoint": str(step_dir), "step": manifest.get("step"), "data": source.name, "frames": frames,
            "groups_per_frame": G, "tts_factor": tts, "world_size": world, "device": device.type,
            "tasks": tasks, "rows": rows, "notes": notes, "unknown_words": unknown}

"""``stts-eval``: accuracy, token counts and prefill speed of a checkpoint over a pruning sweep.

    stts-eval --checkpoint runs/digits [--data digits|shards:DIR|manifest:FILE] \\
              [--ratios 0,0.3,0.5,0.7,0.8] [--methods scorer,random,uniform,temporal_diff,none] \\
              [--frames T] [--tts-factor 2] [--adaptive S] [--samples N] [--out DIR] [--mlflow-uri URI]
    torchrun --nproc-per-node 4 -m stts_dist.eval --checkpoint ...     # data parallel

Settings evaluated (every one on the same samples and batches):
- ``none@0``: the unpruned baseline (always; the speed-up column is relative to it);
- every pruning method at every ratio > 0 (ratio 0 is the baseline for every method);
- test-time scaling (``--tts-factor k``, 0 or 1 = off): every pruning method at ``k*T`` frames
  with the ratio set so the LLM sees exactly ``G*T`` visual tokens per video, the unpruned
  model's budget at ``T`` frames (r = 1 - 1/k, nudged to the float for which
  ``int(G*r*kT) == G*(kT - T)`` exactly).
- adaptive budgets (``--adaptive S``, 0 = off): every pruning method at every ratio > 0 with the
  per-video budgets of ``stts/adaptive.py`` at strength ``S`` (same mean ratio per batch, static
  clips pruned more, busy ones less), next to the fixed ratio on the same samples.

Metrics: exact-match accuracy (``evaluation.normalize_answer``) overall and per task, mean LLM
visual tokens and ViT patches per video, and prefill time (median over batches of ViT + scorer +
connector + LLM prompt forward) with its speed-up over ``none@0``.

Data parallel: under torchrun each rank takes samples ``rank::world_size``, counts are summed
with ``all_reduce`` (gloo), batch timings gathered; rank 0 prints and writes the table, JSON,
CSV and PNG (accuracy vs LLM tokens kept, one line per method) and logs to MLflow.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from stts_dist.evaluation import Setting, Tally, reduce_tallies, run_setting
from stts_dist.heldout import EvalError, describe_unknown_words, make_source, unknown_word_report
from stts_dist.device import DeviceError, resolve_device
from stts_dist.infer import InferenceInputError
from stts_dist.plots import plot_accuracy_vs_tokens
from stts_dist.stts.budget import llm_visual_tokens, pruned_groups
from stts_dist.stts.selection import METHODS

DEFAULT_RATIOS = "0,0.3,0.5,0.7,0.8"
DEFAULT_METHODS = "scorer,random,uniform,temporal_diff,none"




# ---------------------------------------------------------------------------------------------
# What to evaluate
def ratio_for_budget(groups: int, frames: int, kept: int) -> float:
    """The prune ratio r for which a ``frames``-frame video keeps exactly ``kept`` LLM tokens
    (``G*F - int(G*r*F) == kept``), computed with the same float expression as the budget."""
    target = groups * frames - kept
    if not 0 <= target <= groups * (frames - 1):
        raise EvalError(f"cannot keep {kept} of {groups * frames} tokens of a {frames}-frame video while keeping "
                        f"its first frame ({groups} tokens) whole")
    r = target / (groups * frames)
    for _ in range(64):
        got = pruned_groups(groups, frames, r) if r > 0 else 0
        if got == target:
            return r
        r = math.nextafter(r, 1.0 if got < target else 0.0)
    raise AssertionError(f"no float ratio gives {target} pruned groups of {groups}x{frames}")  # pragma: no cover


def plan_settings(methods: Sequence[str], ratios: Sequence[float], frames: int, groups: int,
                  tts_factor: float, adaptive: bool = False) -> tuple[list[Setting], list[str]]:
    """(settings in evaluation order, notes on skipped ones). ``adaptive``: each sweep setting
    also once with adaptive per-video budgets (kind "adaptive")."""
    settings = [Setting("none", 0.0, frames, "baseline")]
    notes = []
    pruning = [m for m in methods if m != "none"]
    for m in pruning:
        for r in ratios:
            if r <= 0:
                continue
            try:
                llm_visual_tokens(groups, frames, r, frames > 1)
            except ValueError:
                notes.append(f"{m}@{r:g} skipped: it would prune {int(groups * r * frames)} of {groups * frames} "
                             f"groups of a {frames}-frame video, but the first frame ({groups}) is always kept")
                continue
            settings.append(Setting(m, r, frames, "sweep"))
            if adaptive:
                settings.append(Setting(m, r, frames, "adaptive"))
    if tts_factor and tts_factor > 1 and pruning:
        tts_frames = int(round(tts_factor * frames))
        r = ratio_for_budget(groups, tts_frames, groups * frames)
        settings += [Setting(m, r, tts_frames, "tts") for m in pruning]
    return settings, notes


def parse_floats(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EvalError(f"{name} '{text}' must be comma-separated numbers, e.g. {DEFAULT_RATIOS}") from None
    for v in values:
        if not 0.0 <= v < 1.0:
            raise EvalError(f"{name} entry {v} must be in [0, 1) (the fraction of visual tokens pruned)")
    return values


def parse_methods(text: str) -> list[str]:
    methods = [m.strip().replace("-", "_") for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise EvalError(f"--methods '{text}': unknown {bad or 'empty list'}; choose from {','.join(METHODS)}")
    return list(dict.fromkeys(methods))


# ---------------------------------------------------------------------------------------------
# Data parallel
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


# ---------------------------------------------------------------------------------------------
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


def format_table(rows: Sequence[dict], tasks: Sequence[str]) -> str:
    cols = ["setting", "frames_mean", "llm_visual_tokens", "vit_patches_kept", "acc"] + [f"acc/{k}" for k in tasks] + \
        ["prefill_ms", "speedup", "n"]
    heads = ["setting", "T", "LLM tok", "ViT kept", "acc"] + list(tasks) + ["prefill ms", "speed-up", "n"]
    if any("obj_recall" in r for r in rows):   # object annotations (digits): what each method kept
        cols += list(COVERAGE_COLUMNS)
        heads += list(COVERAGE_COLUMNS.values())

    def cell(row: dict, c: str) -> str:
        v = row.get(c, float("nan"))
        if c.startswith("acc") or c in COVERAGE_COLUMNS and not c.startswith("kept_"):
            return "-" if v != v else f"{100 * v:.1f}"
        if isinstance(v, float):
            return f"{v:.2f}" if c in ("prefill_ms", "speedup") else f"{v:.1f}"
        return str(v)

    table = [heads] + [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = ["  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths)))
             for line in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# object-coverage columns of the console table (stts_dist/object_coverage.py), ratios shown in %
COVERAGE_COLUMNS = {"obj_recall": "obj R", "obj_precision": "obj P", "obj_coverage_frame": "obj cov/f",
                    "obj_coverage_clip": "obj cov/clip", "frame_coverage": "frame cov",
                    "kept_first_frame": "kept f0", "kept_later_frames": "kept f1+"}


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


def log_to_mlflow(uri: str, experiment: str, report: dict, out_dir: Path, artifact_location: str = "mlartifacts") -> str:
    """One MLflow run per evaluation: params, one metric per row and column, the output files.
    ``artifact_location`` applies to an experiment created here (as in the training callback)."""
    import mlflow
    from stts_dist.tracking.mlflow_callback import _artifact_uri, metric_name

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=_artifact_uri(artifact_location, uri))
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"eval {Path(report['checkpoint']).name}") as run:
        mlflow.log_params({"checkpoint": report["checkpoint"], "step": report["step"], "data": report["data"],
                           "frames": report["frames"], "tts_factor": report["tts_factor"], "world_size": report["world_size"]})
        metrics = {}
        for row in report["rows"]:
            for k in ["acc", "llm_visual_tokens", "vit_patches_kept", "prefill_ms", "speedup"] + \
                     [c for c in row if c.startswith("acc/")] + [c for c in COVERAGE_COLUMNS if c in row]:
                v = row[k]
                if isinstance(v, (int, float)) and math.isfinite(v):
                    metrics[metric_name(f"{row['setting']}/{k}")] = float(v)
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(out_dir), artifact_path="eval")
        return run.info.run_id


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stts-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder, its checkpoints/ folder, one step_* folder (1 process, "
                   "ZeRO or TP x DP) or a consolidated .safetensors")
    p.add_argument("--data", default="digits", help="digits | shards:DIR | manifest:FILE.jsonl")
    p.add_argument("--ratios", default=DEFAULT_RATIOS, help="prune ratios (fraction pruned), comma-separated")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--frames", type=int, default=None, help="frames per video (default: the model's data.num_frames)")
    p.add_argument("--tts-factor", type=float, default=2.0, help="test-time scaling: k x frames at the 1x token budget "
                   "(0 or 1 = off)")
    p.add_argument("--adaptive", type=float, default=0.0, metavar="S",
                   help="also evaluate adaptive per-video budgets at strength S (0 = off; see stts/adaptive.py)")
    p.add_argument("--samples", type=int, default=0, help="evaluate the first N samples (0 = digits: data.eval_samples, "
                   "else all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=0, help="0 = longest reference answer + 1")
    p.add_argument("--out", default=None, help="output folder (default: <run>/eval/step_XXXXXXXX)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--seed", type=int, default=0, help="seed of the 'random' method")
    p.add_argument("--workers", type=int, default=0, help="shard loader workers (shards: only)")
    p.add_argument("--mlflow-uri", default=None, help="log the results to this MLflow tracking URI")
    p.add_argument("--mlflow-experiment", default="stts-eval")
    p.add_argument("--mlflow-artifact-location", default="mlartifacts",
                   help="artifact folder of an experiment created on a local store (ignored by http servers)")
    p.add_argument("--no-verify", action="store_true", help="skip the checkpoint checksum verification")
    p.add_argument("--quiet", action="store_true", help="no table on the console")
    return p


def _json_safe(value: Any) -> Any:
    """NaN (a task absent from the data) -> null: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def default_out_dir(step_dir: Path) -> Path:
    run = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir
    return run / "eval" / step_dir.name


def run_eval(argv: Optional[Sequence[str]] = None) -> dict:
    """The command without exit handling; returns the report (the same on every rank)."""
    from stts_dist.trained_model import open_trained_model

    args = build_parser().parse_args(argv)
    ratios = parse_floats(args.ratios, "--ratios")
    methods = parse_methods(args.methods)
    if args.batch_size < 1 or args.samples < 0 or (args.frames is not None and args.frames < 1):
        raise EvalError("--batch-size and --frames must be >= 1 and --samples >= 0")
    if not args.adaptive >= 0:
        raise EvalError(f"--adaptive {args.adaptive} must be >= 0 (0 = off, 1 = the training default strength)")
    rank, world, created = dist_context()
    try:
        device = resolve_device(args.device, "--device")
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        cfg, tokenizer, model, step_dir = open_trained_model(args.checkpoint, device=device, verify=not args.no_verify)
        source = make_source(args.data, cfg, args.samples, args.workers)
        G = model.budget.groups_per_frame
        notes: list[str] = []
        frames = args.frames or cfg.data.num_frames
        tts = args.tts_factor
        if source.fixed_frames:
            frames = source.frames
            if args.frames and args.frames != frames:
                notes.append(f"--frames {args.frames} ignored: the shards hold {frames} frames per video (median)")
            if tts and tts > 1:
                notes.append("test-time scaling skipped: shards hold the frames sampled at sharding time; "
                             "evaluate a manifest (manifest:FILE) to sample more frames")
                tts = 0
        check_frames = getattr(source, "min_video_frames", frames)
        settings, skipped = plan_settings(methods, ratios, check_frames, G, tts, adaptive=args.adaptive > 0)
        if check_frames != frames:
            settings = [Setting(s.method, s.prune_ratio, frames, s.kind) for s in settings]
        notes += skipped
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (
            device.type == "cuda" and cfg.train.dtype in ("auto", "bf16")) else None
        cache: dict[int, list[dict]] = {}
        warmed: set[int] = set()
        tallies = []
        evaluated = []
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
                run_setting(model, tokenizer, samples[:args.batch_size], s, args.batch_size, args.seed,
                            args.max_new_tokens, autocast)
            tallies.append(run_setting(model, tokenizer, samples, s, args.batch_size, args.seed + 7919 * rank,
                                       args.max_new_tokens, autocast,
                                       adaptive_strength=args.adaptive if s.kind == "adaptive" else None))
        settings = evaluated
        tasks = list(source.tasks)
        tallies = reduce_tallies(tallies, tasks, world)
        unknown = gather_unknown_words(tokenizer, next(iter(cache.values()), []), world)
        if unknown and unknown["unknown"]:
            notes.append(describe_unknown_words(unknown))
        for n, count in sorted(getattr(source, "short_clips", {}).items()):
            notes.append(f"{count} clip(s) on rank {rank} have fewer than {n} frames: evaluated with all their frames "
                         f"(see the frames and token columns)")
        if sum(tallies[0].total.values()) == 0:
            raise EvalError(f"no samples to evaluate in {source.name}")
        rows = summarize(settings, tallies, tasks)
        manifest = json.loads((step_dir / "manifest.json").read_text()) if (step_dir / "manifest.json").is_file() else {}
        report = {"checkpoint": str(step_dir), "step": manifest.get("step"), "data": source.name, "frames": frames,
                  "groups_per_frame": G, "tts_factor": tts, "world_size": world, "device": device.type,
                  "tasks": tasks, "rows": rows, "notes": notes, "unknown_words": unknown}
        if rank == 0:
            out = Path(args.out) if args.out else default_out_dir(step_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(_json_safe(report), indent=1))
            write_csv(rows, out / "results.csv")
            plot_accuracy_vs_tokens(rows, out / "accuracy_vs_tokens.png",
                                    f"{Path(step_dir).parent.parent.name} {step_dir.name} on {source.name}, T={frames}")
            report["outputs"] = {k: str(out / f) for k, f in (("json", "results.json"), ("csv", "results.csv"),
                                                              ("png", "accuracy_vs_tokens.png"))}
            if args.mlflow_uri:
                report["mlflow_run_id"] = log_to_mlflow(args.mlflow_uri, args.mlflow_experiment, report, out,
                                                         args.mlflow_artifact_location)
            if not args.quiet:
                print(format_table(rows, tasks))
                for n in notes:
                    print(f"note: {n}")
                print(f"prefill = median per batch of {args.batch_size} on {device.type}; speed-up vs none@0. "
                      f"Wrote {out}/results.json, results.csv, accuracy_vs_tokens.png", flush=True)
        return report
    finally:
        if created:
            import torch.distributed as dist
            dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from data_pipeline.errors import DataPipelineError
    from stts_dist.console import quiet_known_warnings
    quiet_known_warnings()
    from stts_dist.checkpoint_io import CheckpointLoadError

    try:
        run_eval(argv)
    except (EvalError, InferenceInputError, DeviceError, CheckpointLoadError, DataPipelineError) as e:
        raise SystemExit(f"stts-eval: error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())

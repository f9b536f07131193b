#!/usr/bin/env python
"""The accuracy study (issues 7 and 13) on the moving-digits QA task, end to end, resumable.

    .venv/bin/python tools/accuracy_study.py [--config jobs/study_digits.yaml] [--out runs/study]
                                             [--steps 3000] [--eval-samples 1000] [--skip-train]
                                             [--ratios 0.3,0.5,0.7,0.8] [--train-only stts50,stts80]

On 2 cores two one-thread lanes finish sooner than one two-thread run (this tiny model's step time
is per-op overhead): ``OMP_NUM_THREADS=1 ... --train-only stts50,stts80,stts50_seed1 &`` beside
``OMP_NUM_THREADS=1 ... --train-only unpruned,unpruned_seed1``, then the plain command evaluates
and summarises (finished trainings are skipped).

Stages (each skipped when its output exists, and every training resumes from its last
checkpoint, so an interrupted study continues where it stopped):
 1. train from the main job's recipe (the stage-0 digit-reading ViT is trained once by the trainer
    and cached in ``data/``): (a) unpruned (``method=none``), (b) STTS 50% pruned, (c) STTS 80%
    pruned, same steps and data order -> ``OUT/{unpruned,stts50,stts80}``; then the headline pair
    again with a second seed (``train.seed=1``: other init and data order) -> ``OUT/*_seed1``.
    Each run evaluates its own setting on the held-out clips every ``train.eval_every`` steps
    (``OUT/<model>/eval_history.jsonl``): the learning curve that says whether it converged.
    A variant is trained only when ``--train-only`` names it: ``stts50_dense_vit`` (STTS 50% with
    every ViT block on every patch, pruning before the LLM only) asks whether what STTS loses is
    lost inside the ViT; the summary compares its last evaluation with unpruned;
 2. ``stts-eval`` every seed-0 model on the same held-out clips: every method at ratios 0.3-0.8,
    test-time scaling at 2x frames with the unpruned 1x token budget, and adaptive per-video
    budgets next to the fixed ratio -> ``OUT/<model>/eval*/results.json``;
 3. a summary: convergence of every model (the last two evaluations, at least 20% of the training
    apart, within 1 point), the targets checked with standard errors, a markdown table
    (``OUT/summary.md``), one JSON (``OUT/summary.json``, also the last printed line) and a plot
    (``OUT/accuracy_study.png``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stts_dist.config import load_config  # noqa: E402
from stts_dist.train.trainer import read_eval_history  # noqa: E402
MODELS = {  # name -> training overrides; everything else comes from the study config
    "unpruned": ["model.stts.method=none", "train.eval_prune_ratios=[0.0]"],
    "stts50": ["model.stts.method=scorer", "model.stts.prune_ratio=0.5", "train.eval_prune_ratios=[0.5]"],
    "stts80": ["model.stts.method=scorer", "model.stts.prune_ratio=0.8", "train.eval_prune_ratios=[0.8]"],
}
SEED1 = {f"{name}_seed1": MODELS[name] + ["train.seed=1"] for name in ("unpruned", "stts50")}
# optional variants (trained only when named in --train-only; compared by their learning curve):
# "stts50_dense_vit" scores and biases as STTS 50% does but after the ViT's second-to-last block,
# so every ViT block runs on every patch and only the LLM reads half the tokens. Next to stts50
# and unpruned it asks whether what STTS loses is lost inside the ViT (at 3,000 steps it is not:
# the variant is below the reference, docs/stts.md row 28)
VARIANTS = {"stts50_dense_vit": MODELS["stts50"] + ["model.stts.prune_at={depth_minus_2}"]}
OWN_SETTING = {"unpruned": "none@0", "stts50": "scorer@0.5", "stts80": "scorer@0.8",
               "unpruned_seed1": "none@0", "stts50_seed1": "scorer@0.5", "stts50_dense_vit": "scorer@0.5"}
# the headline models first: a partial study already says the most
TRAIN_ORDER = ("stts50", "unpruned", "stts80", "stts50_seed1", "unpruned_seed1", *VARIANTS)
CONVERGED_WITHIN_POINTS = 1.0
CONVERGED_SPAN = 0.2          # the two evaluations compared are at least 20% of the training apart
RATIOS = "0.3,0.5,0.7,0.8"
METHODS = "scorer,random,uniform,temporal_diff,none"


def run(cmd: list[str], log: Path) -> None:
    """Run a stage, its output appended to ``log`` and echoed; a failure stops the study."""
    print(f"[study] $ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"[study] stage failed (exit {proc.returncode}); see {log}")
    print(f"[study]   done in {time.perf_counter() - t0:.0f}s (log {log})", flush=True)


def finished(run_dir: Path, steps: int) -> bool:
    return (run_dir / "checkpoints" / f"step_{steps:08d}").is_dir()


def training_overrides(cfg) -> dict[str, list[str]]:
    """Every trainable model's overrides of the study config ``cfg`` (variants filled in from its
    ViT)."""
    depth = cfg.model.vit.depth
    variants = {name: [o.format(depth_minus_2=depth - 2) for o in ov] for name, ov in VARIANTS.items()}
    return {**MODELS, **SEED1, **variants}


def stage_train(args, py: str, out: Path, names) -> None:
    overrides = training_overrides(args.study_config)
    for name in names:
        if finished(out / name, args.steps):
            continue
        # the same command again resumes from the run's last checkpoint
        run([py, "-m", "stts_dist.train", "--config", args.config, f"train.out_dir={out / name}",
             f"train.steps={args.steps}", f"train.eval_every={args.eval_every}", "train.progress_bar=false",
             "tracking.enabled=false", *overrides[name]], out / f"{name}.log")


def convergence(out: Path, name: str, steps: int) -> dict:
    """The model's own setting on the held-out clips along training, and whether it converged:
    the final evaluation and the latest one at least ``CONVERGED_SPAN`` of the training earlier
    differ by at most ``CONVERGED_WITHIN_POINTS``."""
    tag = OWN_SETTING[name]
    curve = {step: 100 * row[f"eval/{tag}/acc"] for step, row in read_eval_history(out / name).items()
             if f"eval/{tag}/acc" in row}
    final = curve.get(steps)
    earlier = [s for s in curve if s <= steps * (1 - CONVERGED_SPAN)]
    if final is None or not earlier:
        return {"setting": tag, "curve": curve, "converged": False, "last_change_points": None}
    change = final - curve[max(earlier)]
    return {"setting": tag, "curve": curve, "final": final, "compared_with_step": max(earlier),
            "last_change_points": change, "converged": abs(change) <= CONVERGED_WITHIN_POINTS}


def stage_eval(args, py: str, out: Path) -> None:
    common = ["--samples", str(args.eval_samples), "--quiet", "--batch-size", "32"]
    for name in MODELS:
        ckpt = out / name / "checkpoints" / f"step_{args.steps:08d}"
        target = out / name / "eval"
        if not (target / "results.json").is_file():
            run([py, "-m", "stts_dist.eval", "--checkpoint", str(ckpt), "--ratios", args.ratios, "--methods", METHODS,
                 "--tts-factor", "2", "--out", str(target), *common], out / f"{name}.eval.log")
        target = out / name / "eval_adaptive"
        if not (target / "results.json").is_file():
            run([py, "-m", "stts_dist.eval", "--checkpoint", str(ckpt), "--ratios", args.ratios,
                 "--methods", "scorer,temporal_diff", "--tts-factor", "0", "--adaptive", "1", "--out", str(target),
                 *common], out / f"{name}.eval.log")


def load_rows(path: Path) -> dict[str, dict]:
    return {r["setting"]: r for r in json.loads(path.read_text())["rows"]}


def standard_error(acc_points: float, n: int) -> float:
    """Standard error, in points, of an accuracy (in points) measured on ``n`` clips."""
    p = acc_points / 100
    return 100 * (p * (1 - p) / max(n, 1)) ** 0.5


def summarize(out: Path, steps: int) -> dict:
    ev = {name: load_rows(out / name / "eval" / "results.json") for name in MODELS}
    ad = {name: load_rows(out / name / "eval_adaptive" / "results.json") for name in MODELS}
    acc = lambda model, setting: 100 * ev[model][setting]["acc"]          # noqa: E731
    unpruned = acc("unpruned", "none@0")
    tts_label = next(k for k in ev["stts50"] if k.startswith("scorer@") and "tts" in k)
    res = {
        "unpruned_acc": unpruned,
        "stts50_acc": acc("stts50", "scorer@0.5"),
        "stts80_acc": acc("stts80", "scorer@0.8"),
        "stts50_minus_unpruned": acc("stts50", "scorer@0.5") - unpruned,
        "stts80_minus_random": acc("stts80", "scorer@0.8") - acc("stts80", "random@0.8"),
        "stts80_minus_uniform": acc("stts80", "scorer@0.8") - acc("stts80", "uniform@0.8"),
        "stts80_minus_random_on_unpruned_model": acc("stts80", "scorer@0.8") - acc("unpruned", "random@0.8"),
        "stts80_minus_uniform_on_unpruned_model": acc("stts80", "scorer@0.8") - acc("unpruned", "uniform@0.8"),
        "tts_setting": tts_label,
        "tts_acc": acc("stts50", tts_label),
        "tts_minus_unpruned": acc("stts50", tts_label) - unpruned,
        "adaptive_minus_fixed_stts50": 100 * (ad["stts50"]["scorer@0.5 adaptive"]["acc"] - ad["stts50"]["scorer@0.5"]["acc"]),
        "adaptive_minus_fixed_stts80": 100 * (ad["stts80"]["scorer@0.8 adaptive"]["acc"] - ad["stts80"]["scorer@0.8"]["acc"]),
        "eval_samples": ev["unpruned"]["none@0"]["n"],
        # prefill time does not depend on the weights: the first evaluation (the unpruned model's,
        # nothing else running yet on a shared machine) gives each method's speed-up per ratio
        "prefill_speedup": {m: {f"{row['prune_ratio']:g}": row["speedup"] for row in ev["unpruned"].values()
                                if row["method"] == m and row["kind"] == "sweep"}
                            for m in ("scorer", "random", "uniform", "temporal_diff")},
    }
    n = res["eval_samples"]
    res["standard_error_points"] = {k: standard_error(res[k], n) for k in ("unpruned_acc", "stts50_acc", "stts80_acc")}
    # a difference of two accuracies on the same clips: at most sqrt(2) x one standard error
    res["difference_standard_error_points"] = 2 ** 0.5 * standard_error(res["unpruned_acc"], n)
    res["convergence"] = {name: convergence(out, name, steps) for name in TRAIN_ORDER
                          if name not in VARIANTS or (out / name).is_dir()}
    res["all_converged"] = all(c["converged"] for c in res["convergence"].values())
    seed1 = res["convergence"]
    if seed1["stts50_seed1"].get("final") is not None and seed1["unpruned_seed1"].get("final") is not None:
        res["stts50_minus_unpruned_seed1"] = seed1["stts50_seed1"]["final"] - seed1["unpruned_seed1"]["final"]
        res["stts50_minus_unpruned_mean_of_seeds"] = (res["stts50_minus_unpruned"] + res["stts50_minus_unpruned_seed1"]) / 2
    for name in VARIANTS:               # a variant's own setting at its last evaluation, vs unpruned
        final = res["convergence"].get(name, {}).get("final")
        if final is not None:
            res[f"{name}_acc"] = final
            res[f"{name}_minus_unpruned"] = final - unpruned
    res["targets"] = {
        "stts50_within_0.7pt": res["stts50_minus_unpruned"] >= -0.7,
        "stts80_beats_random_uniform_by_2pt": min(res["stts80_minus_random"], res["stts80_minus_uniform"]) >= 2.0,
        "tts_at_least_unpruned": res["tts_minus_unpruned"] >= 0.0,
    }
    lines = ["| model | setting | LLM tokens | accuracy | " + " | ".join(
        k.split("/")[1] for k in ev["unpruned"]["none@0"] if k.startswith("acc/")) + " | prefill speed-up |",
        "|---|---|---:|---:|" + "---:|" * (sum(k.startswith("acc/") for k in ev["unpruned"]["none@0"]) + 1)]
    for name in MODELS:
        for row in list(ev[name].values()) + [r for r in ad[name].values() if r["kind"] == "adaptive"]:
            tasks = " | ".join(f"{100 * v:.1f}" if v == v else "-" for k, v in row.items() if k.startswith("acc/"))
            lines.append(f"| {name} | {row['setting']} | {row['llm_visual_tokens']:.1f} | {100 * row['acc']:.1f} | "
                         f"{tasks} | {row['speedup']:.2f}x |")
    lines += ["", "| model | setting | " + " | ".join(f"step {k}" for k in res["convergence"]["unpruned"]["curve"])
              + " | last change (points) | converged |", "|---|---|" + "---:|" * (len(res["convergence"]["unpruned"]["curve"]) + 2)]
    for name, c in res["convergence"].items():
        change = c["last_change_points"]
        lines.append(f"| {name} | {c['setting']} | " + " | ".join(f"{v:.1f}" for v in c["curve"].values())
                     + f" | {'-' if change is None else f'{change:+.1f}'} | {'yes' if c['converged'] else 'no'} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(ev, ad, out / "accuracy_study.png")
    (out / "summary.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def plot(ev: dict, ad: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ev), figsize=(15, 4.4), dpi=100, sharey=True)
    for ax, (name, rows) in zip(axes, ev.items()):
        base = rows["none@0"]
        for method, style in (("scorer", "o-"), ("temporal_diff", "s-"), ("random", "^-"), ("uniform", "v-")):
            pts = sorted([(r["llm_visual_tokens"], 100 * r["acc"]) for r in rows.values()
                          if r["method"] == method and r["kind"] == "sweep"] + [(base["llm_visual_tokens"], 100 * base["acc"])])
            ax.plot(*zip(*pts), style, label=method)
            for r in rows.values():
                if r["method"] == method and r["kind"] == "tts":
                    ax.plot(r["llm_visual_tokens"], 100 * r["acc"], "*", ms=12, color=ax.lines[-1].get_color())
        pts = sorted((r["llm_visual_tokens"], 100 * r["acc"]) for r in ad[name].values()
                     if r["method"] == "scorer" and r["kind"] == "adaptive")
        if pts:
            ax.plot(*zip(*pts), "x--", color="k", label="scorer, adaptive budgets")
        ax.set_title(f"trained {name}; stars: 2x frames at the 1x budget", fontsize=9)
        ax.set_xlabel("LLM visual tokens per video")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/study_digits.yaml")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--steps", type=int, default=None, help="QA training steps of every model (default: the config's)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="held-out evaluation interval, the learning curve (default: the config's)")
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--skip-train", action="store_true", help="only evaluate and summarise existing runs")
    p.add_argument("--ratios", default=RATIOS, help="pruning ratios of the sweeps (the targets are at 0.5 and 0.8)")
    p.add_argument("--train-only", default="",
                   help="comma-separated models to train (in this order), then stop: one lane of a study split "
                        f"over processes; models: {', '.join(TRAIN_ORDER)}")
    p.add_argument("--curves", action="store_true",
                   help="only print each trained model's learning curve and convergence (JSON), e.g. mid-study")
    args = p.parse_args(argv)
    args.study_config = load_config(ROOT / args.config)
    args.steps = args.steps or args.study_config.train.steps
    args.eval_every = args.eval_every or args.study_config.train.eval_every
    lane = [n.strip() for n in args.train_only.split(",") if n.strip()]
    unknown = [n for n in lane if n not in TRAIN_ORDER]
    if unknown:
        p.error(f"--train-only {args.train_only}: unknown {unknown}; the models are {', '.join(TRAIN_ORDER)}")
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.curves:
        curves = {name: convergence(out, name, args.steps) for name in TRAIN_ORDER if (out / name).is_dir()}
        for name, c in curves.items():
            n = args.eval_samples
            final = c.get("final")
            se = f" +- {standard_error(final, n):.1f}" if final is not None else ""
            print(f"{name:16s} {c['setting']:11s} " + "  ".join(f"{k}: {v:.1f}" for k, v in c["curve"].items())
                  + (f"  | final {final:.1f}{se}, change {c['last_change_points']:+.1f} -> "
                     f"{'converged' if c['converged'] else 'NOT converged'}" if final is not None else "  | running"))
        print(json.dumps(curves))
        return 0
    py = sys.executable
    os.environ.setdefault("MALLOC_MMAP_MAX_", "0")   # see ../shared/docs/perf-notes.md
    t0 = time.perf_counter()
    if lane:
        stage_train(args, py, out, lane)
        return 0
    if not args.skip_train:        # the three models, their sweeps, then the second seed of the pair
        stage_train(args, py, out, [n for n in TRAIN_ORDER if n in MODELS])
    stage_eval(args, py, out)
    if not args.skip_train:
        stage_train(args, py, out, [n for n in TRAIN_ORDER if n in SEED1])
    res = summarize(out, args.steps)
    res["study_seconds_this_invocation"] = time.perf_counter() - t0
    print((out / "summary.md").read_text())
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The accuracy study (issue 7) on the moving-digits QA task, end to end, resumable.

    .venv/bin/python tools/accuracy_study.py [--config jobs/study_digits.yaml] [--out runs/study]
                                             [--eval-samples 1000] [--skip-train]

Stages (each skipped when its output exists, so an interrupted study continues):
 0. pre-train the ViT to read digits (``stts_dist.train.vit_pretrain``; the stand-in for the
    pre-trained SigLIP of the paper) -> ``OUT/vit_digits``;
 1. train three models from it, same steps, same data order: (a) unpruned (``method=none``),
    (b) STTS 50% pruned, (c) STTS 80% pruned -> ``OUT/{unpruned,stts50,stts80}``;
 2. ``stts-eval`` every model on the same held-out clips: every method at ratios 0.3-0.8,
    test-time scaling at 2x frames with the unpruned 1x token budget, and adaptive per-video
    budgets next to the fixed ratio -> ``OUT/<model>/eval*/results.json``;
 3. a summary: the targets of issue 7 checked, a markdown table (``OUT/summary.md``), one JSON
    (``OUT/summary.json``, also the last printed line) and a plot (``OUT/accuracy_study.png``).
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
MODELS = {  # name -> training overrides; everything else comes from the study config
    "unpruned": ["model.stts.method=none"],
    "stts50": ["model.stts.method=scorer", "model.stts.prune_ratio=0.5"],
    "stts80": ["model.stts.method=scorer", "model.stts.prune_ratio=0.8"],
}
TRAIN_ORDER = ("stts50", "unpruned", "stts80")
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


def stage_train(args, py: str, out: Path) -> None:
    vit = out / "vit_digits"
    if not (vit / "config.json").is_file():
        run([py, "-m", "stts_dist.train.vit_pretrain", "--config", args.config, "--out", str(vit),
             "--steps", str(args.vit_steps)], out / "vit_digits.log")
    for name in TRAIN_ORDER:   # the headline model first: a partial study already says the most
        overrides = MODELS[name]
        if finished(out / name, args.steps):
            continue
        run([py, "-m", "stts_dist.train", "--config", args.config, f"train.out_dir={out / name}",
             f"train.steps={args.steps}", f"model.pretrained.vit_path={vit}", "train.progress_bar=false",
             "tracking.enabled=false", *overrides], out / f"{name}.log")


def stage_eval(args, py: str, out: Path) -> None:
    common = ["--samples", str(args.eval_samples), "--quiet", "--batch-size", "32"]
    for name in MODELS:
        ckpt = out / name / "checkpoints" / f"step_{args.steps:08d}"
        target = out / name / "eval"
        if not (target / "results.json").is_file():
            run([py, "-m", "stts_dist.eval", "--checkpoint", str(ckpt), "--ratios", RATIOS, "--methods", METHODS,
                 "--tts-factor", "2", "--out", str(target), *common], out / f"{name}.eval.log")
        target = out / name / "eval_adaptive"
        if not (target / "results.json").is_file():
            run([py, "-m", "stts_dist.eval", "--checkpoint", str(ckpt), "--ratios", RATIOS,
                 "--methods", "scorer,temporal_diff", "--tts-factor", "0", "--adaptive", "1", "--out", str(target),
                 *common], out / f"{name}.eval.log")


def load_rows(path: Path) -> dict[str, dict]:
    return {r["setting"]: r for r in json.loads(path.read_text())["rows"]}


def summarize(out: Path) -> dict:
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
        "prefill_speedup": {m: {f"{r:g}": ev["unpruned"][f"{m}@{r:g}"]["speedup"] for r in (0.3, 0.5, 0.7, 0.8)}
                            for m in ("scorer", "random", "uniform", "temporal_diff")},
    }
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
    p.add_argument("--steps", type=int, default=1500, help="QA training steps of every model")
    p.add_argument("--vit-steps", type=int, default=2000, help="ViT digit pre-training steps")
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--skip-train", action="store_true", help="only evaluate and summarise existing runs")
    args = p.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    os.environ.setdefault("MALLOC_MMAP_MAX_", "0")   # see ../shared/docs/perf-notes.md
    t0 = time.perf_counter()
    if not args.skip_train:
        stage_train(args, py, out)
    stage_eval(args, py, out)
    res = summarize(out)
    res["study_seconds_this_invocation"] = time.perf_counter() - t0
    print((out / "summary.md").read_text())
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

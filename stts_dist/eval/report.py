"""What ``stts-eval`` shows and writes: the console table, ``results.json`` / ``results.csv``,
the accuracy-vs-tokens plot, and the params and metrics it hands to experiment tracking
(``stts_dist/tracking/``; this module imports no tracker)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

from stts_dist.plots import plot_accuracy_vs_tokens

# object-coverage columns of the console table (stts_dist/object_coverage.py), ratios shown in %
COVERAGE_COLUMNS = {"obj_recall": "obj R", "obj_precision": "obj P", "obj_coverage_frame": "obj cov/f",
                    "obj_coverage_clip": "obj cov/clip", "frame_coverage": "frame cov",
                    "kept_first_frame": "kept f0", "kept_later_frames": "kept f1+"}
# the columns of every row logged as metrics (with acc/<task> and the coverage columns present)
TRACKED_COLUMNS = ("acc", "llm_visual_tokens", "vit_patches_kept", "prefill_ms", "speedup")
OUTPUT_FILES = (("json", "results.json"), ("csv", "results.csv"), ("png", "accuracy_vs_tokens.png"))


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


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


def json_safe(value: Any) -> Any:
    """NaN (a task absent from the data) -> null: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def default_out_dir(step_dir: Path) -> Path:
    run = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir
    return run / "eval" / step_dir.name


def write_outputs(report: dict, out: Path) -> dict[str, str]:
    """results.json, results.csv and accuracy_vs_tokens.png into ``out``; returns their paths."""
    step_dir = Path(report["checkpoint"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(json_safe(report), indent=1))
    write_csv(report["rows"], out / "results.csv")
    plot_accuracy_vs_tokens(report["rows"], out / "accuracy_vs_tokens.png",
                            f"{step_dir.parent.parent.name} {step_dir.name} on {report['data']}, T={report['frames']}")
    return {k: str(out / f) for k, f in OUTPUT_FILES}


def print_report(report: dict, out: Path, batch_size: int) -> None:
    print(format_table(report["rows"], report["tasks"]))
    for n in report["notes"]:
        print(f"note: {n}")
    print(f"prefill = median per batch of {batch_size} on {report['device']}; speed-up vs none@0. "
          f"Wrote {out}/results.json, results.csv, accuracy_vs_tokens.png", flush=True)


def tracked_params(report: dict) -> dict[str, Any]:
    return {k: report[k] for k in ("checkpoint", "step", "data", "frames", "tts_factor", "world_size")}


def tracked_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """``<setting>/<column>`` -> value for every finite number of the tracked columns."""
    metrics = {}
    for row in rows:
        for k in list(TRACKED_COLUMNS) + [c for c in row if c.startswith("acc/")] + \
                [c for c in COVERAGE_COLUMNS if c in row]:
            v = row[k]
            if isinstance(v, (int, float)) and math.isfinite(v):
                metrics[f"{row['setting']}/{k}"] = float(v)
    return metrics


def log_to_mlflow(uri: str, experiment: str, report: dict, out_dir: Path, artifact_location: str = "mlartifacts") -> str:
    """One MLflow run per evaluation (``stts_dist/tracking/mlflow_results.py``): params, one metric
    per row and column, the output files under ``eval/``. ``artifact_location`` applies to an
    experiment created here (as in the training callback). Returns the run id."""
    from stts_dist.tracking.mlflow_results import log_results_run

    return log_results_run(uri, experiment, run_name=f"eval {Path(report['checkpoint']).name}",
                           params=tracked_params(report), metrics=tracked_metrics(report["rows"]),
                           artifacts_dir=out_dir, artifact_path="eval", artifact_location=artifact_location)

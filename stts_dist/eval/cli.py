"""``stts-eval``: accuracy, token counts and prefill speed of a checkpoint over a pruning sweep.

The command line: the options and their checks, then the order of the work: every rank plans and
runs the settings (``run.evaluate``); rank 0 writes the files, logs to MLflow and prints the
table (``report``). The options and outputs are described in ``stts_dist/eval/__init__.py`` and
docs/evaluation.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from stts_dist.device import DeviceError
from stts_dist.eval.report import default_out_dir, log_to_mlflow, print_report, write_outputs
from stts_dist.eval.run import dist_context, evaluate
from stts_dist.eval.settings import DEFAULT_METHODS, DEFAULT_RATIOS, parse_floats, parse_methods
from stts_dist.heldout import EvalError
from stts_dist.infer import InferenceInputError
from stts_dist.stts.selection import METHODS


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


def run_eval(argv: Optional[Sequence[str]] = None) -> dict:
    """The command without exit handling; returns the report (the same on every rank)."""
    args = build_parser().parse_args(argv)
    ratios = parse_floats(args.ratios, "--ratios")
    methods = parse_methods(args.methods)
    if args.batch_size < 1 or args.samples < 0 or (args.frames is not None and args.frames < 1):
        raise EvalError("--batch-size and --frames must be >= 1 and --samples >= 0")
    if not args.adaptive >= 0:
        raise EvalError(f"--adaptive {args.adaptive} must be >= 0 (0 = off, 1 = the training default strength)")
    rank, world, created = dist_context()
    try:
        report = evaluate(args, methods, ratios, rank, world)
        if rank == 0:
            out = Path(args.out) if args.out else default_out_dir(Path(report["checkpoint"]))
            report["outputs"] = write_outputs(report, out)
            if args.mlflow_uri:
                report["mlflow_run_id"] = log_to_mlflow(args.mlflow_uri, args.mlflow_experiment, report, out,
                                                         args.mlflow_artifact_location)
            if not args.quiet:
                print_report(report, out, args.batch_size)
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

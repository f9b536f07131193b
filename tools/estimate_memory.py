"""Will a run fit? Parameters, per-GPU memory and FLOPs of a run config, from the config alone.

    python tools/estimate_memory.py --config jobs/train_7b.yaml --nodes 4 [key=value ...]

Exits 1 with a message when the estimate (pruned as configured) exceeds --gpu-mem-gb, 2 on a
bad config. The formulas and their assumptions are in stts_dist/estimate.py and docs/launch.md.
"""
from __future__ import annotations

import argparse
import sys

from stts_dist.config import ConfigError, load_config
from stts_dist.estimate import Cluster, Workload, estimate, format_report, over_budget_message, plan_from_config


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="run config (YAML under jobs/)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes of the run (default 1)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one GPU (default 80)")
    ap.add_argument("--overhead-gb", type=float, default=5.0,
                    help="per-GPU memory outside the formulas: CUDA context, NCCL buffers, fragmentation (default 5)")
    ap.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample around the visual ones")
    ap.add_argument("--answer-tokens", type=int, default=8, help="labelled (answer) tokens per sample")
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="check the fit with full activation checkpointing (both are printed)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.tensor_parallel=2")
    return ap.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_mem_gb, args.overhead_gb)
        plan = plan_from_config(cfg, cluster)
        est = estimate(cfg, plan, cluster, Workload(args.text_tokens, args.answer_tokens),
                       checkpointing=args.activation_checkpointing)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(est, cfg))
    if not est.fits:
        print(f"\nerror: {over_budget_message(est)}", file=sys.stderr)
        return 1
    print(f"\nfits: {est.total_bytes(True) / 1e9:.1f} of {cluster.gpu_mem_gb:g} GB per GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())

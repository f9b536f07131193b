"""Merge a distributed (DeepSpeed ZeRO x megatron TP) checkpoint into one plain fp32 safetensors file.

    .venv/bin/python tools/consolidate_checkpoint.py runs/x/checkpoints/step_00000300 --out export/model.safetensors

CKPT_DIR may be a step folder, its ``checkpoints/`` folder or the run folder (the newest verified
checkpoint is taken). The output has exactly the keys and shapes of the single-process
``VideoVLM`` (``build_model(cfg.model, tokenizer).state_dict()``); ``config.yaml`` and
``tokenizer.json`` are copied next to it, and ``stts_dist.distributed.consolidate.load_consolidated``
reads the three back. Runs in one plain process: no process group, no GPU. The whole model is held
in memory once in fp32 (4 bytes per parameter), plus the memory-mapped DeepSpeed files.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="step folder, checkpoints/ folder or run folder written by stts-train")
    ap.add_argument("--out", required=True, help="output .safetensors file (config.yaml/tokenizer.json go beside it)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the manifest's sha256 check (only for a checkpoint you know is intact)")
    args = ap.parse_args(argv)

    from stts_dist.distributed.consolidate import consolidate, save_consolidated
    from stts_dist.checkpoint import CheckpointError

    t0 = time.perf_counter()
    try:
        result = consolidate(args.checkpoint, verify=not args.no_verify)
        out = save_consolidated(result, args.checkpoint, args.out, overwrite=args.overwrite)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in result.state_dict.values())
    print(f"[consolidate] step {result.step}: TP={result.tensor_parallel} x DP={result.data_parallel} "
          f"ZeRO-{result.zero_stage} -> {out} ({len(result.state_dict)} tensors, {n / 1e6:.2f}M values, "
          f"replicated tensors differ across TP ranks by at most {result.replicated_max_diff:.3g}) "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Losses of a fixed-seed short run in three layouts, to prove a refactor changed nothing.

    .venv/bin/python tools/loss_fingerprint.py [--config jobs/tiny_dist.yaml] [--steps 6] [key=value ...]

Runs the real trainer (``stts_dist.train.trainer.Trainer``) for ``--steps`` steps, same config and
seed, as 1 process (local engine), 2 ranks ZeRO-3 DP=2 and 4 ranks TP=2 x DP=2 (torchrun, gloo, one
thread per rank), and prints one JSON line: every step's loss, LM loss and scorer loss per layout
at full float precision. Run it before and after a change (e.g. in a ``git worktree`` of the old
commit) and compare the lines; ``docs/architecture.md`` records one such comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {  # name: (ranks, tensor_parallel, engine)
    "one_process": (1, 1, "local"),
    "zero3_dp2": (2, 1, "deepspeed"),
    "tp2_dp2": (4, 2, "deepspeed"),
}


def _worker(out_json: str, config: str, overrides: list[str]) -> int:
    sys.path.insert(0, str(REPO))
    from stts_dist.config import load_config
    from stts_dist.train.trainer import Trainer

    class Recorder:
        def __init__(self):
            self.rows = []

        def on_step_end(self, trainer, step: int, metrics: dict) -> None:
            self.rows.append({"step": step, "loss": metrics["loss"], "lm_loss": metrics["lm_loss"],
                              "aux_loss": metrics["aux_loss"]})

    recorder = Recorder()
    trainer = Trainer(load_config(config, overrides), callbacks=[recorder])
    trainer.fit()
    if trainer.is_rank0:
        Path(out_json).write_text(json.dumps(recorder.rows))
    close = getattr(trainer, "close", None)
    if close is not None:
        close()
    return 0


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return _worker(sys.argv[2], sys.argv[3], sys.argv[4:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="jobs/tiny_dist.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    result: dict = {"config": args.config, "steps": args.steps, "overrides": args.overrides}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (ranks, tp, engine) in LAYOUTS.items():
            out = Path(tmp) / f"{name}.json"
            ov = [f"train.steps={args.steps}", f"train.out_dir={tmp}/{name}", "train.resume=false",
                  "tracking.enabled=false", "train.save_every=0", f"parallel.tensor_parallel={tp}",
                  f"parallel.engine={engine}", "train.eval_prune_ratios=[]", *args.overrides]
            script = [str(Path(__file__).resolve()), "--worker", str(out), args.config, *ov]
            if ranks == 1:
                cmd = [sys.executable, *script]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                       *script]
            env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode and not out.is_file():
                print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name}: exit {done.returncode}")
            if done.returncode:      # trained and recorded, failed on the way out (older commits: SIGABRT at exit)
                result[f"{name}_exit_code"] = done.returncode
            result[name] = json.loads(out.read_text())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

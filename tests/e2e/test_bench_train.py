"""tools/bench_train.py: the whole trainer (torchrun -m stts_dist.train, ZeRO-3 over gloo) pruned
vs unpruned, with the per-step phase times of stts_dist/train/phase_timer.py. No timing
assertions beyond positivity: the machine may be shared. The summaries' arithmetic (allocator
comparison, twice the frames, balancer off vs on) is checked from known rows in
tests/unit/test_phase_timer.py."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "bench_train.py"
PHASES = ("loader", "forward", "backward", "optimizer", "comm", "logging", "other")


def run_tool(tmp_path: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(TOOL), "--config", "jobs/tiny_dist.yaml", "--keep", str(tmp_path / "runs"),
           "--run-timeout", "300", *args, *tiny_overrides(**{"data.eval_samples": 2})]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_shares(shares: dict) -> None:
    assert set(shares) == set(PHASES)
    assert all(v >= 0 or abs(v) < 1e-3 for v in shares.values()), shares   # "other" is a residual
    assert math.isclose(sum(shares.values()), 1.0, abs_tol=1e-3), shares
    assert shares["forward"] > 0 and shares["backward"] > 0 and shares["optimizer"] > 0


@pytest.mark.slow
def test_pruned_vs_unpruned_two_ranks(tmp_path):
    out = run_tool(tmp_path, "--nproc", "2", "--steps", "2", "--warmup", "1", "--rounds", "1")
    assert out["mode"] == "pruned_vs_unpruned"
    assert out["world_size"] == 2 and out["nproc"] == 2
    assert out["frames"] == 4 and out["steps"] == 2
    for tag in ("unpruned", "pruned"):
        for stat in ("median", "min", "max"):
            assert out[f"step_s_{tag}_{stat}"] > 0
        assert out[f"step_s_{tag}_min"] <= out[f"step_s_{tag}_median"] <= out[f"step_s_{tag}_max"]
        assert out[f"trainer_step_time_s_{tag}"] > 0
        check_shares(out[f"phase_shares_{tag}"])
        # 2 ranks under ZeRO-3: parameters are gathered every step
        assert out[f"phase_s_{tag}"]["comm"] > 0
    assert out["train_speedup_e2e"] > 0 and out["train_speedup_e2e_paired"] > 0
    assert out["flop_ideal_speedup"] > 1.0            # prune_ratio 0.5 removes FLOPs
    assert "train_speedup_e2e_2x" not in out          # --double-frames not given
    # every run's per-step phases are in its train_log.jsonl (rank 0)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "r0_pruned" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]      # stopped after warm-up + measured steps
    assert all(r["phase/ranks"] == 2 and r["phase/wall_s"] > 0 for r in rows)
    assert not (tmp_path / "runs" / "r0_pruned" / "checkpoints").exists()

"""tools/bench_train.py: the whole trainer (torchrun -m stts_dist.train, ZeRO-3 over gloo) pruned
vs unpruned and balancer off vs on, with the per-step phase times of stts_dist/train/phase_timer.py.
No timing assertions beyond positivity: the machine may be shared."""
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


@pytest.mark.slow
def test_variable_length_balancer_on_off(tmp_path):
    out = run_tool(tmp_path, "--nproc", "2", "--steps", "1", "--warmup", "1", "--rounds", "1",
                   "--variable-length", "--min-frames", "2", "--frames", "6")
    assert out["mode"] == "variable_length" and out["world_size"] == 2
    assert out["frames"] == 6 and out["min_frames"] == 2
    for tag in ("balance_off", "balance_on"):
        assert out[f"step_s_{tag}_median"] > 0
        check_shares(out[f"phase_shares_{tag}"])
        assert out[f"wait_s_max_rank_{tag}"] >= out[f"wait_s_min_rank_{tag}"] >= 0
    assert "balance_stats_balance_off" not in out     # no balancer, no balance/* metrics
    stats = out["balance_stats_balance_on"]
    assert stats["cost_imbalance"] >= 1.0 and stats["samples"] > 0
    assert out["balancer_speedup"] > 0


def test_phase_timer_exclusive_nesting(monkeypatch):
    """A phase nested in another (comm inside forward) pauses it; the phases tile the window."""
    from stts_dist.train.phase_timer import PHASES as TIMER_PHASES
    from stts_dist.train.phase_timer import PhaseTimer

    assert TIMER_PHASES == PHASES
    clock = iter([0.0, 1.0, 2.0, 2.5, 4.0, 4.25, 5.0, 6.0, 6.5, 8.0])
    monkeypatch.setattr(PhaseTimer, "_now", lambda self: next(clock))
    t = PhaseTimer(enabled=True)
    batches = t.timed_batches(iter(["b"]))
    assert next(batches) == "b"                       # window starts at 0; loader 1 -> 2
    with t.phase("forward"):                          # 2.5 -> 5
        with t.phase("comm"):                         # 4 -> 4.25, paused forward
            pass
    with t.phase("optimizer"):                        # 6 -> 6.5
        pass
    m = t.collect()                                   # window ends at 8
    assert m["phase/loader_s"] == 1.0 and m["phase/comm_s"] == 0.25 and m["phase/optimizer_s"] == 0.5
    assert m["phase/forward_s"] == 2.25
    assert m["phase/wall_s"] == 8.0 and m["phase/ranks"] == 1.0
    assert m["phase/other_s"] == 8.0 - 1.0 - 2.25 - 0.25 - 0.5
    assert math.isclose(sum(m[f"phase/{p}_s"] for p in PHASES), 8.0)
    assert m["phase/comm_s_max"] == m["phase/comm_s_min"] == 0.25


def test_phase_timer_off_is_inert():
    from stts_dist.train.phase_timer import PhaseTimer
    t = PhaseTimer(enabled=False)
    it = iter([1, 2])
    assert t.timed_batches(it) is it
    with t.phase("forward"):
        pass
    assert t.collect() == {} and t.totals == {}


def test_host_memory_comparison_keys_and_ratios_from_known_step_times(tmp_path, monkeypatch):
    """--compare-host-memory --double-frames: every (frames, allocator) pair is run and keyed, and
    the ratios are the medians' quotients. ``launch`` is replaced by one that writes a train_log
    with known step times per setting, so the arithmetic is checked without training."""
    sys.path.insert(0, str(REPO / "tools"))
    import bench_train

    # step seconds by (method, frames, keeps freed memory)
    seconds = {("none", 4, True): 8.0, ("scorer", 4, True): 4.0, ("none", 4, False): 12.0, ("scorer", 4, False): 5.0,
               ("none", 8, True): 16.0, ("scorer", 8, True): 7.0, ("none", 8, False): 20.0, ("scorer", 8, False): 8.0}
    launched = []

    def fake_launch(args, out_dir, overrides):
        kv = dict(o.split("=", 1) for o in overrides)
        key = (kv["model.stts.method"], int(kv["data.num_frames"]), kv.get("train.keep_freed_host_memory") != "false")
        launched.append(key)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = [{"step": s, "step_time": seconds[key], "phase/wall_s": seconds[key], "phase/ranks": 2,
                 **{f"phase/{p}_s": seconds[key] / len(PHASES) for p in PHASES}} for s in range(1, 4)]
        (out_dir / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        return out_dir / "train_log.jsonl"

    monkeypatch.setattr(bench_train, "launch", fake_launch)
    monkeypatch.setattr(bench_train, "flop_ideal", lambda args, frame_counts, method: [1.5, 2.0][:len(frame_counts)])
    args = bench_train.parse_args(["--config", "jobs/tiny_dist.yaml", "--steps", "2", "--warmup", "1", "--rounds", "2",
                                   "--double-frames", "--compare-host-memory", *tiny_overrides()])
    out = bench_train.bench_pruning(args, tmp_path)
    assert sorted(set(launched)) == sorted(seconds) and len(launched) == 16       # 8 settings x 2 rounds
    assert out["train_speedup_e2e"] == 2.0 and out["ratio_of_ideal"] == pytest.approx(2.0 / 1.5)
    assert out["train_speedup_e2e_glibc_default"] == 12.0 / 5.0
    assert out["train_speedup_e2e_2x"] == 16.0 / 7.0 and out["flop_ideal_speedup_2x"] == 2.0
    assert out["train_speedup_e2e_2x_glibc_default"] == 20.0 / 8.0 and out["frames_2x"] == 8
    assert out["host_memory_speedup_unpruned"] == 12.0 / 8.0 and out["host_memory_speedup_pruned"] == 5.0 / 4.0
    assert out["host_memory_speedup_unpruned_2x"] == 20.0 / 16.0 and out["host_memory_speedup_pruned_2x"] == 8.0 / 7.0

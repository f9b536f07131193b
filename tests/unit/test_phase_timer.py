"""The phase timer of stts_dist/train/phase_timer.py (what tools/bench_train.py reads from each
step's train_log.jsonl row) and bench_train's summary arithmetic, without training."""
import json
import math
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
PHASES = ("loader", "forward", "backward", "optimizer", "comm", "logging", "other")


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


def test_variable_length_summary_from_known_rank_waits(tmp_path, monkeypatch):
    """--variable-length: balancer off vs on, the per-setting waits of the most / least waiting
    rank (phase/comm_s_max / _min) and the balancer's balance/* medians, from train_log rows with
    known values (the real 2-rank runs behind these rows: tests/multiprocess/test_balanced_training.py
    for the balancer, tests/e2e/test_bench_train.py for the tool's real torchrun plumbing)."""
    sys.path.insert(0, str(REPO / "tools"))
    import bench_train

    step_s = {"false": 8.0, "true": 6.0}
    wait_max = {"false": 2.0, "true": 0.5}

    def fake_launch(args, out_dir, overrides):
        kv = dict(o.split("=", 1) for o in overrides)
        assert kv["data.min_frames"] == "2" and kv["data.num_frames"] == "6"
        on = kv["balance.enabled"]
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for step in range(1, 3):
            row = {"step": step, "step_time": step_s[on], "phase/wall_s": step_s[on], "phase/ranks": 2,
                   "phase/comm_s_max": wait_max[on], "phase/comm_s_min": 0.25, "phase/loader_s_max": 0.01,
                   **{f"phase/{p}_s": step_s[on] / len(PHASES) for p in PHASES}}
            if on == "true":
                row.update({"balance/cost_imbalance": 1.0 + step / 100, "balance/cost_imbalance_in_order": 1.2})
            rows.append(row)
        (out_dir / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        return out_dir / "train_log.jsonl"

    monkeypatch.setattr(bench_train, "launch", fake_launch)
    args = bench_train.parse_args(["--config", "jobs/tiny_dist.yaml", "--steps", "1", "--warmup", "1", "--rounds", "1",
                                   "--variable-length", "--min-frames", "2", "--frames", "6", *tiny_overrides()])
    out = bench_train.bench_variable_length(args, tmp_path)
    assert out["mode"] == "variable_length" and out["frames"] == 6 and out["min_frames"] == 2
    assert out["step_s_balance_off_median"] == 8.0 and out["step_s_balance_on_median"] == 6.0
    assert out["balancer_speedup"] == 8.0 / 6.0
    assert out["wait_s_max_rank_balance_off"] == 2.0 and out["wait_s_max_rank_balance_on"] == 0.5
    assert out["wait_reduction"] == pytest.approx(0.75)
    assert "balance_stats_balance_off" not in out
    assert out["balance_stats_balance_on"] == {"cost_imbalance": 1.02, "cost_imbalance_in_order": 1.2}

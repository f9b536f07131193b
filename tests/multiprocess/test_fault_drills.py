"""Faults: checkpoint integrity on resume, the sample log, and the fault drills of
``tools/fault_drill.py`` (real 2-rank torchrun jobs killed with SIGKILL / SIGTERM, bad inputs).

The drills run once per module (``drill_report`` fixture, a few minutes on 2 CPU cores); each
test below checks one drill's outcome in that report.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides
from stts_dist.faults import SAMPLE_LOG_ENV, surviving_timeline

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from fault_drill import COLLECTIVE_TIMEOUT_S, EXIT_CHECK  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _cfg(out_dir: Path, **extra):
    from stts_dist.config import load_config
    return load_config(None, tiny_overrides(**{"train.out_dir": str(out_dir), "train.steps": 4, "train.save_every": 2,
                                               "train.eval_prune_ratios": "[0.5]", "data.eval_samples": 2, **extra}))


# -- the sample log ------------------------------------------------------------------------------

def test_trainer_writes_the_sample_log_when_asked(tmp_path, monkeypatch):
    from stts_dist.samples import DigitsDataset, PermutationSampler
    from stts_dist.train.trainer import Trainer

    monkeypatch.setenv(SAMPLE_LOG_ENV, str(tmp_path / "samples.tsv"))
    cfg = _cfg(tmp_path / "run", **{"train.steps": 3, "train.save_every": 0})
    Trainer(cfg).fit()
    timeline, starts = surviving_timeline(tmp_path / "samples.tsv")
    sampler = PermutationSampler(cfg.data.train_samples, cfg.train.batch_size, cfg.data.seed)
    data = DigitsDataset(cfg.data.train_samples, cfg.data.seed, cfg.data.num_frames, cfg.model.vit.image_size,
                         cfg.data.tasks, "train")
    expected = {step: [data[int(i)]["id"] for i in sampler.next_rows()] for step in (1, 2, 3)}
    assert timeline == {0: expected} and starts == {0: [0]}


# -- checkpoint integrity on resume --------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A single-process run of 4 steps with checkpoints at steps 2 and 4."""
    from stts_dist.train.trainer import Trainer

    out = tmp_path_factory.mktemp("trained") / "run"
    Trainer(_cfg(out)).fit()
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_resume_with_another_parallel_layout_is_refused_with_the_fix(trained_run, tmp_path):
    from stts_dist.checkpoint import CheckpointError
    from stts_dist.train.trainer import Trainer

    run = _copy(trained_run, tmp_path)
    manifest = run / "checkpoints" / "step_00000004" / "manifest.json"
    m = json.loads(manifest.read_text())
    assert m["world"] == {"world_size": 1, "tensor_parallel": 1}
    m["world"] = {"world_size": 4, "tensor_parallel": 2}              # written by a TP=2 x DP=2 job
    manifest.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"written with layout \{'world_size': 4, 'tensor_parallel': 2\} but this "
                                              r"run has \{'world_size': 1, 'tensor_parallel': 1\}; resume with the same "
                                              r"tensor_parallel and world size, or consolidate it first"):
        Trainer(_cfg(run, **{"train.steps": 6})).fit()


def test_truncated_checkpoint_file_is_named_and_the_previous_checkpoint_used(trained_run, tmp_path, capsys):
    from stts_dist.train.trainer import Trainer

    run = _copy(trained_run, tmp_path)
    state = run / "checkpoints" / "step_00000004" / "state.pt"
    size = state.stat().st_size
    with open(state, "r+b") as f:
        f.truncate(size // 2)
    resumed = Trainer(_cfg(run, **{"train.steps": 6}))
    resumed.fit()
    out = capsys.readouterr().out
    assert (f"skipping checkpoint {run / 'checkpoints' / 'step_00000004'}: file state.pt has size {size // 2}, "
            f"expected {size}") in out
    assert f"[resume] from {run / 'checkpoints' / 'step_00000002'} at step 2" in out
    assert [h["step"] for h in resumed.history] == [3, 4, 5, 6]


# -- the drills ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def drill_report(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("drills")
    env = {k: v for k, v in os.environ.items() if k != SAMPLE_LOG_ENV}
    done = subprocess.run([sys.executable, str(REPO / "tools" / "fault_drill.py"), "--work", str(work)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    lines = done.stdout.strip().splitlines()
    assert lines, f"no output from the drills; stderr: {done.stderr[-3000:]}"
    report = json.loads(lines[-1])
    report["returncode"] = done.returncode
    report["by_name"] = {r["name"]: r for r in report["results"]}
    return report


def assert_exit_within_allowance(r: dict) -> None:
    """Exit deadline derived from the run, not fixed: the collective timeout plus the job's own
    measured start-up (tools/fault_drill.py, Job.exit_allowance_s)."""
    assert r["info"]["exit_allowance_s"] == pytest.approx(COLLECTIVE_TIMEOUT_S + r["info"]["startup_s"], abs=0.02)
    assert 0 < r["exit_s"] <= r["info"]["exit_allowance_s"], r


def _assert_drill(report: dict, name: str, *checks: str) -> dict:
    r = report["by_name"][name]
    assert r["passed"], f"{name}: {r['failed_checks']} {r['error']}"
    for check in checks:                                           # the drill really checked this
        assert check in r["checks"], (check, r["checks"])
    return r


@pytest.mark.slow
def test_drill_kill_rank_mid_step(drill_report):
    r = _assert_drill(drill_report, "kill_rank", "rank 1 was killed inside step 6", "torchrun exits non-zero",
                      "torchrun names the killed rank as the root cause (rank 1, SIGKILL)",
                      EXIT_CHECK)
    assert_exit_within_allowance(r)
    assert r["samples_lost"] == r["samples_repeated"] == 0


@pytest.mark.slow
def test_drill_corrupt_checkpoint_falls_back(drill_report):
    _assert_drill(drill_report, "corrupt_checkpoint", "the restart names the corrupt checkpoint and file",
                  "the restart resumes from the previous complete checkpoint")


@pytest.mark.slow
def test_drill_sigterm_checkpoints_and_resumes(drill_report):
    r = _assert_drill(drill_report, "sigterm", "a verified checkpoint of that step was written before exit",
                      "the restart resumes from the SIGTERM checkpoint and finishes",
                      "both ranks leave through the preemption exit (code 143)", EXIT_CHECK)
    assert_exit_within_allowance(r)
    assert r["samples_lost"] == r["samples_repeated"] == 0


@pytest.mark.slow
def test_drill_kill_during_checkpoint_write(drill_report):
    r = _assert_drill(drill_report, "kill_during_checkpoint",
                      "the killed write left only a .tmp folder, without its manifest",
                      "the restart resumes from the previous complete checkpoint and finishes", EXIT_CHECK)
    assert_exit_within_allowance(r)
    assert r["samples_lost"] == r["samples_repeated"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["corrupt_shard", "bad_manifest", "unknown_config_key"])
def test_drill_bad_inputs_are_clear_errors(drill_report, name):
    _assert_drill(drill_report, name)


@pytest.mark.slow
def test_drill_summary_meets_the_targets(drill_report):
    assert drill_report["drills"] == 7 and drill_report["passed"] == drill_report["drills"]
    assert drill_report["samples_lost"] == 0 and drill_report["samples_repeated"] == 0
    assert drill_report["max_exit_s"] <= 60 and drill_report["returncode"] == 0

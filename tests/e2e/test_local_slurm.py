"""tools/local_slurm.sh brings up a real single-node Slurm cluster that runs multi-task jobs.

Skipped when Slurm is not installed (`tools/local_slurm.sh install` installs it)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "local_slurm.sh"


def _exports(stdout: str) -> dict[str, str]:
    """`export K=V` lines printed by `up` -> {K: V}."""
    pairs = [line[len("export "):].split("=", 1) for line in stdout.splitlines() if line.startswith("export ")]
    return {k: v for k, v in pairs}


@pytest.fixture(scope="session")
def local_slurm() -> dict[str, str]:
    """Environment (os.environ + SLURM_CONF) for clients of a running local cluster.

    Reuses a cluster that is already up (and leaves it running); otherwise starts one and stops
    it at the end of the session."""
    if shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed (no sbatch on PATH); run `tools/local_slurm.sh install`")
    already_up = subprocess.run([str(SCRIPT), "status"], capture_output=True).returncode == 0
    if not already_up and os.geteuid() != 0:
        pytest.skip("starting the local Slurm daemons needs root; run `sudo tools/local_slurm.sh up` first")
    t0 = time.monotonic()
    up = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, f"tools/local_slurm.sh up failed:\n{up.stderr}"
    print(f"\nlocal Slurm {'reused' if already_up else 'up'} in {time.monotonic() - t0:.1f}s")
    env = {**os.environ, **_exports(up.stdout)}
    yield env
    if not already_up:
        subprocess.run([str(SCRIPT), "down"], capture_output=True, timeout=120)


def sbatch_wait(env: dict[str, str], script: Path, log: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    log.parent.mkdir(parents=True, exist_ok=True)  # Slurm does not create the --output folder
    return subprocess.run(["sbatch", "--wait", "--nodes=1", "--ntasks=2", f"--output={log}",
                           f"--chdir={script.parent}", str(script)],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_up_exports_a_working_config(local_slurm):
    conf = Path(local_slurm["SLURM_CONF"])
    assert conf.is_file() and "KillOnBadExit=1" in conf.read_text()
    info = subprocess.run(["sinfo", "-h", "-o", "%P %t %D"], env=local_slurm, capture_output=True, text=True,
                          timeout=30)
    assert info.returncode == 0, info.stderr
    assert info.stdout.split() == ["local*", "idle", "1"]


def test_up_again_is_a_no_op(local_slurm):
    again = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already up" in again.stderr
    assert _exports(again.stdout)["SLURM_CONF"] == local_slurm["SLURM_CONF"]


def test_two_tasks_run_and_the_job_succeeds(local_slurm, tmp_path):
    script = tmp_path / "ok.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo \"task $SLURM_PROCID of $SLURM_NTASKS\"'\n")
    log = tmp_path / "logs" / "ok.log"
    done = sbatch_wait(local_slurm, script, log)
    assert done.returncode == 0, f"{done.stderr}\n{log.read_text() if log.exists() else ''}"
    lines = sorted(log.read_text().splitlines())
    assert lines == ["task 0 of 2", "task 1 of 2"]


def test_one_failing_task_fails_the_job_and_stops_the_other(local_slurm, tmp_path):
    script = tmp_path / "fail.sh"
    script.write_text(
        "#!/bin/bash\n"
        "srun bash -c 'if [ \"$SLURM_PROCID\" = 1 ]; then echo task 1 fails; exit 1; fi; sleep 60; echo task 0 done'\n")
    log = tmp_path / "logs" / "fail.log"
    t0 = time.monotonic()
    done = sbatch_wait(local_slurm, script, log)
    elapsed = time.monotonic() - t0
    assert done.returncode != 0
    text = log.read_text()
    assert "task 1 fails" in text and "task 0 done" not in text
    assert elapsed < 45, f"KillOnBadExit should end task 0 at once; the job took {elapsed:.0f}s"

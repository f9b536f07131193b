"""The launchers against real services on this machine (CPU, jobs/tiny_dist.yaml, 2 ranks):

* Slurm (tools/local_slurm.sh cluster): ``sbatch --wait slurm/train_7b.sh`` trains, checkpoints and
  records an MLflow run; a failing rank fails the job; SIGUSR1 (what ``--signal=B:USR1@300``
  sends) reaches every rank, and the job requeues itself and resumes.
* Ray (a loopback head started here with token authentication): ``jobs/submit.py shards`` and
  ``jobs/submit.py train`` run to completion; a failing rank fails the job with its traceback.

Rank placement without any service: tests/unit/test_launch_units.py.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from test_local_slurm import local_slurm  # noqa: F401  (session fixture: a running local cluster)

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SLURM_7B = REPO / "slurm" / "train_7b.sh"
SUBMIT = REPO / "jobs" / "submit.py"
# The 7B header asks for 4 nodes x 8 GPUs; on the 2-CPU local node run 1 node, no GPUs, 2 ranks.
LOCAL_RESOURCES = ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--gpus-per-node=0", "--time=00:10:00"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_overrides(out: Path) -> str:
    """Outputs of a tiny run into ``out``: checkpoints and an MLflow store of its own."""
    return (f"train.out_dir={out} tracking.tracking_uri=sqlite:///{out}/mlruns.db "
            f"tracking.artifact_location={out}/mlartifacts")


def finished_run(out: Path) -> tuple[str, dict[str, float]]:
    """(status, last metric values) of the single MLflow run recorded under ``out``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlruns.db")
    experiment = client.get_experiment_by_name("tiny-dist")
    assert experiment is not None, "no MLflow experiment 'tiny-dist' was created"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0].info.status, runs[0].data.metrics


def assert_trained(out: Path, steps: int = 4) -> None:
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip().endswith(f"step_{steps:08d}")
    assert (ckpts / f"step_{steps:08d}" / "manifest.json").is_file()
    status, metrics = finished_run(out)
    assert status == "FINISHED"
    assert metrics["loss"] > 0 and "eval/scorer_0.5/acc" in metrics


# --- Slurm --------------------------------------------------------------------------------------

def sbatch_wait_watching(env: dict[str, str], log: Path, marker: str, timeout: float = 240):
    """``sbatch --wait`` while watching the job's log: returns (completed process, submission,
    first appearance of ``marker`` in the log or None, end), times in ``time.monotonic()`` s."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    proc = subprocess.Popen(["sbatch", "--wait", *LOCAL_RESOURCES, f"--output={log}", str(SLURM_7B)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = None
    while proc.poll() is None:
        if seen is None and log.exists() and marker in log.read_text(errors="replace"):
            seen = time.monotonic()
        assert time.monotonic() - started < timeout, f"sbatch --wait still running after {timeout} s"
        time.sleep(0.1)
    ended = time.monotonic()
    out, err = proc.communicate()
    if seen is None and log.exists() and marker in log.read_text(errors="replace"):
        seen = ended                       # written in the last poll interval
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), started, seen, ended


def sbatch_wait(env: dict[str, str], log: Path, *options: str, timeout: float = 240) -> subprocess.CompletedProcess:
    log.parent.mkdir(parents=True, exist_ok=True)   # Slurm does not create the --output folder
    return subprocess.run(["sbatch", "--wait", *LOCAL_RESOURCES, f"--output={log}", *options, str(SLURM_7B)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


TINY_DIST_TIMEOUT_S = 60     # jobs/tiny_dist.yaml parallel.timeout_s (test_the_collective_timeout_is_what_the_test_assumes)


def slurm_env(local_slurm: dict[str, str], **extra: str) -> dict[str, str]:
    # A private rendezvous port: other local clusters number their jobs from 1 as well.
    return {**local_slurm, "CONFIG": "jobs/tiny_dist.yaml", "MASTER_PORT": str(free_port()),
            "PYTHON": sys.executable, **extra}


@pytest.mark.slow
def test_slurm_job_trains_checkpoints_and_tracks(local_slurm, tmp_path):  # noqa: F811
    out, log = tmp_path / "run", tmp_path / "logs" / "train.out"
    done = sbatch_wait(slurm_env(local_slurm, OVERRIDES=run_overrides(out)), log)
    text = log.read_text() if log.exists() else ""
    assert done.returncode == 0, f"{done.stderr}\n{text}"
    assert "1 node(s) x 2 rank(s), backend gloo" in text
    assert "[step 4]" in text and "training exited with code 0" in text
    assert_trained(out)


@pytest.mark.slow
def test_slurm_job_fails_when_a_rank_fails(local_slurm, tmp_path):  # noqa: F811
    out, log = tmp_path / "run", tmp_path / "logs" / "fail.out"
    env = slurm_env(local_slurm, OVERRIDES=f"train.out_dir={out} tracking.enabled=false fault.fail_at_step=1 "
                                           "fault.fail_rank=1")
    done, started_s, fault_s, ended_s = sbatch_wait_watching(env, log, "injected fault at step 1 on rank 1")
    text = log.read_text()
    assert done.returncode != 0, text
    assert fault_s is not None, text
    assert not (out / "checkpoints" / "step_00000004").exists()
    # "stopped at once": the surviving rank must not sit out the collective timeout in a
    # collective its dead peer never joins, nor train on. The allowance is derived from this
    # run, not fixed: the collective timeout (tiny_dist.yaml's parallel.timeout_s) plus as long
    # again as the job took from submission to the fault (start-up and one step on THIS machine,
    # so a loaded box gets proportionally more time for its slower teardown).
    allowance = TINY_DIST_TIMEOUT_S + (fault_s - started_s)
    assert ended_s - fault_s < allowance, (f"the job ended {ended_s - fault_s:.0f} s after the fault "
                                           f"(allowance {allowance:.0f} s)")


STAND_IN_TRAINER = '''
import os, signal, sys, time
rank, out = os.environ["RANK"], os.environ["STAND_IN_OUT"]
ckpt = os.path.join(out, f"ckpt-{rank}")
if os.path.exists(ckpt):                      # the requeued run: resume and finish
    print(f"rank {rank} resumed from {open(ckpt).read()}", flush=True)
    sys.exit(0)
received = []
signal.signal(signal.SIGUSR1, lambda s, f: received.append(s))
open(os.path.join(out, f"started-{rank}"), "w").close()
deadline = time.time() + 60
while not received and time.time() < deadline:
    time.sleep(0.05)
open(ckpt, "w").write(f"step-{rank}")         # "write the checkpoint", then exit like the trainer
print(f"rank {rank} got SIGUSR1: checkpointed", flush=True)
sys.exit(143 if received else 1)
'''


@pytest.mark.slow
def test_sigusr1_reaches_every_rank_and_the_job_requeues_and_resumes(local_slurm, tmp_path):  # noqa: F811
    """Preemption path of slurm/train.sh with a stand-in for the trainer that follows its contract
    (SIGUSR1 -> checkpoint -> exit 143; a restart finds the checkpoint and finishes)."""
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text(STAND_IN_TRAINER)
    log = tmp_path / "logs" / "preempt.out"
    log.parent.mkdir()
    env = slurm_env(local_slurm, TRAIN_ENTRYPOINT=str(stand_in), STAND_IN_OUT=str(tmp_path), CKPT_GRACE_S="20")
    job = subprocess.run(["sbatch", "--parsable", *LOCAL_RESOURCES, f"--output={log}", str(SLURM_7B)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 90
        while not all((tmp_path / f"started-{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(0.2)
        # what `#SBATCH --signal=B:USR1@300` does 300 s before the time limit
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True, timeout=30)
        state = ""
        while "Restarts=1" not in state or "JobState=PENDING" not in state:
            assert time.monotonic() < deadline, f"not requeued:\n{state}\n{log.read_text()}"
            time.sleep(0.5)
            state = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True,
                                   timeout=30).stdout
        # Release it only once the node has finished cleaning up the first run (epilog, step
        # teardown): a batch job started on a node still COMPLETING fails at launch, before the
        # script runs (seen on a loaded CI box: FAILED with no output of the restart).
        node = ""
        while "idle" not in node:
            assert time.monotonic() < deadline + 60, f"node not idle after the requeue: {node}"
            time.sleep(0.5)
            node = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True,
                                  timeout=30).stdout.strip().lower()
        # Slurm holds a requeued job for ~2 min (BeginTime); release it now
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True, timeout=30)
        while "JobState=COMPLETED" not in state:
            assert "JobState=FAILED" not in state and time.monotonic() < deadline + 60, f"{state}\n{log.read_text()}"
            time.sleep(0.5)
            state = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True,
                                   timeout=30).stdout
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
    text = log.read_text()                                    # --open-mode=append: both runs
    assert text.count("got SIGUSR1: checkpointed") == 2, text
    assert "requeueing job" in text
    assert "rank 0 resumed from step-0" in text and "rank 1 resumed from step-1" in text
    assert text.rstrip().endswith("training exited with code 0")


# --- Ray ----------------------------------------------------------------------------------------

def _stop_process_group(proc: subprocess.Popen, marker: str) -> None:
    """Stop the head we started: its process group, then any process naming our temp dir (job
    drivers run in sessions of their own). Never other people's Ray processes."""
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on loopback only, with its own temp dir, ports and auth token; stopped at the end.
    Yields the environment a client needs (dashboard address and token)."""
    if shutil.which("ray", path=str(VENV_BIN)) is None:
        pytest.skip("ray CLI not installed in the test environment")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")   # short: Ray's socket paths have a length limit
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    ports = {name: free_port() for name in ("gcs", "dashboard", "client", "object_manager", "node_manager",
                                            "agent_http", "agent_grpc", "runtime_env", "metrics",
                                            "dashboard_metrics", "autoscaler_metrics")}
    # A plain head: started by the venv's `ray`, the venv NOT on its PATH (whose `python`, if any,
    # lacks the project): jobs/submit.py must find the interpreter Ray runs with by itself.
    path = ":".join(p for p in os.environ["PATH"].split(":") if Path(p).resolve() != VENV_BIN.resolve())
    env = {**os.environ, "PATH": path,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",                    # bind every server to 127.0.0.1
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "DASHBOARD_METRIC_PORT": str(ports["dashboard_metrics"]),
           "AUTOSCALER_METRIC_PORT": str(ports["autoscaler_metrics"]), "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
           f"--ray-client-server-port={ports['client']}", f"--object-manager-port={ports['object_manager']}",
           f"--node-manager-port={ports['node_manager']}", f"--dashboard-agent-listen-port={ports['agent_http']}",
           f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--runtime-env-agent-port={ports['runtime_env']}",
           f"--metrics-export-port={ports['metrics']}", f"--temp-dir={temp_dir}", "--num-cpus=2",
           "--object-store-memory=200000000", "--disable-usage-stats"]
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        deadline = time.monotonic() + 90
        request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token.read_text()}"})
        while True:
            assert proc.poll() is None, f"ray start exited:\n{(Path(temp_dir) / 'head.log').read_text()}"
            try:
                with urllib.request.urlopen(request, timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the Ray dashboard did not come up in 90 s"
            time.sleep(0.5)
        yield {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
               "RAY_API_SERVER_ADDRESS": address}
    finally:
        _stop_process_group(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_submit_without_the_token_explains_how_to_authenticate(ray_head):
    env = {k: v for k, v in ray_head.items() if not k.startswith("RAY_AUTH")}
    done = submit(env, "train", "--config", "jobs/tiny_dist.yaml", timeout=60)
    assert done.returncode == 2
    assert "requires token authentication" in done.stderr and "RAY_AUTH_MODE=token" in done.stderr


@pytest.mark.slow
def test_ray_sharding_job_writes_shards(ray_head, tmp_path):
    from data_pipeline.synth_digits import write_synthetic

    manifest = write_synthetic(tmp_path / "synth", num=4, frames=4, image_size=32, seed=0)
    shards = tmp_path / "shards"
    done = submit(ray_head, "shards", f"manifest={manifest}", f"out_dir={shards}", "image_size=32", "patch_size=8",
                  "pool_size=2", "fps=0", "max_frames=4", "samples_per_shard=2", "progress_bar=false")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "SUCCEEDED" in done.stderr
    assert sorted(p.name for p in shards.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert (shards / "index.json").is_file()


@pytest.mark.slow
def test_ray_training_job_trains_checkpoints_and_tracks(ray_head, tmp_path):
    out = tmp_path / "run"
    done = submit(ray_head, "train", "--config", "jobs/tiny_dist.yaml", "--num-workers", "2",
                  *run_overrides(out).split())
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "2 rank(s) on 1 node(s)" in done.stdout and "all 2 ranks finished" in done.stdout
    assert_trained(out)


@pytest.mark.slow
def test_a_cluster_interpreter_without_the_project_is_named_with_the_fix(ray_head, tmp_path):
    bare = Path(sys.base_prefix) / "bin" / "python3"       # the interpreter the venv was made from
    done = submit(ray_head, "shards", "--python", str(bare), f"manifest={tmp_path}/m.jsonl", f"out_dir={tmp_path}/s",
                  timeout=120)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert f"the cluster interpreter {bare}" in out or "the cluster interpreter /" in out
    assert "lacks the package(s) ['ray'" in out and "bash tools/setup.sh" in out


@pytest.mark.slow
def test_ray_training_job_fails_with_the_failing_rank_s_exception(ray_head, tmp_path):
    out = tmp_path / "run"
    done = submit(ray_head, "train", "--config", "jobs/tiny_dist.yaml", "--num-workers", "2", f"train.out_dir={out}",
                  "tracking.enabled=false", "fault.fail_at_step=1", "fault.fail_rank=1")
    assert done.returncode != 0
    assert "rank 1 (on 127.0.0.1) failed: InjectedFault" in done.stdout + done.stderr
    assert "injected fault at step 1 on rank 1" in done.stdout + done.stderr
    assert "FAILED" in done.stderr


def test_the_collective_timeout_is_what_the_test_assumes():
    from stts_dist.config import load_config
    assert load_config(str(REPO / "jobs" / "tiny_dist.yaml")).parallel.timeout_s == TINY_DIST_TIMEOUT_S

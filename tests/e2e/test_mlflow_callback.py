"""MLflowCallback against the real MLflow: a SQLite store in a temp folder and a real
`mlflow server` on localhost; everything written is read back with MlflowClient."""
from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from stts_dist.config import ConfigError, RunConfig, flatten, load_config
from stts_dist.tracking import RUN_ID_STATE_KEY, MLflowCallback, TrackingConfig
from stts_dist.tracking.mlflow_callback import batched, metric_name

REPO = Path(__file__).resolve().parents[2]
LOGGER = "stts_dist.tracking.mlflow_callback"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, str]:
    """One SQLite store for the module (creating its tables takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlruns.db"
    client_for(uri).search_experiments()                      # creates the tables once
    return {"uri": uri, "artifacts": str(root / "artifacts")}


def make_trainer(store: dict[str, str], experiment: str, *overrides: str, rank0: bool = True,
                 state: dict | None = None, launch: str = "torchrun") -> SimpleNamespace:
    cfg = load_config(None, [f"tracking.tracking_uri={store['uri']}",
                             f"tracking.artifact_location={store['artifacts']}",
                             f"tracking.experiment={experiment}", "tracking.log_every=5", *overrides])
    return SimpleNamespace(cfg=cfg, is_rank0=rank0, state={} if state is None else state, launch_method=launch)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def run_steps(cb: MLflowCallback, trainer, steps: range) -> None:
    for step in steps:
        cb.on_step_end(trainer, step, {"loss": 1.0 / step, "lr": 1e-3 * step})


def test_full_run_is_read_back(store, tmp_path):
    trainer = make_trainer(store, "full", "data.path=" + "p" * 7000, "name=digits-small",
                           "tracking.system_metrics_every_s=0.2")
    cb = MLflowCallback()
    cb.on_train_start(trainer)
    run_id = trainer.state[RUN_ID_STATE_KEY]
    assert cb.active and cb.run_id == run_id

    run_steps(cb, trainer, range(1, 13))                      # log_every=5 -> 5, 10, and the last (12)
    time.sleep(0.8)                                           # system metrics: sampled every 0.2 s
    cb.on_eval_end(trainer, 12, {"acc@0.5": 0.75, "loss": 1.25})
    cb.on_checkpoint(trainer, 12, str(tmp_path / "ckpt-12"))
    (tmp_path / "samples.txt").write_text("video 0: 3 digits\n")
    cb.on_artifact(trainer, str(tmp_path / "samples.txt"), "samples")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "scores.csv").write_text("frame,score\n0,1.0\n")
    cb.on_artifact(trainer, str(tmp_path / "plots"))
    cb.on_train_end(trainer, "FINISHED")
    assert not cb.active

    client = client_for(store["uri"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "digits-small"
    assert client.get_experiment(run.info.experiment_id).name == "full"
    assert client.get_experiment(run.info.experiment_id).artifact_location == Path(store["artifacts"]).as_uri()

    expected = flatten(trainer.cfg)
    assert set(run.data.params) == set(expected)
    assert run.data.params["model.vit.width"] == "128"
    assert run.data.params["tracking.log_every"] == "5"
    assert run.data.params["data.path"] == "p" * 6000       # MLflow's 6000-char limit, truncated

    assert history(client, run_id, "loss") == [(5, 1 / 5), (10, 1 / 10), (12, 1 / 12)]
    assert history(client, run_id, "lr") == [(5, pytest.approx(5e-3)), (10, pytest.approx(1e-2)),
                                             (12, pytest.approx(1.2e-2))]
    assert history(client, run_id, "eval/acc_0.5") == [(12, 0.75)]
    assert history(client, run_id, "eval/loss") == [(12, 1.25)]
    # MLflow's own system metrics, sampled in the background while the run was live
    cpu = history(client, run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and all(0.0 <= v <= 100.0 * os.cpu_count() for _, v in cpu)
    assert history(client, run_id, "system/system_memory_usage_megabytes")

    tags = run.data.tags
    assert tags["launch_method"] == "torchrun"
    assert tags["last_checkpoint"] == str(tmp_path / "ckpt-12") and tags["last_checkpoint_step"] == "12"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
        assert tags["git_dirty"] in ("true", "false")

    import mlflow.artifacts
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert listed == {"config", "samples", "plots"}
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config/config.yaml",
                                                tracking_uri=store["uri"], dst_path=str(tmp_path / "dl"))
    assert OmegaConf.to_container(OmegaConf.load(local)) == OmegaConf.to_container(trainer.cfg)
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="samples/samples.txt",
                                                tracking_uri=store["uri"], dst_path=str(tmp_path / "dl"))
    assert Path(local).read_text() == "video 0: 3 digits\n"
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/scores.csv"]


def test_resumed_run_continues_the_same_history(store, caplog):
    first = make_trainer(store, "resume", "train.steps=20")
    cb = MLflowCallback()
    cb.on_train_start(first)
    run_steps(cb, first, range(1, 11))
    cb.on_eval_end(first, 10, {"acc": 0.5})
    # Preempted: no on_train_end. The checkpoint carries trainer.state.
    saved_state = copy.deepcopy(first.state)

    resumed = make_trainer(store, "resume", "train.steps=30", state=saved_state, launch="slurm")
    cb2 = MLflowCallback()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cb2.on_train_start(resumed)
    assert "train.steps" in caplog.text                        # the changed key is named
    assert cb2.run_id == cb.run_id == resumed.state[RUN_ID_STATE_KEY]
    run_steps(cb2, resumed, range(11, 31))
    cb2.on_eval_end(resumed, 30, {"acc": 0.9})
    cb2.on_train_end(resumed, "FINISHED")

    client = client_for(store["uri"])
    run = client.get_run(cb.run_id)
    assert run.info.status == "FINISHED"
    assert history(client, cb.run_id, "loss") == [(s, 1 / s) for s in (5, 10, 15, 20, 25, 30)]
    assert history(client, cb.run_id, "eval/acc") == [(10, 0.5), (30, 0.9)]
    assert run.data.params["train.steps"] == "20"              # MLflow params are write-once
    assert run.data.tags["config_changed_on_resume"] == "train.steps"
    assert run.data.tags["resume_count"] == "1"
    assert run.data.tags["launch_method"] == "slurm"
    assert {a.path for a in client.list_artifacts(cb.run_id, "config")} == {
        "config/config.yaml", "config/config.resume-1.yaml"}
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_unknown_run_id_in_checkpoint_starts_a_new_run(store, caplog):
    trainer = make_trainer(store, "missing", state={RUN_ID_STATE_KEY: "0123456789abcdef0123456789abcdef"})
    cb = MLflowCallback()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cb.on_train_start(trainer)
    assert "does not exist" in caplog.text
    assert cb.active and trainer.state[RUN_ID_STATE_KEY] == cb.run_id != "0123456789abcdef0123456789abcdef"
    cb.on_train_end(trainer, "KILLED")
    assert client_for(store["uri"]).get_run(cb.run_id).info.status == "KILLED"


def test_non_rank0_and_disabled_do_nothing(tmp_path):
    store = {"uri": f"sqlite:///{tmp_path}/never.db", "artifacts": str(tmp_path / "art")}
    for trainer in (make_trainer(store, "x", rank0=False), make_trainer(store, "x", "tracking.enabled=false")):
        cb = MLflowCallback()
        cb.on_train_start(trainer)
        run_steps(cb, trainer, range(1, 11))
        cb.on_train_end(trainer, "FINISHED")
        assert not cb.active and cb.run_id is None and trainer.state == {}
    assert not (tmp_path / "never.db").exists()


def test_bad_inputs_get_clear_errors(store):
    with pytest.raises(ConfigError, match="tracking.log_every=0"):
        MLflowCallback().on_train_start(make_trainer(store, "bad", "tracking.log_every=0"))
    with pytest.raises(ValueError, match="status='DONE'"):
        MLflowCallback().on_train_end(make_trainer(store, "bad"), "DONE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_warns_once_and_never_raises(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://127.0.0.1:{free_port()}"                   # nothing listens there
    trainer = make_trainer({"uri": uri, "artifacts": str(tmp_path)}, "down")
    cb = MLflowCallback()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cb.on_train_start(trainer)
        run_steps(cb, trainer, range(1, 21))
        cb.on_eval_end(trainer, 20, {"acc": 1.0})
        cb.on_artifact(trainer, __file__)
        cb.on_train_end(trainer, "FINISHED")
    assert time.monotonic() - t0 < 20
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and uri in warnings[0].getMessage()
    assert not cb.active and RUN_ID_STATE_KEY not in trainer.state


@pytest.mark.slow
def test_http_server_works_and_a_server_dying_mid_run_disables_tracking(store, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.chdir(tmp_path)                                 # so a stray ./mlartifacts would show
    port = free_port()
    # The server reuses the module's SQLite store (its tables exist: saves ~4 s); no job runner (~4 s).
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", store["uri"], "--artifacts-destination", str(tmp_path / "art")],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.25)

        trainer = make_trainer({"uri": uri, "artifacts": "mlartifacts"}, "served")
        cb = MLflowCallback(max_consecutive_failures=3)
        cb.on_train_start(trainer)
        run_steps(cb, trainer, range(1, 11))
        cb.on_eval_end(trainer, 10, {"acc": 0.5})
        cb.on_artifact(trainer, __file__, "code")
        client = client_for(uri)
        assert history(client, cb.run_id, "loss") == [(5, 0.2), (10, 0.1)]
        assert history(client, cb.run_id, "eval/acc") == [(10, 0.5)]
        assert client.get_run(cb.run_id).data.params["model.vit.width"] == "128"
        # The server stores artifacts itself (proxied upload), not in the client's folder.
        assert [a.path for a in client.list_artifacts(cb.run_id, "code")] == ["code/" + Path(__file__).name]
        assert (tmp_path / "art").is_dir() and not Path("mlartifacts").exists()
    finally:  # the server crashes: kill its whole process group (mlflow server + uvicorn)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run_steps(cb, trainer, range(11, 31))                   # logs at 15, 20 fail; 25 is the third
        assert not cb.active
        cb.on_train_end(trainer, "FINISHED")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "log step metrics failed" in warnings[0] and "disabled after 3 consecutive failures" in warnings[1]


def test_importing_tracking_does_not_import_mlflow():
    code = "import sys, stts_dist.tracking; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_metric_names_and_batches():
    assert metric_name("acc@0.5") == "acc_0.5"
    assert metric_name("eval//loss/") == "eval/loss"
    assert metric_name("tokens/s (llm)") == "tokens/s _llm_"
    assert [len(c) for c in batched(range(250), 100)] == [100, 100, 50]
    assert list(batched([], 100)) == []

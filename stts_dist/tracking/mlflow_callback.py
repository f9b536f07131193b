"""MLflow experiment tracking as a training-loop callback (rank 0 only).

What one run records: the flattened config as params, git commit / launch method / config hash
as tags, step metrics every ``log_every`` steps (plus the last step), every eval, the resolved
config YAML and any file handed to ``on_artifact``. The MLflow run id is kept in
``trainer.state`` (saved in checkpoints), so a run resumed from a checkpoint continues the same
MLflow run and its metric histories stay one continuous line.

Tracking must never stop training: every MLflow call is wrapped; the first failure is logged as
a warning, later ones quietly, and after ``max_consecutive_failures`` failures in a row the
callback disables itself (with one more warning). ``mlflow`` is imported only when a run starts
(importing it takes seconds).
"""
from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from omegaconf import OmegaConf

from stts_dist.config import ConfigError, TrackingConfig, config_hash, flatten, to_yaml  # noqa: F401 (re-export)
from stts_dist.tracking.callback import Callback, TrainerView, check_status

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Key in ``trainer.state`` that carries the MLflow run id across checkpoint/resume.
RUN_ID_STATE_KEY = "mlflow_run_id"

# MLflow's server-side limits (mlflow/utils/validation.py).
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# MLflow's own HTTP defaults retry 7 times with exponential backoff (~4 min per failed call) and
# wait 120 s per request: right for rate-limited SaaS servers, wrong for a training loop. These
# apply only when the user has not set the variables.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}

_INVALID_NAME_CHARS = re.compile(r"[^/\w.\- :]")


def validate_tracking(t: Any) -> None:
    """Semantic checks of a TrackingConfig (the config loader may call this too)."""
    if t.log_every < 1:
        raise ConfigError(f"tracking.log_every={t.log_every} must be >= 1 (log step metrics every N steps)")
    if t.enabled and not str(t.tracking_uri).strip():
        raise ConfigError("tracking.tracking_uri is empty; use e.g. sqlite:///mlruns.db or http://127.0.0.1:5000, "
                          "or set tracking.enabled=false")
    if t.enabled and not str(t.experiment).strip():
        raise ConfigError("tracking.experiment is empty; name the MLflow experiment, e.g. stts-dist")


def metric_name(name: str) -> str:
    """Map an arbitrary metric name onto MLflow's allowed characters ('acc@0.5' -> 'acc_0.5')."""
    cleaned = _INVALID_NAME_CHARS.sub("_", str(name))
    cleaned = re.sub(r"/+", "/", cleaned).strip("/")  # MLflow rejects names that are not normalized paths
    return cleaned or "_"


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of at most ``size`` items."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _artifact_uri(location: str, tracking_uri: str) -> Optional[str]:
    """Experiment artifact location: an absolute file URI for local stores, so the runs stay
    readable from any working directory; None (server decides) for a plain path on a server."""
    if not location:
        return None
    if "://" in location:
        return location
    if _is_http(tracking_uri):
        return None
    return Path(location).expanduser().resolve().as_uri()


def _git(*args: str) -> Optional[str]:
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_tags() -> dict[str, str]:
    """Commit of the source tree (MLflow's standard tag, shown in the UI) and whether it had edits."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {}
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    tags = {"mlflow.source.git.commit": commit}
    if dirty is not None:
        tags["git_dirty"] = "true" if dirty else "false"
    return tags


def _now_ms() -> int:
    return int(time.time() * 1000)


class MLflowCallback(Callback):
    """Records a training run in MLflow; acts on rank 0 only.

    ``tracking`` overrides ``trainer.cfg.tracking`` (handy outside the trainer); without either
    the :class:`TrackingConfig` defaults apply.
    """

    def __init__(self, tracking: Optional[TrackingConfig] = None, max_consecutive_failures: int = 3):
        if max_consecutive_failures < 1:
            raise ValueError(f"max_consecutive_failures={max_consecutive_failures} must be >= 1")
        self._tracking_override = tracking
        self.max_consecutive_failures = max_consecutive_failures
        self.log_every = 10
        self.run_id: Optional[str] = None
        self.active = False            # True between a successful start and the end/disable
        self._client: Any = None
        self._failures = 0             # consecutive
        self._warned = False
        self._unloggable: set[str] = set()   # metric names already warned about (non-numeric)
        self._nan_warned: set[str] = set()
        self._pending: Optional[tuple[int, dict[str, Any]]] = None  # last step metrics not yet logged
        self._system_monitor: Any = None

    # -- hooks ------------------------------------------------------------------------------

    def on_train_start(self, trainer: TrainerView) -> None:
        if not trainer.is_rank0:
            return
        tracking = self._tracking_config(trainer.cfg)
        validate_tracking(tracking)
        if not tracking.enabled:
            return
        self.log_every = int(tracking.log_every)
        try:
            self._start(trainer, tracking)
        except Exception as e:  # no run to log into: nothing later can succeed
            log.warning("MLflow tracking disabled: could not start a run at %s (%s: %s). Training continues "
                        "without tracking.", tracking.tracking_uri, type(e).__name__, e)
            self._client = None
            return
        self.active = True

    def on_step_end(self, trainer: TrainerView, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        if step % self.log_every == 0:
            self._pending = None
            self._call("log step metrics", self._log_metrics, step, metrics, "")
        else:
            self._pending = (step, dict(metrics))

    def on_eval_end(self, trainer: TrainerView, step: int, metrics: dict[str, float]) -> None:
        if self.active:
            self._call("log eval metrics", self._log_metrics, step, metrics, "eval/")

    def on_checkpoint(self, trainer: TrainerView, step: int, path: str) -> None:
        if self.active:
            self._call("tag checkpoint", self._set_tags, {"last_checkpoint": str(path),
                                                         "last_checkpoint_step": str(step)})

    def on_artifact(self, trainer: TrainerView, path: str, artifact_dir: Optional[str] = None) -> None:
        if not self.active:
            return
        if not os.path.exists(path):
            log.warning("MLflow tracking: artifact %s does not exist; skipped", path)
            return
        self._call(f"upload artifact {path}", self._upload, path, artifact_dir)

    def on_train_end(self, trainer: TrainerView, status: str) -> None:
        check_status(status)
        if not self.active:
            return
        if self._pending is not None:  # the last step, when it was not a multiple of log_every
            step, metrics = self._pending
            self._pending = None
            self._call("log final step metrics", self._log_metrics, step, metrics, "")
        if self._system_monitor is not None:
            self._call("stop system metrics", self._system_monitor.finish)
            self._system_monitor = None
        self._call("end run", self._client.set_terminated, self.run_id, status)
        self.active = False

    # -- MLflow calls -----------------------------------------------------------------------

    def _tracking_config(self, cfg: Any) -> TrackingConfig:
        if self._tracking_override is not None:
            return self._tracking_override
        node = OmegaConf.select(cfg, "tracking") if cfg is not None else None
        if node is None:
            return TrackingConfig()
        return TrackingConfig(**OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]

    def _start(self, trainer: TrainerView, tracking: TrackingConfig) -> None:
        uri = tracking.tracking_uri
        if _is_http(uri):
            for key, value in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        cfg = trainer.cfg
        run = None
        previous_id = trainer.state.get(RUN_ID_STATE_KEY)
        if previous_id:
            try:
                run = client.get_run(previous_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("MLflow tracking: run %s from the checkpoint does not exist at %s; starting a new "
                            "run (metric history restarts there)", previous_id, uri)

        tags = {"launch_method": str(trainer.launch_method), **git_tags()}
        if cfg is not None:
            tags["config_hash"] = config_hash(cfg)
        params = {k: str(v)[:MAX_PARAM_VALUE_CHARS] for k, v in flatten(cfg).items()} if cfg is not None else {}

        if run is not None:  # resume: same run, new params only (MLflow params are immutable)
            run_id = run.info.run_id
            client.update_run(run_id, status="RUNNING")
            resumes = int(run.data.tags.get("resume_count", "0")) + 1
            tags["resume_count"] = str(resumes)
            logged = run.data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
            if changed:
                log.warning("MLflow tracking: config changed on resume for %s; MLflow keeps the first values "
                            "(the new config is saved as an artifact)", ", ".join(changed))
                tags["config_changed_on_resume"] = ",".join(changed)[:MAX_TAG_VALUE_CHARS]
            params = {k: v for k, v in params.items() if k not in logged}
            config_name = f"config.resume-{resumes}.yaml"
        else:
            experiment_id = self._experiment_id(client, tracking)
            name = tracking.run_name or (cfg.name if cfg is not None else "") or None
            run_id = client.create_run(experiment_id, run_name=name).info.run_id
            config_name = "config.yaml"

        self._client, self.run_id = client, run_id
        trainer.state[RUN_ID_STATE_KEY] = run_id
        if tracking.system_metrics_every_s > 0:
            self._start_system_metrics(run_id, uri, tracking.system_metrics_every_s, resumed=run is not None)
        self._set_tags(tags)
        self._log_params(params)
        if cfg is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / config_name
                path.write_text(to_yaml(cfg))
                client.log_artifact(run_id, str(path), "config")

    def _start_system_metrics(self, run_id: str, uri: str, every_s: float, resumed: bool) -> None:
        """MLflow's own sampler (psutil; pynvml on GPU nodes) in a background thread: CPU, memory,
        disk, network and GPU utilisation under ``system/`` in the run."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, samples_before_logging=1,
                                           resume_logging=resumed, tracking_uri=uri)
            monitor.start()
        except Exception as e:      # e.g. psutil missing: the run goes on without them
            log.warning("MLflow system metrics off (%s: %s)", type(e).__name__, e)
            return
        self._system_monitor = monitor

    @staticmethod
    def _experiment_id(client: Any, tracking: TrackingConfig) -> str:
        experiment = client.get_experiment_by_name(tracking.experiment)
        if experiment is not None:
            return experiment.experiment_id
        location = _artifact_uri(tracking.artifact_location, tracking.tracking_uri)
        return client.create_experiment(tracking.experiment, artifact_location=location)

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        for chunk in batched(params.items(), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk])

    def _set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        for chunk in batched(tags.items(), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:MAX_TAG_VALUE_CHARS]) for k, v in chunk])

    def _log_metrics(self, step: int, metrics: dict[str, Any], prefix: str) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        entries = []
        for key, value in metrics.items():
            name = metric_name(key if not prefix or str(key).startswith(prefix.rstrip("/")) else prefix + str(key))
            try:
                number = float(value)  # floats, ints, numpy and 0-d torch scalars
            except (TypeError, ValueError, RuntimeError):  # RuntimeError: multi-element tensor
                if name not in self._unloggable:
                    self._unloggable.add(name)
                    log.warning("MLflow tracking: metric %r has non-numeric value %r; not logged", key, value)
                continue
            if math.isnan(number) and name not in self._nan_warned:  # still logged: MLflow stores NaN
                self._nan_warned.add(name)
                log.warning("MLflow tracking: metric %r is NaN at step %d", key, step)
            entries.append(Metric(name, number, now, int(step)))
        for chunk in batched(entries, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk)

    def _upload(self, path: str, artifact_dir: Optional[str]) -> None:
        if os.path.isdir(path):
            sub = os.path.basename(os.path.normpath(path))
            target = f"{artifact_dir}/{sub}" if artifact_dir else sub
            self._client.log_artifacts(self.run_id, path, target)
        else:
            self._client.log_artifact(self.run_id, path, artifact_dir)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run one MLflow operation; a failure is counted and reported, never raised."""
        try:
            fn(*args)
        except Exception as e:
            self._failures += 1
            if not self._warned:
                self._warned = True
                log.warning("MLflow tracking: %s failed (%s: %s); training continues. Later failures are not "
                            "reported; tracking stops after %d in a row.", what, type(e).__name__, e,
                            self.max_consecutive_failures)
            else:
                log.debug("MLflow tracking: %s failed again: %s", what, e)
            if self._failures >= self.max_consecutive_failures:
                self.active = False
                log.warning("MLflow tracking disabled after %d consecutive failures (last: %s: %s); run %s "
                            "stays incomplete", self._failures, type(e).__name__, e, self.run_id)
            return
        self._failures = 0

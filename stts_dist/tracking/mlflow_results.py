"""One MLflow run for a finished piece of work (``stts-eval``'s evaluation): params, metrics and a
folder of output files. Imports mlflow only when called, like the training callback."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Union

from stts_dist.tracking.mlflow_callback import _artifact_uri, metric_name


def log_results_run(uri: str, experiment: str, *, run_name: str, params: Mapping[str, Any],
                    metrics: Mapping[str, float], artifacts_dir: Union[str, Path], artifact_path: str,
                    artifact_location: str = "mlartifacts") -> str:
    """Log one run to ``experiment`` at tracking ``uri`` (created with ``artifact_location`` when
    it does not exist; ignored by http servers); metric names are mapped as the training
    callback's (:func:`metric_name`). Returns the run id."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=_artifact_uri(artifact_location, uri))
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params(dict(params))
        mlflow.log_metrics({metric_name(k): v for k, v in metrics.items()})
        mlflow.log_artifacts(str(artifacts_dir), artifact_path=artifact_path)
        return run.info.run_id

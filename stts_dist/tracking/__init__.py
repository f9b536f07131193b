"""Experiment tracking, plugged into the training loop as callbacks, and one-off result runs
(``stts-eval``: ``mlflow_results.log_results_run``).

Importing this package does not import mlflow (slow); the MLflow callback imports it when a
run starts on rank 0, ``log_results_run`` when called.
"""
from stts_dist.tracking.callback import RUN_STATUSES, Callback, TrainerView
from stts_dist.tracking.mlflow_callback import RUN_ID_STATE_KEY, MLflowCallback, TrackingConfig, validate_tracking
from stts_dist.tracking.mlflow_results import log_results_run

__all__ = ["Callback", "TrainerView", "RUN_STATUSES", "MLflowCallback", "TrackingConfig", "RUN_ID_STATE_KEY",
           "validate_tracking", "log_results_run"]

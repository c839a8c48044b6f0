"""Experiment trackers (MLflow, TensorBoard, W&B): one thread tails the run store into them.

See runtime/tracking/mirror.py (what is logged, resume, failures), sinks.py (the trackers) and
params.py (the config as parameters, secrets redacted). Never imports Prefect."""

from runtime.tracking.mirror import TrackerMirror
from runtime.tracking.params import flat_params

__all__ = ["TrackerMirror", "flat_params"]

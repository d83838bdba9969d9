"""Experiment tracking: a training run's epochs and a campaign's summary, logged to the tracker a
config's ``tracking`` field names (``mlflow``, ``tensorboard``, ``wandb`` or ``none``).

Why one small interface here, not Ray's logger callbacks: Ray Train v2 takes no Tune logger
callbacks, so its own guidance is to log from the training function; doing that on rank 0 (and
at the end of a campaign, on the driver) gives one code path for training runs, Tune trials and
campaigns. Each library is imported only when chosen; a missing one is one clear error before
any work.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from bitstorm.errors import ConfigError
from bitstorm.storage import is_uri

TRACKERS = ("none", "mlflow", "tensorboard", "wandb")
EXPERIMENT = "bitstorm"
_INSTALL = {
    "mlflow": "pip install 'bitstorm[tracking]' (mlflow-skinny)",
    "tensorboard": "pip install tensorboardX (Ray Tune installs it)",
    "wandb": "pip install wandb",
}


class Tracker(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def check_tracking(kind: str) -> None:
    """Refuse an unknown tracker, or one whose library is not installed, before any work."""
    if kind not in TRACKERS:
        raise ConfigError(f"tracking {kind!r} is not one of {', '.join(TRACKERS)}")
    module = {"mlflow": "mlflow", "tensorboard": "tensorboardX", "wandb": "wandb"}.get(kind)
    if module is not None:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"tracking: {kind} needs {module}: {_INSTALL[kind]}")


def tracking_location(kind: str, uri: str | None, output: str) -> str | None:
    """Where ``kind`` logs: the config's ``tracking_uri``, else MLflow's own
    ``MLFLOW_TRACKING_URI`` if set, else a file store (``mlruns``) or event folder
    (``tensorboard``) in the config's ``output`` (in this folder where that is an object-store
    URI), as an absolute path, since workers may run elsewhere; W&B decides its own."""
    if uri is not None:
        return uri
    folder = Path(".") if is_uri(output) else Path(output)
    if kind == "mlflow":
        return os.environ.get("MLFLOW_TRACKING_URI") or (folder / "mlruns").resolve().as_uri()
    if kind == "tensorboard":
        return str((folder / "tensorboard").resolve())
    return None


def open_tracker(kind: str, run_name: str, location: str | None) -> Tracker:
    """A tracker for one run named ``run_name``; ``location``: MLflow's tracking URI, or the
    TensorBoard folder the run's event file goes under."""
    check_tracking(kind)
    if kind == "mlflow":
        return _MLflow(run_name, location)
    if kind == "tensorboard":
        return _TensorBoard(str(Path(location or "tensorboard") / run_name))
    if kind == "wandb":
        return _Wandb(run_name)
    return _Nothing()


def flat(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config values as ``a.b: text`` pairs, as every tracker's parameters take them."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class _Nothing:
    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class _MLflow:
    def __init__(self, run_name: str, uri: str | None) -> None:
        from mlflow.tracking import MlflowClient

        if uri is None or uri.startswith("file:"):
            # MLflow 3 keeps its local file store in maintenance mode and refuses it unless
            # asked; it is the store that needs no server or database, so bitstorm asks. A
            # sqlite:// or http(s):// tracking_uri uses MLflow's other backends.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        for key, value in flat(params).items():
            self.client.log_param(self.run_id, key, value[:500])  # MLflow's value limit

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value), step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _TensorBoard:
    def __init__(self, folder: str) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=folder)

    def log_params(self, params: Mapping[str, Any]) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in flat(params).items())
        self.writer.add_text("config", text)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_name: str) -> None:
        import wandb

        self.run = wandb.init(project=EXPERIMENT, name=run_name, reinit=True)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(flat(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()

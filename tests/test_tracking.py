"""Experiment tracking (issue 17): a campaign's summary and a training run's epochs reach
MLflow's local file store and TensorBoard event files, as the config's ``tracking`` says."""

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bitstorm.errors import ConfigError
from bitstorm.tracking import check_tracking
from campaign.analysis.results import open_results, overall_rates
from campaign.runner import run_campaign
from campaign.spec import CampaignSpec

ROOT = Path(__file__).resolve().parents[1]


def _spec(tmp_path, **tracking):
    return CampaignSpec.parse(
        {
            "name": "tracked",
            "models": [{"name": "own", "factory": "tests.campaign.factories:small_net"}],
            "dataset": "digits",
            "images": 6,
            "image_selection": "any",
            "kinds": ["weight"],
            "bits": [30],
            "trials_per_stratum": 8,
            "output": str(tmp_path / "out"),
        }
        | tracking
    )


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``folder`` (TFRecord framing: length,
    its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    found: dict[str, list[tuple[int, float]]] = {}
    for path in folder.rglob("events.out.tfevents.*"):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def test_a_campaign_summary_reaches_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    run_campaign(_spec(tmp_path, tracking="mlflow", tracking_uri=uri), local=True, progress=False)
    rate = overall_rates(open_results(tmp_path / "out" / "tracked"))[("own", "weight")]
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("bitstorm").experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.metrics["own.weight.sdc_rate"] == pytest.approx(rate.rate)
    assert run.data.metrics["own.weight.sdc_trials"] == rate.trials == 2 * 8
    assert run.data.params["protocol"] == "bitstorm" and run.data.params["kinds"] == "['weight']"


def test_a_campaign_summary_reaches_tensorboard(tmp_path):
    run_campaign(_spec(tmp_path, tracking="tensorboard"), local=True, progress=False)
    scalars = _scalars(tmp_path / "out" / "tensorboard" / "tracked")
    rate = overall_rates(open_results(tmp_path / "out" / "tracked"))[("own", "weight")]
    assert scalars["own.weight.sdc_rate"] == [(0, pytest.approx(rate.rate))]


def test_training_epochs_reach_mlflow(tmp_path):
    """One line per epoch, as the recipe's ``tracking`` says, from Ray Train's rank 0."""
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    done = subprocess.run(
        [
            *(sys.executable, "-m", "bitstorm", "train", "--config", "digits_linear"),
            *("backbone=tiny_cnn", "batch_size=256", "epochs=2", f"output={tmp_path}"),
            *("tracking=mlflow", f"tracking_uri={uri}"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("bitstorm").experiment_id])
    steps = client.get_metric_history(run.info.run_id, "val_top1")
    assert [m.step for m in steps] == [1, 2] and run.data.params["backbone"] == "tiny_cnn"
    assert "learning_rate" in run.data.metrics and "lr" not in run.data.metrics


def test_an_unknown_or_missing_tracker_is_one_clear_error(monkeypatch):
    with pytest.raises(ConfigError, match="tracking 'comet' is not one of none, mlflow"):
        check_tracking("comet")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    with pytest.raises(ConfigError, match="tracking: wandb needs wandb: pip install wandb"):
        check_tracking("wandb")

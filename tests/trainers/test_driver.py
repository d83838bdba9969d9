"""Training's driver refuses what no retry can fix before Ray starts, a worker's bad-input error
is one message, and a checkpoint placed in a run folder is resumed from."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bitstorm.errors import ConfigError, DataError
from trainers import driver
from trainers.checkpoint import latest_checkpoint, read_manifest
from trainers.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def test_an_unknown_backbone_is_refused_before_ray_starts(monkeypatch, tmp_path):
    def no_ray(*_args, **_kwargs):
        raise AssertionError("Ray must not start for a config that cannot train")

    monkeypatch.setattr(driver, "connect", no_ray)
    cfg = TrainConfig(backbone="resnet181", dataset="digits", output=str(tmp_path))
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet181'; did you mean resnet18"):
        driver.fit(cfg)


def test_a_data_set_folder_that_is_missing_is_refused_before_ray_starts(monkeypatch, tmp_path):
    monkeypatch.setattr(driver, "connect", lambda *_a, **_k: pytest.fail("Ray must not start"))
    cfg = TrainConfig(dataset="imagenet", data_root=str(tmp_path / "none"), output=str(tmp_path))
    with pytest.raises(DataError, match=r"imagenet not found: no folder .*none/train"):
        driver.fit(cfg)


def _train(tmp_path, *overrides):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [
            *(sys.executable, "-m", "trainers.train", "--config", "digits_linear"),
            *("backbone=tiny_cnn", "batch_size=256", f"output={tmp_path}", *overrides),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_data_set_only_a_worker_can_find_broken_is_one_message_and_exit_2(tmp_path):
    """A CIFAR folder that exists but holds nothing passes the driver's cheap check; the
    worker's DataError comes back as the one ``error:`` line, exit 2. (Ray Train's controller
    still logs the worker's traceback, at a moment Ray's log monitor decides; issue 17.)"""
    (tmp_path / "empty").mkdir()
    done = _train(tmp_path, "dataset=cifar10", f"data_root={tmp_path / 'empty'}", "max_failures=0")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and "cifar10 not found under" in errors[0]


def test_a_checkpoint_placed_in_a_run_folder_is_resumed_from(tmp_path):
    first = _train(tmp_path, "name=a", "epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    placed = latest_checkpoint(tmp_path / "a")
    shutil.copytree(placed, tmp_path / "b" / "from_elsewhere")  # no Ray snapshot beside it
    second = _train(tmp_path, "name=b", "epochs=2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {tmp_path / 'b' / 'from_elsewhere'}" in second.stdout + second.stderr
    history = read_manifest(latest_checkpoint(tmp_path / "b"))["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[0] == read_manifest(placed)["history"][0]

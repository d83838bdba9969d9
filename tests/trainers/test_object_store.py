"""Training runs and checkpoints on an object store (a moto S3 server on the loopback address):
a checkpoint on S3 loads as the local one does, hash check included; Ray Train writes a run's
checkpoints to ``output=s3://...`` (not to a local folder named ``s3:``) and resumes from them."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from bitstorm.errors import DataError
from trainers.checkpoint import fetched_checkpoint, load_checkpoint, save_checkpoint
from trainers.config import TrainConfig
from trainers.models import build_model

ROOT = Path(__file__).resolve().parents[2]


def _checkpoint(folder: Path, epoch: int, seed: int) -> Path:
    cfg = TrainConfig(backbone="tiny_cnn", dataset="synthetic")
    model = build_model("tiny_cnn", "linear", 10, seed=seed)
    names = tuple(f"class{i}" for i in range(10))
    return save_checkpoint(folder, model, cfg, epoch=epoch, history=[], class_names=names)


def test_a_run_folder_on_s3_gives_its_latest_checkpoint_checked_as_a_local_one(s3_bucket, tmp_path):
    run = tmp_path / "run"
    _checkpoint(run / "checkpoint_b", epoch=1, seed=1)
    _checkpoint(run / "checkpoint_a", epoch=2, seed=2)  # the latest by epoch, not by name
    filesystem, bucket = pafs.FileSystem.from_uri(s3_bucket)
    pafs.copy_files(str(run), f"{bucket}/runs/run", destination_filesystem=filesystem)
    with fetched_checkpoint(f"{s3_bucket}/runs/run") as (folder, where):
        model, _ = load_checkpoint(folder)
        assert where == f"{s3_bucket}/runs/run/checkpoint_a"
    assert not folder.exists()  # the copy is gone
    expected, _ = load_checkpoint(run / "checkpoint_a")
    pairs = zip(model.state_dict().values(), expected.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    with filesystem.open_output_stream(f"{bucket}/runs/run/checkpoint_a/model.safetensors") as out:
        out.write((run / "checkpoint_b" / "model.safetensors").read_bytes())  # swapped weights
    with (
        pytest.raises(DataError, match="sha256 does not match"),
        fetched_checkpoint(f"{s3_bucket}/runs/run") as (folder, _),
    ):
        load_checkpoint(folder)
    with (
        pytest.raises(DataError, match="neither a checkpoint"),
        fetched_checkpoint(f"{s3_bucket}/runs/none"),
    ):
        pass


def _train(cwd: Path, output: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [
            *(sys.executable, "-m", "trainers.train", "--config", "digits_linear"),
            *("backbone=tiny_cnn", "batch_size=256", f"output={output}", *overrides),
        ],
        cwd=cwd,
        env=env | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ray_train_writes_and_resumes_a_run_on_s3(s3_bucket, tmp_path):
    from trainers.checkpoint import read_manifest

    runs = f"{s3_bucket}/runs"
    first = _train(tmp_path, runs, "name=a", "epochs=1", f"data_root={ROOT / 'data'}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"checkpoint: {runs}/a/checkpoint_" in first.stdout
    assert not (tmp_path / "s3:").exists()  # storage_path went to S3, not a local folder
    with fetched_checkpoint(f"{runs}/a") as (folder, _):
        once = read_manifest(folder)["history"]
    second = _train(tmp_path, runs, "name=a", "epochs=2", f"data_root={ROOT / 'data'}")
    assert second.returncode == 0, second.stderr[-3000:]
    with fetched_checkpoint(f"{runs}/a") as (folder, _):
        history = read_manifest(folder)["history"]
        load_checkpoint(folder)
    assert [row["epoch"] for row in history] == [1, 2] and history[0] == once[0]

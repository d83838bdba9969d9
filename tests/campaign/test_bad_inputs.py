"""Bad input a user can give a campaign, table-driven: each ends with exit 2, one message that
names the field, no traceback, and nothing written (issue 13)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainers.checkpoint import save_checkpoint
from trainers.config import TrainConfig
from trainers.data import dataset_class_names
from trainers.models import build_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    cfg = TrainConfig(backbone="tiny_cnn", head="linear", dataset="digits")
    model = build_model("tiny_cnn", "linear", 10, seed=1)
    names = dataset_class_names("digits")
    return str(save_checkpoint(folder / "m", model, cfg, epoch=1, history=[], class_names=names))


CASES = {
    "unsafe campaign name": ({"name": "../../x"}, "name: '../../x' is not a safe name"),
    "model name with a slash": ({"models": [{"name": "li/n"}]}, "models[].name: 'li/n'"),
    "no fault kinds": ({"kinds": []}, "kinds: give at least one"),
    "no bits": ({"bits": []}, "bits: give at least one bit position"),
    "no formats": ({"formats": []}, "formats: give at least one"),
    "unknown protocol": ({"protocol": "pytorchfi"}, "protocol: 'pytorchfi' is not one of"),
    "an output URI pyarrow cannot open": ({"output": "foo://x"}, "output 'foo://x'"),
    "more images than the split": ({"images": 100000}, "images: 100000, but the validation"),
    "a GPU this machine lacks": ({"resources": {"gpus_per_actor": 1}}, "an actor asks for"),
    "more CPUs than this machine": ({"resources": {"cpus_per_actor": 64}}, "64 CPUs"),
    "a missing checkpoint": ({"models": [{"checkpoint": "/nonexistent"}]}, "models[m].checkpoint"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_one_message_and_exit_2_with_nothing_written(case, checkpoint, tmp_path):
    change, message = dict(CASES[case][0]), CASES[case][1]
    output = tmp_path / "out"
    spec = {
        "name": "bad",
        "models": [{"name": "m", "checkpoint": checkpoint}],
        "images": 8,
        "trials_per_stratum": 2,
        "output": str(output),
    }
    if "models" in change:
        spec["models"] = [spec["models"][0] | change.pop("models")[0]]
    spec |= change
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "campaign/run.py", "--spec", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(errors) == 1 and message in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not output.exists()

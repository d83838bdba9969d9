"""Bad input a user can give, table-driven across every command (campaign, report, site listing,
training, sweeps, embeddings): each ends with exit 2, one message that names the problem, no
traceback, and nothing written (issue 13)."""

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from trainers.checkpoint import MANIFEST, WEIGHTS, save_checkpoint
from trainers.config import TrainConfig
from trainers.data import dataset_class_names
from trainers.models import build_model

ROOT = Path(__file__).resolve().parents[2]

# Each case: argv (after the Python executable) from (tmp_path, a good checkpoint), and a part of
# the one message. Whatever a case would write goes under tmp_path / "out".
Argv = Callable[[Path, str], list[str]]


def campaign(**change) -> Argv:
    """``campaign/run.py --spec`` on a good small spec with ``change`` applied (``models``:
    changes to its one model entry)."""

    def argv(tmp: Path, checkpoint: str) -> list[str]:
        spec = {
            "name": "bad",
            "models": [{"name": "m", "checkpoint": checkpoint}],
            "images": 8,
            "trials_per_stratum": 2,
            "output": str(tmp / "out"),
        }
        changes = dict(change)
        if "models" in changes:
            spec["models"] = [spec["models"][0] | changes.pop("models")]
        path = tmp / "spec.yaml"
        settings = {k: v for k, v in (spec | changes).items() if v is not None}  # None: drop
        path.write_text(yaml.safe_dump(settings))
        return ["campaign/run.py", "--spec", str(path)]

    return argv


def with_flags(case: Argv, *flags: str) -> Argv:
    """``case``'s command line with ``flags`` after it (``{out}``: the case's output folder)."""
    return lambda tmp, checkpoint: (
        case(tmp, checkpoint) + [f.format(out=tmp / "out") for f in flags]
    )


def damaged_checkpoint(damage: Callable[[Path], None]) -> Argv:
    """A campaign over a copy of the good checkpoint that ``damage`` changed."""

    def argv(tmp: Path, checkpoint: str) -> list[str]:
        copy = tmp / "damaged"
        copy.mkdir()
        for file in Path(checkpoint).iterdir():
            (copy / file.name).write_bytes(file.read_bytes())
        damage(copy)
        return campaign(models={"checkpoint": str(copy)})(tmp, checkpoint)

    return argv


def without_weights_hash(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["weights_sha256"]
    (folder / MANIFEST).write_text(json.dumps(manifest))


def pickled_weights(folder: Path) -> None:
    (folder / WEIGHTS).write_bytes(pickle.dumps({"weight": [1.0]}))


def spec_file(text: str) -> Argv:
    def argv(tmp: Path, _checkpoint: str) -> list[str]:
        (tmp / "spec.yaml").write_text(text)
        return ["campaign/run.py", "--spec", str(tmp / "spec.yaml")]

    return argv


def labelled_images(rows: list[str]) -> Argv:
    """A campaign of a factory model over a folder of two images whose labels.csv has ``rows``
    (after its header ``file,label,split``)."""

    def argv(tmp: Path, checkpoint: str) -> list[str]:
        from PIL import Image

        folder = tmp / "images"
        folder.mkdir()
        for name in ("a.png", "b.png"):
            Image.new("RGB", (8, 8)).save(folder / name)
        (folder / "labels.csv").write_text("\n".join(["file,label,split", *rows]) + "\n")
        model = {"checkpoint": None, "factory": "tests.campaign.factories:small_net"}
        data = {"dataset": "images_csv", "data_root": str(folder), "image_selection": "any"}
        return campaign(models=model, **data)(tmp, checkpoint)

    return argv


def command(*args: str) -> Argv:
    """A command line; ``{out}`` in an argument becomes the case's output folder."""
    return lambda tmp, _checkpoint: [a.format(out=tmp / "out") for a in args]


def train(*overrides: str) -> Argv:
    return command("-m", "trainers.train", "--config", "digits_linear", "output={out}", *overrides)


def tune(*overrides: str) -> Argv:
    return command("-m", "trainers.tune", "--config", "digits", "output={out}", *overrides)


WEIGHTS_NAME = "ResNet18_Weights.IMAGENET1K_V1"  # not in the case's empty TORCH_HOME

CASES: dict[str, tuple[Argv, str]] = {
    # campaign specs
    "unsafe campaign name": (campaign(name="../../x"), "name: '../../x' is not a safe name"),
    "model name with a slash": (campaign(models={"name": "li/n"}), "models[].name: 'li/n'"),
    "no fault kinds": (campaign(kinds=[]), "kinds: give at least one"),
    "no bits": (campaign(bits=[]), "bits: give at least one bit position"),
    "no formats": (campaign(formats=[]), "formats: give at least one"),
    "no layers": (campaign(layers=[]), "layers: give at least one"),
    "unknown fault kind": (campaign(kinds=["memory"]), "kinds: 'memory'"),
    "unknown format": (campaign(formats=["fp8"]), "formats: 'fp8'"),
    "a bit the format lacks": (campaign(formats=["fp16"], bits=[20]), "bits: 20 is outside fp16"),
    "a layer pattern matching nothing": (campaign(layers=["layer9.*"]), "'layer9.*' matches no"),
    "unknown protocol": (campaign(protocol="pytorchfi"), "protocol: 'pytorchfi' is not one of"),
    "unknown field": (campaign(imagez=8), "imagez"),
    "a word where a number belongs": (campaign(images="many"), "images"),
    "zero trials per stratum": (campaign(trials_per_stratum=0), "trials_per_stratum"),
    "a margin above 1": (
        campaign(sampling={"margin": 2.0, "confidence": 0.95}, trials_per_stratum=None),
        "margin",
    ),
    "the old clamp field": (campaign(clamp=True), "clamp"),
    "the old golden_correct_only field": (campaign(golden_correct_only=True), "image_selection"),
    "an output URI pyarrow cannot open": (campaign(output="foo://x"), "output 'foo://x'"),
    "an output nobody can write": (campaign(output="/proc/bitstorm-out"), "cannot write"),
    "more images than the split": (campaign(images=100000), "images: 100000, but the validation"),
    "a GPU this machine lacks": (
        campaign(resources={"gpus_per_actor": 1}),
        "an actor asks for",
    ),
    "more CPUs than this machine": (campaign(resources={"cpus_per_actor": 64}), "64 CPUs"),
    "a missing checkpoint": (
        campaign(models={"checkpoint": "/nonexistent"}),
        "models[m].checkpoint",
    ),
    "a checkpoint manifest without weights_sha256": (
        damaged_checkpoint(without_weights_hash),
        "weights_sha256",
    ),
    "a pickle posing as weights": (damaged_checkpoint(pickled_weights), "model.safetensors"),
    "an embeddings file that is not one": (
        campaign(models={"embeddings": "/etc/hostname"}),
        "embeddings",
    ),
    "a negative label in labels.csv": (
        labelled_images(["a.png,-1,val", "b.png,1,val"]),
        "labels.csv: label -1 is negative",
    ),
    "a split that is neither train nor val": (
        labelled_images(["a.png,0,test", "b.png,1,val"]),
        "labels.csv: split 'test' is not train or val",
    ),
    "an image labels.csv names but lacks": (
        labelled_images(["a.png,0,val", "c.png,1,val"]),
        "1 files not found, e.g. c.png",
    ),
    "pretrained weights that are not cached": (
        campaign(
            models={"checkpoint": None, "torchvision": "resnet18", "weights": WEIGHTS_NAME},
            dataset="digits",
        ),
        "not in the torch cache; put https://",
    ),
    "a factory that does not import": (
        campaign(models={"checkpoint": None, "factory": "nopackage.models:build"}),
        "nopackage",
    ),
    "a spec that is not YAML": (spec_file("name: [unclosed"), "spec.yaml"),
    "a spec that is a list": (spec_file("- name: x\n"), "spec.yaml"),
    "a spec file that is not there": (
        command("campaign/run.py", "--spec", "/nonexistent.yaml"),
        "/nonexistent.yaml",
    ),
    # flags and overrides that would otherwise be ignored (issue 17)
    "overrides without --spec": (
        command("-m", "bitstorm", "run", "images=64"),
        "images=64: key=value overrides change a --spec campaign",
    ),
    "--output with --spec": (
        with_flags(campaign(), "--output", "{out}"),
        "--output is the default run's folder",
    ),
    "--fresh with --dry-run": (with_flags(campaign(), "--dry-run", "--fresh"), "--dry-run runs"),
    "site options without --list-sites": (
        command("-m", "bitstorm", "run", "--input", "3,32,32"),
        "--input: fault-site options describe the model of --list-sites",
    ),
    "--list-sites with --spec": (
        with_flags(campaign(), "--list-sites", "resnet18"),
        "--list-sites prints a model's fault sites and runs nothing; drop --spec",
    ),
    "a dotted key into a plain field": (
        with_flags(campaign(), "images.count=3"),
        "images",
    ),
    "an unknown bitstorm subcommand": (
        command("-m", "bitstorm", "rnu"),
        "no subcommand 'rnu'; did you mean run?",
    ),
    "bitstorm with no subcommand": (command("-m", "bitstorm"), "name a subcommand"),
    "sites of a misspelt model": (
        command("-m", "bitstorm", "sites", "resnt18"),
        "did you mean resnet18",
    ),
    # reports and site listings
    "a report of no campaign": (command("-m", "campaign.report", "/nonexistent"), "/nonexistent"),
    "sites of an unknown model": (
        command("campaign/run.py", "--list-sites", "resnet181"),
        "unknown model 'resnet181'",
    ),
    "sites for a 2-d input": (
        command("campaign/run.py", "--list-sites", "resnet18", "--input", "3,32"),
        "cannot run on an input of shape [3, 32]",
    ),
    "sites for an input the model refuses": (
        command("campaign/run.py", "--list-sites", "vit_b_16", "--input", "3,32,32"),
        "vit_b_16 cannot run on an input of shape [3, 32, 32]",
    ),
    # training and sweeps
    "an unknown backbone": (train("backbone=resnet181"), "unknown backbone 'resnet181'"),
    "an unknown data set": (train("dataset=mnist2"), "dataset 'mnist2' is not one of"),
    "a data folder that is missing": (
        train("dataset=imagenet", "data_root=/nonexistent"),
        "imagenet not found",
    ),
    "a negative learning rate": (train("lr=-1"), "lr must be > 0"),
    "an unknown recipe field": (train("epochz=3"), "epochz"),
    "an unknown recipe": (command("-m", "trainers.train", "--config", "nope"), "nope"),
    "a grace period beyond the epochs": (tune("grace_period=50"), "grace_period: 50 epochs"),
    "an unknown scheduler": (tune("scheduler=hyperband"), "scheduler 'hyperband'"),
    # embeddings
    "embeddings for an unknown class set": (
        command("-m", "embeddings", "build", "--classes", "nope", "--out", "{out}/e.safetensors"),
        "nope",
    ),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    cfg = TrainConfig(backbone="tiny_cnn", head="linear", dataset="digits")
    model = build_model("tiny_cnn", "linear", 10, seed=1)
    names = dataset_class_names("digits")
    return str(save_checkpoint(folder / "m", model, cfg, epoch=1, history=[], class_names=names))


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_one_message_and_exit_2_with_nothing_written(case, checkpoint, tmp_path):
    argv, message = CASES[case]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TORCH_HOME"] = str(tmp_path / "torch")
    env["PYTHONPATH"] = str(ROOT)  # a factory in the test tree imports as a user's package would
    done = subprocess.run(
        [sys.executable, *argv(tmp_path, checkpoint)],
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
    assert not (tmp_path / "out").exists()

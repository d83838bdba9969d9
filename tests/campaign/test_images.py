"""Campaign images: the models' own data (split seed, image size, normalisation), models trained
on different data refused before any work, and a campaign whose images all fail selection says
so instead of a traceback."""

import pytest
import torch
from torch import nn

from bitstorm.errors import ConfigError, DataError
from campaign.images import select_images
from campaign.runner import validate
from campaign.spec import CampaignSpec
from trainers.checkpoint import save_checkpoint
from trainers.config import TrainConfig
from trainers.data import build_data, dataset_class_names, digits
from trainers.models import build_model


def _checkpoint(folder, **data) -> str:
    cfg = TrainConfig(backbone="tiny_cnn", head="linear", dataset="digits", **data)
    model = build_model("tiny_cnn", "linear", 10, seed=1)
    names = dataset_class_names("digits")
    return str(save_checkpoint(folder, model, cfg, epoch=1, history=[], class_names=names))


def _spec(tmp_path, checkpoints, **fields) -> CampaignSpec:
    models = [{"name": f"m{i}", "checkpoint": c} for i, c in enumerate(checkpoints)]
    settings = {"images": 16, "image_selection": "any", "output": str(tmp_path / "out")}
    return CampaignSpec.parse({"models": models, **settings, **fields})


def test_images_come_from_the_checkpoints_own_split_and_size(tmp_path):
    """A model trained on digits at 24x24 with split seed 7: the campaign's images are its own
    validation images, at 24x24, normalised as in training; none of them is a training image."""
    spec = _spec(tmp_path, [_checkpoint(tmp_path / "ckpt", seed=7, image_size=24)])
    checked = validate(spec)
    images = select_images(spec, checked.models, checked.data)["m0"]
    assert images.images.shape[1:] == (3, 24, 24)
    assert checked.data.image_shape == (3, 24, 24)
    own = digits(seed=7, image_size=24)
    val = torch.stack([own.val[i][0] for i in images.indices])
    assert torch.equal(images.images, val)
    train = torch.stack([own.train[i][0] for i in range(len(own.train))]).flatten(1)
    assert not (torch.cdist(images.images.flatten(1), train) == 0).any()
    assert [int(own.val[i][1]) for i in images.indices] == images.labels.tolist()


def test_models_trained_on_different_data_are_refused_before_any_work(tmp_path):
    first = _checkpoint(tmp_path / "a", seed=0)
    other_seed = _checkpoint(tmp_path / "b", seed=3)
    with pytest.raises(
        ConfigError, match=r"their data configs differ .*m1: dataset=digits.*seed=3"
    ):
        validate(_spec(tmp_path, [first, other_seed]))
    with pytest.raises(ConfigError, match="trained on 'digits'"):
        validate(_spec(tmp_path, [first], dataset="synthetic"))
    assert not (tmp_path / "out").exists()


class NeverRight(nn.Module):
    """Always predicts an eleventh class, which no digit has."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(images), 11)
        logits[:, 10] = 1.0
        return logits


def test_no_qualifying_image_is_a_data_error_that_says_what_to_do(tmp_path):
    data = build_data("digits")
    spec = _spec(tmp_path, ["/nonexistent"], image_selection="every_model_correct", images=8)
    with pytest.raises(DataError, match="image_selection: any"):
        select_images(spec, {"m0": NeverRight()}, data)
    relaxed = _spec(tmp_path, ["/nonexistent"], images=8)
    assert len(select_images(relaxed, {"m0": NeverRight()}, data)["m0"].indices) == 8


class Always(nn.Module):
    """Predicts one class, by a clear margin (Top2Diff > 0), or a tie of two (Top2Diff 0)."""

    def __init__(self, label: int, tie: bool = False) -> None:
        super().__init__()
        self.label, self.tie = label, tie

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(images), 10)
        logits[:, self.label] = 1.0
        if self.tie:
            logits[:, (self.label + 1) % 10] = 1.0
        return logits


def test_own_correct_gives_each_model_its_own_correct_images_with_a_margin(tmp_path):
    """goldeneye's selection: per model, images it classifies correctly with Top2Diff > 0;
    a shared selection finds none that both get right."""
    data = build_data("digits")
    models = {"zero": Always(0), "one": Always(1)}
    spec = _spec(tmp_path, ["/x", "/y"], image_selection="own_correct", images=6)
    chosen = select_images(spec, {"m0": models["zero"], "m1": models["one"]}, data)
    assert chosen["m0"].labels.tolist() == [0] * 6 and chosen["m1"].labels.tolist() == [1] * 6
    assert set(chosen["m0"].indices).isdisjoint(chosen["m1"].indices)
    assert [int(data.val[i][1]) for i in chosen["m1"].indices] == [1] * 6
    shared = _spec(tmp_path, ["/x", "/y"], image_selection="every_model_correct", images=6)
    with pytest.raises(DataError, match="no image qualifies"):
        select_images(shared, {"m0": models["zero"], "m1": models["one"]}, data)
    tied = _spec(tmp_path, ["/x"], image_selection="own_correct", images=6)
    with pytest.raises(DataError, match="no image qualifies for model m0"):
        select_images(tied, {"m0": Always(0, tie=True)}, data)


def test_more_images_than_the_split_holds_are_refused(tmp_path):
    data = build_data("digits")
    spec = _spec(tmp_path, ["/x"], images=100_000)
    with pytest.raises(
        ConfigError, match=rf"images: 100000, but the validation split has {len(data.val)}"
    ):
        select_images(spec, {"m0": NeverRight()}, data)

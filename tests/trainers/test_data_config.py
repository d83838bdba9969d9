"""Data sets and recipes: the offline digits set, the synthetic set, and config validation."""

import pytest

from bitstorm.errors import ConfigError, DataError
from trainers.config import TrainConfig, load_train_config
from trainers.data import build_data, dataset_class_names


def test_digits_is_a_fixed_split_of_sklearns_images():
    data = build_data("digits")
    assert len(data.train) + len(data.val) == 1797 and len(data.val) == 359
    image, label = data.train[0]
    assert image.shape == (3, 32, 32) and 0 <= int(label) < 10
    again = build_data("digits")
    assert (again.val.tensors[1] == data.val.tensors[1]).all()
    assert abs(float(data.train.tensors[0].mean())) < 1e-4  # standardised on the train split
    assert data.class_names[3] == "three"


def test_synthetic_set():
    data = build_data("synthetic", synthetic_size=100)
    assert len(data.train) == 80 and data.class_names == dataset_class_names("synthetic")


def test_torchvision_sets_only_download_when_asked(tmp_path):
    with pytest.raises(DataError, match="set download: true"):
        build_data("cifar10", tmp_path)
    with pytest.raises(DataError, match="ImageFolder"):
        build_data("imagenet", tmp_path)


@pytest.mark.parametrize("name", ["digits_linear", "digits_text", "cifar10_text", "imagenet_paper"])
def test_shipped_recipes_load(name):
    cfg = load_train_config(name)
    assert cfg.name and cfg.epochs > 0


def test_the_papers_imagenet_recipe():
    cfg = load_train_config("imagenet_paper")
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.epochs) == ("sgd", 0.9, 1e-4, 90)
    assert (cfg.schedule, cfg.step_size, cfg.gamma, cfg.head) == ("step", 30, 0.1, "text")
    assert cfg.effective_lr == pytest.approx(0.1)
    assert load_train_config("imagenet_paper", ["batch_size=360"]).effective_lr == pytest.approx(
        0.05
    )


def test_overrides_and_validation_name_the_field():
    cfg = load_train_config("digits_linear", ["epochs=3", "use_gpu=false", "embeddings=null"])
    assert cfg.epochs == 3 and cfg.embeddings is None
    with pytest.raises(ConfigError, match="unknown field 'epoch'; did you mean epochs"):
        load_train_config("digits_linear", ["epoch=3"])
    with pytest.raises(ConfigError, match="field 'lr' must be a number"):
        load_train_config("digits_linear", ["lr=fast"])
    with pytest.raises(ConfigError, match="optimizer 'adam' is not one of sgd, adamw"):
        load_train_config("digits_linear", ["optimizer=adam"])
    with pytest.raises(ConfigError, match="divide evenly over 3 workers"):
        TrainConfig(batch_size=64, num_workers=3)
    with pytest.raises(ConfigError, match="shipped configs: cifar10_text, digits_linear"):
        load_train_config("nope")

"""Training's driver refuses what no retry can fix before Ray starts."""

import pytest

from bitstorm.errors import ConfigError
from trainers import driver
from trainers.config import TrainConfig


def test_an_unknown_backbone_is_refused_before_ray_starts(monkeypatch, tmp_path):
    def no_ray(*_args, **_kwargs):
        raise AssertionError("Ray must not start for a config that cannot train")

    monkeypatch.setattr(driver, "connect", no_ray)
    cfg = TrainConfig(backbone="resnet181", dataset="digits", output=str(tmp_path))
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet181'; did you mean resnet18"):
        driver.fit(cfg)

"""Backbones by name, from torchvision, timm, or the few small ones built in here.

One way to make them, as in timm: a name maps to one constructor and an unknown name gets the
nearest valid ones. Every backbone is returned with its classifier found by name, so a head can
replace it: the classifier is the last ``nn.Linear`` producing ``num_classes`` outputs.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from bitstorm.errors import ConfigError


def _tiny_cnn(num_classes: int) -> nn.Module:
    """Two conv blocks and a linear classifier, no BatchNorm or dropout: fast, and its gradients
    are the same whatever the DDP sharding, which makes exact distributed tests possible."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * 16, num_classes),
    )


BUILTIN: dict[str, Callable[[int], nn.Module]] = {"tiny_cnn": _tiny_cnn}


def create_backbone(name: str, num_classes: int, *, pretrained: bool = False) -> nn.Module:
    """A classifier network by name. ``pretrained`` loads torchvision/timm weights (downloads)."""
    import torchvision

    if name in BUILTIN:
        if pretrained:
            raise ConfigError(f"{name} is built in and has no pretrained weights")
        return BUILTIN[name](num_classes)
    torchvision_models = torchvision.models.list_models(module=torchvision.models)
    if name in torchvision_models:
        if not pretrained:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        model = torchvision.models.get_model(name, weights="DEFAULT")
        path, old = classifier(model, out_features=None)
        replace_module(model, path, nn.Linear(old.in_features, num_classes))
        return model
    import timm  # only here: importing timm costs about half a second

    if timm.is_model(name):
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    check_backbone(name)
    raise AssertionError("check_backbone refuses every name no branch above builds")


def check_backbone(name: str) -> None:
    """Refuse a backbone name no source knows, with close matches: before training starts, so
    that Ray Train never retries what no retry can fix."""
    import timm
    import torchvision

    torchvision_models = torchvision.models.list_models(module=torchvision.models)
    if name in BUILTIN or name in torchvision_models or timm.is_model(name):
        return
    known = [*BUILTIN, *torchvision_models, *timm.list_models()]
    close = difflib.get_close_matches(name, known, n=5)
    raise ConfigError(
        f"unknown backbone {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
    )


def classifier(model: nn.Module, out_features: int | None) -> tuple[str, nn.Linear]:
    """Qualified name and module of the final classifier Linear."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (out_features is None or m.out_features == out_features)
    ]
    if not found:
        raise ConfigError(
            f"{type(model).__name__} has no Linear classifier with "
            f"{out_features} outputs to replace with a head"
        )
    return found[-1]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def use_small_input_stem(model: nn.Module, name: str) -> None:
    """Keep full resolution for 32x32 inputs: a 3x3 stride-1 first conv and no max-pool (ResNets,
    as in CIFAR practice), or a stride-1 first conv (MobileNet-V2)."""
    if isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool"):
        old = model.conv1
        model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        return
    features = getattr(model, "features", None)
    if name.startswith("mobilenet_v2") and isinstance(features, nn.Sequential):
        features[0][0].stride = (1, 1)
        return
    raise ConfigError(f"small_input is supported for ResNets and mobilenet_v2, not {name!r}")

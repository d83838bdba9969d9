"""Class-name lists, in the order the data sets number their labels.

digits follows scikit-learn's targets (0-9, spelled out so text encoders read them as words);
CIFAR-10/100, STL-10 and Food-101 follow torchvision; ImageNet-1k comes from torchvision's own
weights metadata, so no download is needed. A user may also pass a text file, one name per line.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from bitstorm.errors import ConfigError, DataError

SHIPPED_CLASS_SETS = ("digits", "cifar10", "cifar100", "stl10", "food101")
CLASS_SETS = (*SHIPPED_CLASS_SETS, "imagenet")


def class_names(spec: str) -> list[str]:
    """Names of a known class set (``cifar10``) or of a text file with one name per line."""
    if spec in SHIPPED_CLASS_SETS:
        text = resources.files("embeddings").joinpath(f"data/classes/{spec}.txt").read_text()
        return _parse(text, spec)
    if spec == "imagenet":
        from torchvision.models import ResNet50_Weights

        return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"unknown class set {spec!r}: pass one of {', '.join(CLASS_SETS)} "
            "or a text file with one class name per line"
        )
    return _parse(path.read_text(encoding="utf-8"), str(path))


def display_name(name: str) -> str:
    """How a class name reads in a sentence: ``aquarium_fish`` -> ``aquarium fish``."""
    return " ".join(name.replace("_", " ").split())


def _parse(text: str, origin: str) -> list[str]:
    names = [line.strip() for line in text.splitlines() if line.strip()]
    seen: set[str] = set()
    repeated = [name for name in names if name in seen or seen.add(name)]
    if repeated:
        raise DataError(f"{origin}: class names must be unique; repeated: {repeated[:5]}")
    if not names:
        raise DataError(f"{origin}: no class names found (one name per line)")
    return names

"""Data sets and their transforms: scikit-learn's bundled digits (offline default), a synthetic
set for tests, and CIFAR-10/100, STL-10, Food-101 and ImageNet through torchvision's own loading
code (downloads only when the user asks, with ``download: true``).

Transforms follow torchvision's references/classification: random crops and flips for training,
resize and centre crop for evaluation, ImageNet normalisation for the large-image sets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from bitstorm.errors import ConfigError, DataError
from embeddings.classes import class_names as named_classes

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DATASETS = (
    "digits",
    "synthetic",
    "cifar10",
    "cifar100",
    "stl10",
    "food101",
    "imagenet",
    "images_csv",
)
# Read from data_root. images_csv: data_root/labels.csv lists image files (relative to it) and
# labels, with an optional split column (train/val).
ON_DISK = ("cifar10", "cifar100", "stl10", "food101", "imagenet", "images_csv")
LABELS_CSV = "labels.csv"


@dataclass(frozen=True)
class Preprocessing:
    """How a model that bitstorm did not train wants its images (its weights' transforms, timm's
    pretrained config, or the spec's): resize the short side, centre-crop, normalise. Applies to
    data sets read from disk; the bundled tensor sets (digits, synthetic) take ``input_size``
    and keep their own standardisation."""

    input_size: int = 224
    resize: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def at(self, size: int | None) -> Preprocessing:
        """The same preprocessing cropping ``size`` (None: as is), resized in proportion."""
        if not size:
            return self
        return dataclasses.replace(
            self, input_size=size, resize=round(size * self.resize / self.input_size)
        )

    def describe(self) -> str:
        return (
            f"resize {self.resize}, crop {self.input_size}, mean {list(self.mean)}, "
            f"std {list(self.std)}"
        )

    def transform(self):
        from torchvision import transforms as T

        return T.Compose(
            [
                T.Resize(self.resize),
                T.CenterCrop(self.input_size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )


@dataclass(frozen=True)
class DataBundle:
    train: Dataset
    val: Dataset
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class DataConfig:
    """What decides which images a model trained on and how they look: the data set, its
    train/validation split seed, image size and (through the split) normalisation. A campaign
    rebuilds exactly this, so it tests on images the model never trained on, as it saw them."""

    dataset: str
    image_size: int | None = None
    seed: int = 0
    synthetic_size: int = 512
    preprocessing: Preprocessing | None = None  # a model bitstorm did not train

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> DataConfig:
        """The data config of a training config (a ``TrainConfig`` as a mapping)."""
        return cls(
            config["dataset"],
            config.get("image_size"),
            config.get("seed", 0),
            config.get("synthetic_size", 512),
        )

    def resolved(self) -> DataConfig:
        """The same config with its default image size spelled out, so that configs that make
        the same images compare equal."""
        size = self.image_size or default_image_size(self.dataset)
        return dataclasses.replace(self, image_size=size)

    def build(self, root: str | Path = "data", *, download: bool = False) -> DataBundle:
        return build_data(
            self.dataset,
            root,
            download=download,
            image_size=self.image_size,
            seed=self.seed,
            synthetic_size=self.synthetic_size,
            preprocessing=self.preprocessing,
        )


def build_data(
    name: str,
    root: str | Path = "data",
    *,
    download: bool = False,
    image_size: int | None = None,
    seed: int = 0,
    synthetic_size: int = 512,
    preprocessing: Preprocessing | None = None,
) -> DataBundle:
    """Train and validation sets for ``name`` (see ``DATASETS``); with ``preprocessing``, both
    splits are made its way (for campaigns on models bitstorm did not train: no augmentation)."""
    if preprocessing is not None:
        image_size = preprocessing.input_size
    if name == "digits":
        return digits(seed=seed, image_size=image_size or default_image_size(name))
    if name == "synthetic":
        return synthetic(
            synthetic_size, image_size=image_size or default_image_size(name), seed=seed
        )
    if name == "images_csv":
        size = image_size or default_image_size(name)
        return images_csv(Path(root), preprocessing or Preprocessing().at(size))
    if name in ON_DISK:
        return _torchvision(name, Path(root), download, image_size, preprocessing)
    raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def default_image_size(name: str) -> int:
    """The side images of ``name`` have when no image size is set."""
    return 32 if name in ("digits", "synthetic", "cifar10", "cifar100") else 224


def check_data(name: str, root: str | Path, *, download: bool) -> None:
    """Refuse a data set the workers could never load, cheaply (no files are read): before
    training starts, so that Ray Train never retries what no retry can fix."""
    root = Path(root)
    if name == "images_csv":
        if not (root / LABELS_CSV).is_file():
            raise DataError(f"images_csv: no {root / LABELS_CSV}; {_data_hint(name)}")
        return
    dataset_class_names(name)
    if name not in ON_DISK:
        return
    needed = [root / "train", root / "val"] if name == "imagenet" else [root]
    missing = [str(p) for p in needed if not p.is_dir()]
    if missing and (name == "imagenet" or not download):
        raise DataError(f"{name} not found: no folder {', '.join(missing)}; {_data_hint(name)}")


def dataset_class_names(name: str, num_classes: int = 10) -> tuple[str, ...]:
    """Class names of a data set without loading it (synthetic classes are class0, class1...)."""
    if name == "synthetic":
        return tuple(f"class{i}" for i in range(num_classes))
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "images_csv":
        raise ConfigError(
            f"images_csv: its class names are its labels in {LABELS_CSV}, known only once it is "
            "read; a text head needs a named class set (cifar10, imagenet, ...)"
        )
    return tuple(named_classes(name))


def digits(*, seed: int = 0, image_size: int = 32, val_fraction: float = 0.2) -> DataBundle:
    """scikit-learn's 1,797 bundled 8x8 digits, upsampled to 3 x size x size, standardised with
    the training split's statistics; a fixed, seeded 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16.0
    images = F.interpolate(
        images, size=(image_size, image_size), mode="bilinear", align_corners=False
    ).repeat(1, 3, 1, 1)
    labels = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = round(len(labels) * val_fraction)
    val_idx, train_idx = order[:n_val], order[n_val:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return DataBundle(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        val=TensorDataset(images[val_idx], labels[val_idx]),
        class_names=dataset_class_names("digits"),
        image_shape=(3, image_size, image_size),
    )


def synthetic(
    size: int, *, num_classes: int = 10, image_size: int = 32, seed: int = 0
) -> DataBundle:
    """Learnable random images: one fixed pattern per class plus noise. For tests."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(num_classes, 3, image_size, image_size, generator=generator)
    labels = torch.arange(size) % num_classes
    images = patterns[labels] + 0.5 * torch.randn(
        size, 3, image_size, image_size, generator=generator
    )
    n_val = max(num_classes, size // 5)
    return DataBundle(
        train=TensorDataset(images[n_val:], labels[n_val:]),
        val=TensorDataset(images[:n_val], labels[:n_val]),
        class_names=dataset_class_names("synthetic", num_classes),
        image_shape=(3, image_size, image_size),
    )


def _torchvision(
    name: str,
    root: Path,
    download: bool,
    image_size: int | None,
    preprocessing: Preprocessing | None,
) -> DataBundle:
    from torchvision import datasets

    small = name in ("cifar10", "cifar100")
    size = image_size or default_image_size(name)
    if preprocessing is None:
        train_tf, eval_tf = _transforms(size, small)
    else:
        train_tf = eval_tf = preprocessing.transform()
    try:
        if name == "cifar10":
            train = datasets.CIFAR10(root, train=True, transform=train_tf, download=download)
            val = datasets.CIFAR10(root, train=False, transform=eval_tf, download=download)
        elif name == "cifar100":
            train = datasets.CIFAR100(root, train=True, transform=train_tf, download=download)
            val = datasets.CIFAR100(root, train=False, transform=eval_tf, download=download)
        elif name == "stl10":
            train = datasets.STL10(root, split="train", transform=train_tf, download=download)
            val = datasets.STL10(root, split="test", transform=eval_tf, download=download)
        elif name == "food101":
            train = datasets.Food101(root, split="train", transform=train_tf, download=download)
            val = datasets.Food101(root, split="test", transform=eval_tf, download=download)
        else:
            train = datasets.ImageFolder(root / "train", transform=train_tf)
            val = datasets.ImageFolder(root / "val", transform=eval_tf)
    except (RuntimeError, FileNotFoundError) as error:
        raise DataError(f"{name} not found under {root}: {_data_hint(name)} ({error})") from None
    return DataBundle(
        train=train, val=val, class_names=dataset_class_names(name), image_shape=(3, size, size)
    )


def _transforms(size: int, small: bool):
    from torchvision import transforms as T

    if small:
        normalize = T.Normalize(CIFAR_MEAN, CIFAR_STD)
        train = T.Compose(
            [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
        )
        return train, T.Compose([T.Resize(size), T.ToTensor(), normalize])
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
    )
    evaluate = T.Compose(
        [T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), normalize]
    )
    return train, evaluate


def _data_hint(name: str) -> str:
    """Where a data set read from ``data_root`` must be, or how to fetch it."""
    if name == "imagenet":
        return "an ImageFolder tree with train/ and val/ under data_root"
    if name == "images_csv":
        return f"data_root must hold {LABELS_CSV} with columns file,label[,split]"
    return "set download: true to fetch it, or point data_root at a copy"


class LabelledImages(Dataset):
    """Image files with labels, made ``transform``'s way when read."""

    def __init__(self, files: list[Path], labels: list[int], transform) -> None:
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.files[i]) as image:
            return self.transform(image.convert("RGB")), self.labels[i]


def images_csv(root: Path, preprocessing: Preprocessing) -> DataBundle:
    """A folder of images listed in ``labels.csv`` (``file,label[,split]``). Labels are class
    indices where every label is an integer, else class names (sorted, then numbered). Without
    a ``split`` column every image is in both splits: a campaign tests on the validation split
    and profiles range bounds on the training split, so say ``split`` where that matters."""
    import csv

    with open(root / LABELS_CSV, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"file", "label"} <= set(rows[0]):
        raise DataError(f"{root / LABELS_CSV}: give a header row with file,label[,split] and rows")
    missing = [r["file"] for r in rows if not (root / r["file"]).is_file()]
    if missing:
        raise DataError(f"{root / LABELS_CSV}: {len(missing)} files not found, e.g. {missing[0]}")
    names = [r["label"] for r in rows]
    splits = {r.get("split") or "" for r in rows} - {"train", "val", ""}
    if splits:
        raise DataError(f"{root / LABELS_CSV}: split {min(splits)!r} is not train or val")
    if all(n.strip().lstrip("-").isdigit() for n in names):
        labels = [int(n) for n in names]
        if min(labels) < 0:
            raise DataError(
                f"{root / LABELS_CSV}: label {min(labels)} is negative; integer labels are class "
                "indices from 0"
            )
        classes = tuple(str(i) for i in range(max(labels) + 1))
    else:
        classes = tuple(sorted(set(names)))
        labels = [classes.index(n) for n in names]
    transform = preprocessing.transform()

    def split(which: str) -> LabelledImages:
        keep = [i for i, r in enumerate(rows) if (r.get("split") or which) == which]
        return LabelledImages(
            [root / rows[i]["file"] for i in keep], [labels[i] for i in keep], transform
        )

    size = preprocessing.input_size
    return DataBundle(split("train"), split("val"), classes, (3, size, size))

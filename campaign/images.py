"""The campaign's images and golden tables, chosen and computed once by the driver: each model's
images (one set for all, or each model its own, by ``image_selection``), and every trial row
refers to them by their index in the validation split.

The images come from the models' own training data config (data set, split seed, image size,
normalisation), or for models bitstorm did not train, from the spec's data set made the way
their weights want (campaign.sources); never from library defaults: a model trained with
another split seed would otherwise be tested on images it trained on, and one trained at
another size at the wrong resolution. Models on different data configs cannot share a
campaign."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch

from bitstorm.errors import ConfigError, DataError
from bitstorm.logs import get_logger
from bitstorm.metrics import top2diff
from campaign.sources import LoadedModel, load_model
from campaign.spec import CampaignSpec
from campaign.store import GOLDEN_SCHEMA
from trainers.data import ON_DISK, DataBundle, DataConfig

log = get_logger(__name__)


@dataclass(frozen=True)
class CampaignImages:
    """The campaign's images: positions in the validation split, the images and labels."""

    indices: list[int]
    images: torch.Tensor
    labels: torch.Tensor


def load_models(spec: CampaignSpec) -> dict[str, LoadedModel]:
    return {m.name: load_model(m) for m in spec.models}


def campaign_data(spec: CampaignSpec, models: Mapping[str, LoadedModel]) -> DataBundle:
    """The data every model of the campaign is tested on, under ``spec.data_root``: what a
    checkpoint trained on (rebuilt from its manifest), or for a model from another source the
    spec's ``dataset`` made the model's way (its preprocessing). Refused before any work when
    the models' data configs differ, or when ``spec.dataset`` names another data set than the
    checkpoints'."""
    configs = {}
    for name, loaded in models.items():
        if loaded.data is not None:
            if spec.dataset and spec.dataset != loaded.data.dataset:
                raise ConfigError(
                    f"dataset: {spec.dataset!r}, but model {name!r} was trained on "
                    f"{loaded.data.dataset!r}; leave dataset out to test on the models' own "
                    "validation split"
                )
            configs[name] = loaded.data.resolved()
        elif not spec.dataset:
            raise ConfigError(
                f"dataset: model {name!r} is not a bitstorm checkpoint, so name the data set to "
                "test it on (dataset: imagenet, cifar10, digits, ...)"
            )
        elif spec.dataset in ON_DISK:
            configs[name] = DataConfig(spec.dataset, preprocessing=loaded.preprocessing).resolved()
        else:  # a bundled tensor set keeps its own standardisation: only the size applies
            size = loaded.preprocessing.input_size if loaded.preprocessing else None
            configs[name] = DataConfig(spec.dataset, image_size=size).resolved()
    if len(set(configs.values())) > 1:
        listed = "; ".join(
            f"{name}: {', '.join(f'{k}={v}' for k, v in dataclasses.asdict(c).items())}"
            for name, c in configs.items()
        )
        raise ConfigError(
            f"models: their data configs differ ({listed}); a campaign tests every model on "
            "the same images, so run one campaign per data config"
        )
    return next(iter(configs.values())).build(spec.data_root)


def select_images(
    spec: CampaignSpec, models: dict[str, torch.nn.Module], data: DataBundle
) -> dict[str, CampaignImages]:
    """Each model's ``spec.images`` images of ``data``'s validation split, walked in one seeded
    order and kept by ``spec.image_selection``: ``every_model_correct`` keeps the images every
    model classifies correctly (one image set for all: a fault can only corrupt a correct
    answer); ``own_correct`` keeps, per model, its own correct images with Top2Diff > 0
    (goldeneye's); ``any`` keeps every image."""
    val = data.val
    if spec.images > len(val):
        raise ConfigError(
            f"images: {spec.images}, but the validation split has {len(val)} images; ask for "
            f"at most {len(val)}"
        )
    order = torch.randperm(len(val), generator=torch.Generator().manual_seed(spec.image_seed))
    shared = spec.image_selection != "own_correct"
    kept: dict[str, list[tuple[int, torch.Tensor, int]]] = {name: [] for name in models}
    for start in range(0, len(order), 256):
        candidates = order[start : start + 256].tolist()
        images = torch.stack([val[i][0] for i in candidates])
        labels = torch.tensor([int(val[i][1]) for i in candidates])
        keep = {
            name: _qualifies(spec.image_selection, model, images, labels)
            for name, model in models.items()
        }
        if shared:
            common = torch.stack(list(keep.values())).all(dim=0)
            keep = dict.fromkeys(models, common)
        for name, mask in keep.items():
            kept[name] += [
                (c, images[i], int(labels[i])) for i, c in enumerate(candidates) if mask[i]
            ]
        if all(len(k) >= spec.images for k in kept.values()):
            break
    empty = [name for name, k in kept.items() if not k]
    if empty:
        raise DataError(
            f"no image qualifies for model {empty[0]} ({spec.image_selection}): every candidate "
            "is misclassified; check that the models were trained on this data set, or set "
            "image_selection: any"
        )
    for name, k in kept.items():
        if len(k) < spec.images:
            log.warning(
                "model %s: only %d of the %d validation images qualify (%s); it is tested on those",
                name,
                len(k),
                spec.images,
                spec.image_selection,
            )
    return {
        name: CampaignImages(
            [c for c, _, _ in k[: spec.images]],
            torch.stack([image for _, image, _ in k[: spec.images]]),
            torch.tensor([label for _, _, label in k[: spec.images]]),
        )
        for name, k in kept.items()
    }


def _qualifies(
    selection: str, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    if selection == "any":
        return torch.ones(len(labels), dtype=torch.bool)
    logits = golden_logits(model, images)
    correct = logits.argmax(dim=1) == labels
    return correct & (top2diff(logits) > 0) if selection == "own_correct" else correct


def validation_top2diff(model: torch.nn.Module, data: DataBundle, batch: int = 256) -> float:
    """Mean golden Top2Diff (percent) over the whole validation split: the paper's Top2Diff
    (goldeneye averages it over every validation image, correct or not)."""
    total, count = 0.0, 0
    for images in dataset_batches(data.val, range(len(data.val)), batch):
        total += float(top2diff(golden_logits(model, images)).sum())
        count += len(images)
    return total / count


def dataset_batches(
    dataset: torch.utils.data.Dataset, indices: Sequence[int], size: int
) -> Iterator[torch.Tensor]:
    """The images of ``dataset`` at ``indices``, stacked ``size`` at a time."""
    for start in range(0, len(indices), size):
        yield torch.stack([dataset[i][0] for i in indices[start : start + size]])


def golden_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model``'s fault-free logits of ``images`` (on the CPU), computed on the model's own
    device: a pass on an actor's GPU reads images the driver's CPU holds."""
    device = next(iter(model.parameters()), images).device
    with torch.no_grad():
        return model(images.to(device)).float().cpu()


def golden_table(logits: torch.Tensor, images: CampaignImages) -> pa.Table:
    """The golden table of ``images`` from their fault-free ``logits`` (a worker's golden
    pass): what every trial row's image refers to."""
    logits = logits.float().cpu()
    probabilities = logits.softmax(dim=1)
    return pa.Table.from_pydict(
        {
            "image": images.indices,
            "label": images.labels.tolist(),
            "golden_top1": logits.argmax(dim=1).tolist(),
            "confidence": probabilities.max(dim=1).values.tolist(),
            "top2diff": top2diff(logits).tolist(),
        },
        schema=GOLDEN_SCHEMA,
    )

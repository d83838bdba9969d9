"""The campaign's images and golden tables, chosen and computed once by the driver: every model
of a campaign is tested on the same images, and every trial row refers to them by their index in
the validation split.

The images come from the models' own training data config (data set, split seed, image size,
normalisation), never from library defaults: a model trained with another split seed would
otherwise be tested on images it trained on, and one trained at another size at the wrong
resolution. Models trained on different data configs cannot share a campaign."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from bitstorm.errors import ConfigError, DataError
from bitstorm.metrics import top2diff
from campaign.spec import CampaignSpec
from campaign.store import GOLDEN_SCHEMA
from trainers.checkpoint import load_checkpoint
from trainers.data import DataBundle, DataConfig


@dataclass(frozen=True)
class CampaignImages:
    """The campaign's images: positions in the validation split, the images and labels."""

    indices: list[int]
    images: torch.Tensor
    labels: torch.Tensor


def load_models(spec: CampaignSpec) -> dict[str, torch.nn.Module]:
    return {m.name: load_checkpoint(m.checkpoint)[0] for m in spec.models}


def campaign_data(spec: CampaignSpec, checkpoints: dict[str, dict[str, Any]]) -> DataBundle:
    """The data every model of the campaign trained on, rebuilt from their checkpoint manifests
    under ``spec.data_root``; refused before any work when the models' data configs differ, or
    when ``spec.dataset`` names another data set."""
    configs = {name: DataConfig.of(manifest["config"]) for name, manifest in checkpoints.items()}
    if len(set(configs.values())) > 1:
        listed = "; ".join(
            f"{name}: {', '.join(f'{k}={v}' for k, v in dataclasses.asdict(c).items())}"
            for name, c in configs.items()
        )
        raise ConfigError(
            f"models: their training data differ ({listed}); a campaign tests every model on "
            "the same images, so run one campaign per data config"
        )
    config = next(iter(configs.values()))
    if spec.dataset and spec.dataset != config.dataset:
        raise ConfigError(
            f"dataset: {spec.dataset!r}, but the models were trained on {config.dataset!r}; "
            "leave dataset out to test on the models' own validation split"
        )
    return config.build(spec.data_root)


def select_images(
    spec: CampaignSpec, models: dict[str, torch.nn.Module], data: DataBundle
) -> CampaignImages:
    """``spec.images`` images of ``data``'s validation split in a seeded order; with
    ``golden_correct_only``, only those that every model classifies correctly (the paper's
    protocol: a fault can only corrupt a correct answer)."""
    val = data.val
    order = torch.randperm(len(val), generator=torch.Generator().manual_seed(spec.image_seed))
    chosen: list[int] = []
    kept_images, kept_labels = [], []
    for start in range(0, len(order), 256):
        candidates = order[start : start + 256].tolist()
        images = torch.stack([val[i][0] for i in candidates])
        labels = torch.tensor([int(val[i][1]) for i in candidates])
        keep = torch.ones(len(candidates), dtype=torch.bool)
        if spec.golden_correct_only:
            with torch.no_grad():
                for model in models.values():
                    keep &= model(images).argmax(dim=1) == labels
        chosen += [c for c, k in zip(candidates, keep.tolist(), strict=True) if k]
        kept_images.append(images[keep])
        kept_labels.append(labels[keep])
        if len(chosen) >= spec.images:
            break
    chosen = chosen[: spec.images]
    if not chosen:
        raise DataError(
            "no image qualifies: every candidate is misclassified by some model; check that "
            "the models were trained on this data set, or set golden_correct_only: false"
        )
    return CampaignImages(
        chosen, torch.cat(kept_images)[: len(chosen)], torch.cat(kept_labels)[: len(chosen)]
    )


def golden_table(model: torch.nn.Module, images: CampaignImages) -> pa.Table:
    with torch.no_grad():
        logits = model(images.images).float()
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

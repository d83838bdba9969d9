"""The campaign's images and golden tables, chosen and computed once by the driver: every model
of a campaign is tested on the same images, and every trial row refers to them by their index in
the validation split."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch

from bitstorm.errors import DataError
from bitstorm.metrics import top2diff
from campaign.spec import CampaignSpec
from campaign.store import GOLDEN_SCHEMA
from trainers.checkpoint import load_checkpoint, read_manifest
from trainers.data import build_data


@dataclass(frozen=True)
class CampaignImages:
    """The campaign's images: positions in the validation split, the images and labels."""

    indices: list[int]
    images: torch.Tensor
    labels: torch.Tensor


def load_models(spec: CampaignSpec) -> dict[str, torch.nn.Module]:
    return {m.name: load_checkpoint(m.checkpoint)[0] for m in spec.models}


def campaign_dataset(spec: CampaignSpec) -> str:
    """The spec's data set, else the first checkpoint's (from its manifest: no weights read)."""
    if spec.dataset:
        return spec.dataset
    return read_manifest(spec.models[0].checkpoint)["config"]["dataset"]


def select_images(spec: CampaignSpec, models: dict[str, torch.nn.Module]) -> CampaignImages:
    """``spec.images`` images of the validation split in a seeded order; with
    ``golden_correct_only``, only those that every model classifies correctly (the paper's
    protocol: a fault can only corrupt a correct answer)."""
    val = build_data(campaign_dataset(spec), spec.data_root).val
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


def example_shape(spec: CampaignSpec) -> tuple[int, ...]:
    """The shape of one campaign image: what fault sites are probed with."""
    dataset = campaign_dataset(spec)
    if dataset in ("digits", "synthetic", "cifar10", "cifar100"):
        return (3, 32, 32)
    return tuple(build_data(dataset, spec.data_root).val[0][0].shape)

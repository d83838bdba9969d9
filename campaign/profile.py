"""Range-restriction bounds: each model's max |output| per injected layer over the training split,
as goldeneye profiles them (../shared/PROTOCOL.md), computed once per campaign (campaign.passes),
cached in the campaign folder and recorded in the manifest.

Why the training split: bounds taken from the campaign's own validation images would let the
images under test shape the protection that is applied to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from campaign.faults.sites import activation_peaks
from campaign.images import dataset_batches
from campaign.spec import CampaignSpec
from trainers.data import DataBundle


@dataclass(frozen=True)
class Profile:
    """Bounds by model and layer, and what they were profiled on."""

    split: str
    images: int
    image_seed: int
    bounds: dict[str, dict[str, float]]


def training_profile(
    spec: CampaignSpec,
    models: dict[str, torch.nn.Module],
    layers: dict[str, list[str]],
    data: DataBundle,
    batch: int = 256,
) -> Profile:
    """The campaign's profile, taken on ``spec.profile_images`` training images (all of them
    when None) on the models' own device."""
    train = data.train
    count = len(train) if spec.profile_images is None else min(spec.profile_images, len(train))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(spec.image_seed))
    chosen = order[:count].tolist()
    bounds: dict[str, dict[str, float]] = {
        name: dict.fromkeys(layers[name], 0.0) for name in models
    }
    for images in dataset_batches(train, chosen, batch):
        for name, model in models.items():
            peaks = activation_peaks(model, images, layers[name])
            for layer, peak in peaks.items():
                bounds[name][layer] = max(bounds[name][layer], peak)
    return Profile("train", count, spec.image_seed, bounds)

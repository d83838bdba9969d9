"""The passes over the data set that a campaign makes before its first trial: image selection
(a forward over validation images until enough qualify), the range profile over the training
split, and the validation split's mean Top2Diff.

On ImageNet these read up to 1.3 million images, a GPU's work. A campaign on a Ray cluster, or
with GPU actors, therefore runs them as one task with an actor's resources, on a node like the
actors' and on its GPU, never on the driver, which may be a CPU head node. A local campaign, a
dry run, and CPU actors on the driver's own private Ray run them in the driver (the same CPUs,
with all of its threads and no process to start).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitstorm.errors import BitstormError
from bitstorm.logs import configure
from campaign.images import CampaignImages, load_models, select_images, validation_top2diff
from campaign.profile import Profile, training_profile
from campaign.spec import CampaignSpec
from trainers.data import DataBundle


@dataclass(frozen=True)
class DataPasses:
    """What the passes found: each model's campaign images, the range profile (None unless the
    spec restricts ranges), and each model's validation Top2Diff (where the protocol takes it)."""

    images: dict[str, CampaignImages]
    profile: Profile | None
    val_top2diff: dict[str, float]


def data_passes(
    spec: CampaignSpec,
    models: dict[str, torch.nn.Module],
    layers: dict[str, list[str]],
    data: DataBundle,
    cached_profile: Profile | None = None,
) -> DataPasses:
    """Every pass, on the models' own device. ``layers``: each model's injected layers (the
    profile's keys); ``cached_profile``: a profile an earlier run of this campaign wrote."""
    images = select_images(spec, models, data)
    profile = cached_profile
    if spec.range_restriction and profile is None:
        profile = training_profile(spec, models, layers, data)
    top2diff = {}
    if spec.top2diff_images == "validation":
        top2diff = {name: validation_top2diff(model, data) for name, model in models.items()}
    return DataPasses(images, profile if spec.range_restriction else None, top2diff)


def remote_data_passes(
    spec: CampaignSpec,
    models: dict[str, torch.nn.Module] | None,
    layers: dict[str, list[str]],
    data: DataBundle,
    cached_profile: Profile | None = None,
) -> DataPasses:
    """:func:`data_passes` as one Ray task with an actor's CPUs and GPUs. ``models``: handed
    over (campaign.api), else loaded in the task from the spec, as the actors load them."""
    import ray
    from ray.exceptions import RayTaskError

    resources = spec.resources
    task = ray.remote(_on_device).options(
        name=f"bitstorm-{spec.name}-data-passes",
        num_cpus=resources.cpus_per_actor,
        num_gpus=resources.gpus_per_actor,
        max_retries=1,  # a lost node; an error in the passes is raised, never retried
    )
    try:
        return ray.get(task.remote(spec, models, layers, data, cached_profile))
    except RayTaskError as error:  # the user's error as it was raised, not a remote traceback
        if isinstance(error.cause, BitstormError):
            raise error.cause from None
        raise


def _on_device(
    spec: CampaignSpec,
    models: dict[str, torch.nn.Module] | None,
    layers: dict[str, list[str]],
    data: DataBundle,
    cached_profile: Profile | None,
) -> DataPasses:
    configure()  # a Ray worker: its root logger is at ERROR, and selection may warn
    resources = spec.resources
    torch.set_num_threads(max(1, int(resources.cpus_per_actor)))
    device = "cuda" if resources.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
    if models is None:
        models = {name: loaded.model for name, loaded in load_models(spec).items()}
    models = {name: model.to(device).eval() for name, model in models.items()}
    return data_passes(spec, models, layers, data, cached_profile)

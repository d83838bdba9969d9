"""What runs where: the campaign's images and golden tables (computed once, by the driver) and
the shard worker (a Ray actor per GPU on a cluster, CPU actors locally) that owns the models,
their engines and golden caches, and writes its own Parquet shards."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch

from bitstorm.metrics import top2diff
from campaign.engine import Engine
from campaign.plan import Shard
from campaign.sites import select_layers
from campaign.spec import CampaignSpec
from campaign.store import GOLDEN_SCHEMA, Store, trial_table
from trainers.checkpoint import load_checkpoint, read_manifest
from trainers.data import build_data


@dataclass(frozen=True)
class CampaignImages:
    """The campaign's images: positions in the validation split, the images and labels."""

    indices: list[int]
    images: torch.Tensor
    labels: torch.Tensor


def load_models(spec: CampaignSpec) -> dict[str, torch.nn.Module]:
    return {m.name: load_checkpoint(m.checkpoint)[0] for m in spec.model_entries()}


def campaign_dataset(spec: CampaignSpec) -> str:
    """The spec's data set, else the first checkpoint's (from its manifest: no weights read)."""
    if spec.dataset:
        return spec.dataset
    return read_manifest(spec.model_entries()[0].checkpoint)["config"]["dataset"]


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
        raise ValueError("no image qualifies: every candidate is misclassified by some model")
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


class ShardWorker:
    """Loads every model and its engine once, then evaluates and writes shard after shard."""

    def __init__(self, spec: CampaignSpec, images: CampaignImages) -> None:
        torch.set_num_threads(max(1, int(spec.cpus_per_actor)))
        self.spec = spec
        self.images = images
        self.store = Store.open(spec.output, spec.name)
        device = "cuda" if spec.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.engines = {}
        for name, model in load_models(spec).items():
            engine = Engine(
                model,
                images.images[:1],
                device=device,
                batch_size=spec.batch_size,
                clamp=spec.clamp,
            )
            # The golden pass once per actor when the cache fits (else once per shard).
            layers = list(
                select_layers(
                    model, types=spec.layer_types, include=spec.layers, exclude=spec.exclude_layers
                )
            )
            engine.warm(images.images, layers, spec.kinds)
            self.engines[name] = engine

    def run(self, shard: Shard) -> dict[str, int]:
        """Evaluate ``shard`` and write its Parquet file; returns counts for progress."""
        group = shard.trials(len(self.images.indices))
        out = self.engines[shard.model].run(self.images.images, group)
        image_ids = torch.tensor(self.images.indices)[group.image]
        table = trial_table(
            {
                "index": group.index,
                "bit": group.bit,
                "format": shard.fmt,
                "image": image_ids,
                "label": self.images.labels[group.image],
                "golden_top1": out.golden_top1,
                "faulty_top1": out.faulty_top1,
                "sdc": out.sdc,
                "non_finite": out.non_finite,
                "top2diff": out.top2diff,
                "value_before": out.value_before,
                "value_after": out.value_after,
                "shard": shard.id,
            }
        )
        self.store.write_table(
            self.store.shard_path(shard.model, shard.kind, shard.layer, shard.id), table
        )
        return {"shard": shard.id, "rows": table.num_rows, "sdc": int(out.sdc.sum())}

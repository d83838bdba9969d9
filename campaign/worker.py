"""The shard worker: a Ray actor per GPU on a cluster (CPU actors locally) that owns the models,
their engines and golden caches, and writes its own Parquet shards, so trial rows never pass
through the driver."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from campaign.census import CensusTally
from campaign.faults.bits import format_width
from campaign.faults.engine import Engine
from campaign.faults.golden import GoldenCache
from campaign.faults.inject import RangeRestriction
from campaign.faults.sites import select_layers
from campaign.images import CampaignImages, load_models
from campaign.plan import Shard
from campaign.profile import Profile
from campaign.spec import CampaignSpec
from campaign.store import Store, trial_table


class ShardWorker:
    """Loads every model and its engine once (with the campaign's protocol: range restriction
    with the profile's bounds, the SDC rule), runs each model's golden pass once, then
    evaluates and writes shard after shard."""

    def __init__(
        self,
        spec: CampaignSpec,
        store: Store,
        images: dict[str, CampaignImages],
        profile: Profile | None,
        models: Mapping[str, torch.nn.Module] | None = None,
        threads: int | None = None,
    ) -> None:
        """``store``: the driver's (the file system it opened, endpoint included); ``models``:
        handed over (campaign.api), else loaded from the spec; ``threads``: torch's intra-op
        threads, set in an actor (never in a user's own process)."""
        resources = spec.resources
        if threads is not None:
            torch.set_num_threads(max(1, threads))
        self.images = images
        self.store = store
        device = "cuda" if resources.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.engines: dict[str, Engine] = {}
        self.caches: dict[str, GoldenCache] = {}
        if models is None:
            models = {name: loaded.model for name, loaded in load_models(spec).items()}
        for name, model in models.items():
            restriction = None
            if spec.range_restriction:
                assert profile is not None, "the driver profiles bounds for range restriction"
                restriction = RangeRestriction(profile.bounds[name])
            engine = Engine(
                model,
                images[name].images[:2],
                device=device,
                batch_size=resources.batch_size,
                restriction=restriction,
                non_finite_sdc=bool(spec.non_finite_sdc),
            )
            layers = select_layers(
                model, types=spec.layer_types, include=spec.layers, exclude=spec.exclude_layers
            )
            self.engines[name] = engine
            self.caches[name] = engine.golden(images[name].images, list(layers), spec.kinds)

    def run(self, shard: Shard) -> dict[str, int]:
        """Evaluate ``shard`` and write its Parquet file; returns counts for progress."""
        if shard.census:
            return self._census(shard)
        images = self.images[shard.model]
        group = shard.trials(len(images.indices))
        out = self.engines[shard.model].run(self.caches[shard.model], group)
        image_ids = torch.tensor(images.indices)[group.image]
        table = trial_table(
            {
                "index": group.index,
                "bit": group.bit,
                "format": shard.fmt,
                "image": image_ids,
                "label": images.labels[group.image],
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
            self.store.shard_path(shard.model, shard.kind, shard.layer, shard.id),
            table,
            shard.seal(len(images.indices)),
        )
        return {"shard": shard.id, "rows": table.num_rows, "sdc": int(out.sdc.sum())}

    def _census(self, shard: Shard) -> dict[str, int]:
        """Every site x bit x image of a final classifier, tallied (campaign.census)."""
        engine = self.engines[shard.model]
        tally = CensusTally(format_width(shard.fmt))
        module = engine.model.get_submodule(shard.layer)
        for group, outcomes in engine.sweep_layer(
            self.caches[shard.model],
            shard.layer,
            shard.fmt,
            shard.bits,
            kind=shard.kind,
            sites=range(shard.start, shard.stop),
        ):
            tally.add(module, group, outcomes)
        self.store.write_table(
            self.store.census_path(shard.model, shard.kind, shard.layer, shard.id),
            tally.table(shard.fmt, shard.id),
            shard.seal(len(self.images[shard.model].indices)),
        )
        return {"shard": shard.id, "rows": int(tally.trials.sum()), "sdc": int(tally.sdc.sum())}

"""The shard worker: a Ray actor per GPU on a cluster (CPU actors locally) that owns the models,
their engines and golden caches, and writes its own Parquet files, so trial rows never pass
through the driver."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from bitstorm.logs import configure
from campaign.census import CensusTally
from campaign.faults.bits import (
    BIT_FLIP,
    fault_model,
    flip,
    format_width,
    number_format,
    same_bits,
)
from campaign.faults.engine import Engine
from campaign.faults.golden import GoldenCache
from campaign.faults.inject import RangeRestriction
from campaign.faults.sites import select_layers
from campaign.faults.trials import Outcomes, TrialGroup
from campaign.images import CampaignImages, golden_table, load_models
from campaign.plan import Pack, Shard
from campaign.profile import Profile
from campaign.spec import CampaignSpec
from campaign.store import Store, trial_table


class ShardWorker:
    """Loads every model and its engine once (with the campaign's protocol: range restriction
    with the profile's bounds, the SDC rule), runs each model's golden pass once on its own
    device, then evaluates and writes pack after pack."""

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
        if threads is not None:  # an actor: it keeps to the CPUs Ray granted it
            torch.set_num_threads(max(1, threads))
            pa.set_cpu_count(max(1, threads))  # Parquet's compression threads, too
            configure()  # Ray set this process's root logger to ERROR; keep bitstorm's warnings
        self.images = images
        self.store = store
        device = "cuda" if resources.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.engines: dict[str, Engine] = {}
        self.caches: dict[str, GoldenCache] = {}
        self.golden: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # top-1, Top2Diff
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

    def ready(self) -> str:
        """The Ray node this actor runs on, answered once it is built."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def golden_table(self, model: str) -> pa.Table:
        """The golden table of ``model`` from this worker's golden pass (batched, on its
        device), for the driver to write once."""
        return golden_table(self.caches[model].logits, self.images[model])

    def use_golden(self, tables: Mapping[str, pa.Table]) -> None:
        """The golden tables the campaign wrote: a trial whose faulty top-1 or Top2Diff equals
        its image's golden one there stores null, which the ``trials`` view restores."""
        self.golden = {
            name: (
                torch.tensor(table["golden_top1"].to_numpy()),
                torch.tensor(table["top2diff"].to_numpy()),
            )
            for name, table in tables.items()
        }

    def run(self, pack: Pack) -> dict[str, Any]:
        """Evaluate ``pack`` and write its Parquet file; returns counts for progress, and how
        many of its trials the engine settled without a forward (campaign.faults.masking)."""
        if pack.census:
            return self._census(pack.shards[0])
        images = self.images[pack.model]
        engine = self.engines[pack.model]
        settled = engine.settled.copy()
        tables = [self._rows(shard, images) for shard in pack.shards]
        table = pa.concat_tables(tables)
        self.store.write_table(
            self.store.shard_path(pack.model, pack.kind, pack.id),
            table,
            pack.seal(len(images.indices)),
        )
        sdc = int(pc.sum(table["sdc"]).as_py() or 0)
        settled = dict(engine.settled - settled)
        return {"shard": pack.id, "rows": table.num_rows, "sdc": sdc, "settled": settled}

    def _rows(self, shard: Shard, images: CampaignImages) -> pa.Table:
        group = shard.trials(len(images.indices))
        out = self.engines[shard.model].run(self.caches[shard.model], group)
        top1, top2diff = (column[group.image] for column in self.golden[shard.model])
        return trial_table(
            {
                "layer": shard.layer,
                "format": shard.fmt,
                "shard": shard.id,
                "index": group.index,
                "bit": group.bit,
                "image": torch.tensor(images.indices)[group.image],
                "faulty_top1": _unless(out.faulty_top1, out.faulty_top1 == top1),
                "sdc": out.sdc,
                "non_finite": out.non_finite,
                "top2diff": _unless(
                    out.top2diff, same_bits(out.top2diff.float(), top2diff.float())
                ),
                "value_before": out.value_before,
                "value_after": _unless(out.value_after, _is_exact_flip(out, group, shard.fmt)),
            }
        )

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
            fault=fault_model(shard.fault),
        ):
            tally.add(module, group, outcomes)
        self.store.write_table(
            self.store.census_path(shard.model, shard.kind, shard.layer, shard.id),
            tally.table(shard.fmt, shard.id),
            shard.seal(len(self.images[shard.model].indices)),
        )
        return {"shard": shard.id, "rows": int(tally.trials.sum()), "sdc": int(tally.sdc.sum())}


def _unless(values: torch.Tensor, derivable: torch.Tensor) -> pa.Array:
    """``values`` with null wherever ``derivable``: a value the ``trials`` view gives back."""
    return pa.array(values.numpy(), mask=derivable.numpy())


def _is_exact_flip(out: Outcomes, group: TrialGroup, fmt: str) -> torch.Tensor:
    """Whether each trial's value after is the plain flip of its value before (a bit flip in a
    float format, not clamped by range restriction): int8's depends on a scale, and the other
    fault models' on the stored word, so those are always stored."""
    if not number_format(fmt).is_float or group.fault != BIT_FLIP:
        return torch.zeros(len(group), dtype=torch.bool)
    return same_bits(flip(out.value_before, group.bit, fmt), out.value_after)

"""From a spec to shards: strata (model x kind x layer x format x bit), trials per stratum, and
shards with deterministic ids whose trials are regenerated from seeds wherever they run.

The driver ships only shard descriptors to the actors, never trial rows: a shard's trials are a
pure function of (campaign seed, stratum, shard), so rerunning a shard reproduces it exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from campaign.analysis.stats import leveugle_sample_size
from campaign.faults.bits import fault_model
from campaign.faults.sites import LayerSite
from campaign.faults.trials import TrialGroup
from campaign.spec import CampaignSpec
from campaign.store import ShardSeal


@dataclass(frozen=True)
class Shard:
    """A unit of work: trials of one (model, kind, layer, format) for some bits.

    Sampled shards draw ``counts[i]`` trials at ``bits[i]`` (site and image uniform). In the
    first round the generator is seeded by the stratum alone (so the shard size never changes
    which trials a stratum gets); later rounds of sequential sampling add the shard id (unique
    in the plan) and the bit's position in the shard. Exhaustive shards
    cover sites ``[start, stop)`` x every image; a ``census`` shard is an exhaustive one of a
    final classifier, counted without a forward and stored as counts (campaign.census).
    """

    id: int
    model: str
    kind: str
    layer: str
    fmt: str
    bits: tuple[int, ...]
    sites: int  # elements of the layer for this kind (per image, for neurons)
    counts: tuple[int, ...] = ()  # trials per bit; empty for exhaustive shards
    start: int = 0
    stop: int = 0
    seed: int = 0
    round: int = 0
    census: bool = False
    fault: str = "bit_flip"  # the campaign's fault model (campaign.faults.bits.fault_model)

    @property
    def exhaustive(self) -> bool:
        return not self.counts

    def size(self, images: int) -> int:
        if self.exhaustive:
            return (self.stop - self.start) * images * len(self.bits)
        return sum(self.counts)

    def seal(self, images: int) -> ShardSeal:
        """What this shard's file must be (campaign.store.ShardSeal): its id, its trials, a
        digest of which trials (index, bit, image) they are, and its rows. A census shard's
        trials are every (site, bit, image) of its range, so its descriptor is its digest."""
        if self.census:
            text = json.dumps([self.start, self.stop, list(self.bits), images]).encode()
            return ShardSeal(self.id, self.size(images), hashlib.sha256(text).hexdigest())
        group = self.trials(images)
        digest = trials_digest(group.index, group.bit, group.image)
        return ShardSeal(self.id, len(group), digest, rows=len(group))

    def trials(self, images: int) -> TrialGroup:
        indices, bits, image_ids = [], [], []
        for position, bit in enumerate(self.bits):
            if self.exhaustive:
                sites = torch.arange(self.start, self.stop)
                indices.append(sites.repeat_interleave(images))
                image_ids.append(torch.arange(images).repeat(len(sites)))
                count = len(sites) * images
            else:
                key = [self.seed, _stable(self.model, self.kind, self.layer, self.fmt), bit]
                rng = np.random.default_rng(key if self.round == 0 else [*key, self.id, position])
                count = self.counts[position]
                indices.append(torch.from_numpy(rng.integers(0, self.sites, count)))
                image_ids.append(torch.from_numpy(rng.integers(0, images, count)))
            bits.append(torch.full((count,), bit, dtype=torch.long))
        return TrialGroup(
            self.kind,
            self.layer,
            self.fmt,
            torch.cat(indices).long(),
            torch.cat(bits),
            torch.cat(image_ids).long(),
            fault_model(self.fault),
        )


@dataclass(frozen=True)
class Pack:
    """Shards written to one trial file: consecutive sampled shards of one model and kind (any
    layers, formats and bits) up to about ``shard_size`` trials, or one census shard. A file per
    shard would spend more bytes on Parquet's per-file footer than on the trials wherever a
    stratum is small (the default campaign: 512 trials a layer); packing keeps every shard's
    identity (its id is a column) and determinism. Named by its first shard's id."""

    shards: tuple[Shard, ...]

    @property
    def id(self) -> int:
        return self.shards[0].id

    @property
    def model(self) -> str:
        return self.shards[0].model

    @property
    def kind(self) -> str:
        return self.shards[0].kind

    @property
    def census(self) -> bool:
        return self.shards[0].census

    def size(self, images: int) -> int:
        return sum(shard.size(images) for shard in self.shards)

    def seal(self, images: int) -> ShardSeal:
        """What the pack's file must be: its first shard's id, its trials, a digest of its
        shards' digests (so of which trials, in order) and its rows."""
        if self.census:
            return self.shards[0].seal(images)
        seals = [shard.seal(images) for shard in self.shards]
        digest = hashlib.sha256("".join(s.digest for s in seals).encode()).hexdigest()
        trials = sum(s.trials for s in seals)
        return ShardSeal(self.id, trials, digest, rows=trials)


def make_packs(shards: list[Shard], images: Mapping[str, int], shard_size: int) -> list[Pack]:
    """``shards`` (in plan order) packed into files: consecutive sampled shards of one model,
    kind and round while the pack stays within ``shard_size`` trials (a bigger shard alone);
    census shards alone. A pure function of the plan, so a rerun packs alike."""
    packs: list[list[Shard]] = []
    for shard in shards:
        last = packs[-1] if packs else None
        fits = (
            last is not None
            and not shard.census
            and not last[0].census
            and (last[0].model, last[0].kind, last[0].round)
            == (shard.model, shard.kind, shard.round)
            and sum(s.size(images[s.model]) for s in last) + shard.size(images[shard.model])
            <= shard_size
        )
        if fits:
            last.append(shard)
        else:
            packs.append([shard])
    return [Pack(tuple(p)) for p in packs]


def trials_digest(index: torch.Tensor, bit: torch.Tensor, image: torch.Tensor) -> str:
    """Which trials, in order: sha256 over (index, bit, image position) as int64."""
    digest = hashlib.sha256()
    for column in (index, bit, image):
        digest.update(column.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


def make_plan(
    spec: CampaignSpec, sites: dict[str, list[LayerSite]], images: Mapping[str, int]
) -> list[Shard]:
    """Every shard of the campaign, in a fixed order with ids 0, 1, ...; ``images``: each
    model's number of campaign images."""
    shards: list[Shard] = []
    for model in spec.models:
        for kind in spec.kinds:
            layers = [(site, site_count(site, kind)) for site in sites[model.name]]
            layers = [(site, count) for site, count in layers if count > 0]  # run, for neurons
            for position, (site, count) in enumerate(layers):
                census = spec.exhaustive_last_layer and position == len(layers) - 1
                for fmt in spec.formats:
                    if census:
                        shards.append(
                            Shard(
                                id=len(shards),
                                model=model.name,
                                kind=kind,
                                layer=site.name,
                                fmt=fmt,
                                bits=tuple(spec.bits_of(fmt)),
                                sites=count,
                                stop=count,
                                seed=spec.seed,
                                census=True,
                                fault=spec.fault_model,
                            )
                        )
                        continue
                    shards.extend(
                        _stratum_shards(
                            spec,
                            model.name,
                            kind,
                            site.name,
                            fmt,
                            count,
                            images[model.name],
                            first_id=len(shards),
                        )
                    )
    return shards


def site_count(site: LayerSite, kind: str) -> int:
    """Sites of ``kind`` in a layer: its weights, or its output elements per image."""
    return site.weight_elements if kind == "weight" else site.neuron_elements


def _stratum_shards(
    spec: CampaignSpec,
    model: str,
    kind: str,
    layer: str,
    fmt: str,
    sites: int,
    images: int,
    first_id: int,
) -> list[Shard]:
    bits = spec.bits_of(fmt)
    base = {
        "model": model,
        "kind": kind,
        "layer": layer,
        "fmt": fmt,
        "sites": sites,
        "seed": spec.seed,
        "fault": spec.fault_model,
    }
    shards = []
    if spec.sampling == "exhaustive":
        per_shard = max(1, spec.shard_size // images)
        for bit in bits:
            for start in range(0, sites, per_shard):
                shards.append(
                    Shard(
                        id=first_id + len(shards),
                        bits=(bit,),
                        start=start,
                        stop=min(sites, start + per_shard),
                        **base,
                    )
                )
        return shards
    if spec.sampling == "leveugle":
        # Trials are drawn with replacement: Leveugle's size for an infinite population.
        per_bit = leveugle_sample_size(math.inf, spec.margin, spec.confidence)
    else:  # per_stratum, and the first round of sequential sampling
        per_bit = spec.trials_per_stratum
    bits_per_shard = max(1, spec.shard_size // per_bit)
    for start in range(0, len(bits), bits_per_shard):
        chunk = tuple(bits[start : start + bits_per_shard])
        shards.append(
            Shard(id=first_id + len(shards), bits=chunk, counts=(per_bit,) * len(chunk), **base)
        )
    return shards


def make_round(
    spec: CampaignSpec,
    extra: dict[tuple[str, str, str, str, int], int],
    sites: dict[tuple[str, str, str, str], int],
    round: int,
    first_id: int,
) -> list[Shard]:
    """Shards for one more round of sequential sampling: ``extra`` trials per stratum (model,
    kind, layer, format, bit), packed into shards of about ``shard_size`` trials per (model,
    kind, layer, format); a stratum needing more than a shard is split across shards."""
    by_layer: dict[tuple[str, str, str, str], list[tuple[int, int]]] = {}
    for (model, kind, layer, fmt, bit), count in sorted(extra.items()):
        if count > 0:
            by_layer.setdefault((model, kind, layer, fmt), []).append((bit, count))
    shards: list[Shard] = []
    for key, wanted in by_layer.items():
        model, kind, layer, fmt = key
        pieces = [
            (bit, min(spec.shard_size, count - done))
            for bit, count in wanted
            for done in range(0, count, spec.shard_size)
        ]
        batch: list[tuple[int, int]] = []
        for piece in [*pieces, None]:
            full = piece is None or sum(c for _, c in batch) + piece[1] > spec.shard_size
            if batch and full:
                bits, counts = zip(*batch, strict=True)
                shards.append(
                    Shard(
                        id=first_id + len(shards),
                        model=model,
                        kind=kind,
                        layer=layer,
                        fmt=fmt,
                        bits=bits,
                        sites=sites[key],
                        counts=counts,
                        seed=spec.seed,
                        round=round,
                        fault=spec.fault_model,
                    )
                )
                batch = []
            if piece is not None:
                batch.append(piece)
    return shards


def _stable(*parts: str) -> int:
    """A seed component from strings that is the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:8], "little")

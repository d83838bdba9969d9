"""From a spec to shards: strata (model x kind x layer x format x bit), trials per stratum, and
shards with deterministic ids whose trials are regenerated from seeds wherever they run.

The driver ships only shard descriptors to the actors, never trial rows: a shard's trials are a
pure function of (campaign seed, stratum, shard), so rerunning a shard reproduces it exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from campaign.engine import TrialGroup
from campaign.sites import LayerSite
from campaign.spec import CampaignSpec
from campaign.stats import leveugle_sample_size


@dataclass(frozen=True)
class Shard:
    """A unit of work: trials of one (model, kind, layer, format) for some bits.

    Sampled shards draw ``per_bit`` trials per bit (site and image uniform) from a generator
    seeded by the stratum alone; exhaustive shards cover sites ``[start, stop)`` x every image.
    """

    id: int
    model: str
    kind: str
    layer: str
    fmt: str
    bits: tuple[int, ...]
    sites: int  # elements of the layer for this kind (per image, for neurons)
    per_bit: int = 0
    start: int = 0
    stop: int = 0
    seed: int = 0

    @property
    def exhaustive(self) -> bool:
        return self.per_bit == 0

    def size(self, images: int) -> int:
        per_bit = (self.stop - self.start) * images if self.exhaustive else self.per_bit
        return per_bit * len(self.bits)

    def trials(self, images: int) -> TrialGroup:
        indices, bits, image_ids = [], [], []
        for bit in self.bits:
            if self.exhaustive:
                sites = torch.arange(self.start, self.stop)
                indices.append(sites.repeat_interleave(images))
                image_ids.append(torch.arange(images).repeat(len(sites)))
                count = len(sites) * images
            else:
                rng = np.random.default_rng(
                    [self.seed, _stable(self.model, self.kind, self.layer, self.fmt), bit]
                )
                indices.append(torch.from_numpy(rng.integers(0, self.sites, self.per_bit)))
                image_ids.append(torch.from_numpy(rng.integers(0, images, self.per_bit)))
                count = self.per_bit
            bits.append(torch.full((count,), bit, dtype=torch.long))
        return TrialGroup(
            self.kind,
            self.layer,
            self.fmt,
            torch.cat(indices).long(),
            torch.cat(bits),
            torch.cat(image_ids).long(),
        )


def make_plan(spec: CampaignSpec, sites: dict[str, list[LayerSite]], images: int) -> list[Shard]:
    """Every shard of the campaign, in a fixed order with ids 0, 1, ..."""
    shards: list[Shard] = []
    for model in spec.model_entries():
        for kind in spec.kinds:
            for site in sites[model.name]:
                count = site.weight_elements if kind == "weight" else site.neuron_elements
                if count == 0:
                    continue  # no neuron sites (a module whose forward never runs)
                for fmt in spec.formats:
                    shards.extend(
                        _stratum_shards(
                            spec,
                            model.name,
                            kind,
                            site.name,
                            fmt,
                            count,
                            images,
                            first_id=len(shards),
                        )
                    )
    return shards


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
    if spec.sampling == "margin":
        per_bit = leveugle_sample_size(sites * images, spec.margin, spec.confidence)
    else:
        per_bit = spec.trials_per_stratum
    bits_per_shard = max(1, spec.shard_size // per_bit)
    for start in range(0, len(bits), bits_per_shard):
        shards.append(
            Shard(
                id=first_id + len(shards),
                bits=tuple(bits[start : start + bits_per_shard]),
                per_bit=per_bit,
                **base,
            )
        )
    return shards


def _stable(*parts: str) -> int:
    """A seed component from strings that is the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:8], "little")

"""Shards: how the first round's plan and later sequential rounds pack strata into shards, and
that a shard's trials are a pure function of its descriptor."""

from collections import defaultdict

import pytest
import torch

from campaign.faults.sites import LayerSite
from campaign.plan import Shard, make_plan, make_round
from campaign.spec import CampaignSpec

IMAGES = 4
MODELS = [{"name": "m", "checkpoint": "/nonexistent/m"}]
SITES = {
    "m": [
        LayerSite("conv1", "Conv2d", (8, 3, 3, 3), ((8, 16, 16),)),
        LayerSite("fc", "Linear", (10, 32), ((10,),)),
    ]
}
SITE_COUNTS = {  # (model, kind, layer, format) -> sites, as the runner takes them from the plan
    ("m", kind, site.name, "fp32"): site.weight_elements
    if kind == "weight"
    else site.neuron_elements
    for site in SITES["m"]
    for kind in ("weight", "neuron")
}
EXTRA = {  # (model, kind, layer, format, bit) -> more trials
    ("m", "weight", "conv1", "fp32", 30): 250,  # more than a shard: split
    ("m", "weight", "conv1", "fp32", 0): 40,
    ("m", "weight", "conv1", "fp32", 5): 30,
    ("m", "weight", "fc", "fp32", 30): 10,
    ("m", "neuron", "conv1", "fp32", 1): 75,
    ("m", "neuron", "fc", "fp32", 2): 0,  # nothing wanted: no shard
}


def _spec(**changes):
    settings = {"models": MODELS, "bits": [0, 5, 30], "trials_per_stratum": 8} | changes
    return CampaignSpec.parse(settings)


def _by_stratum(shards, images=IMAGES):
    """(model, kind, layer, format, bit) -> [(site index, image), ...] over ``shards``."""
    trials = defaultdict(list)
    for shard in shards:
        group = shard.trials(images)
        assert len(group.index) == shard.size(images)
        for index, bit, image in zip(group.index, group.bit, group.image, strict=True):
            key = (shard.model, shard.kind, shard.layer, shard.fmt, int(bit))
            trials[key].append((int(index), int(image)))
    return dict(trials)


def _same_trials(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("index", "bit", "image"))


def test_a_round_packs_strata_into_shards_of_at_most_shard_size():
    spec = _spec(shard_size=100)
    shards = make_round(spec, EXTRA, SITE_COUNTS, round=2, first_id=17)
    assert [s.id for s in shards] == list(range(17, 17 + len(shards)))
    assert all(s.size(IMAGES) <= spec.shard_size for s in shards)
    assert all(s.round == 2 and s.seed == spec.seed and not s.exhaustive for s in shards)
    totals = defaultdict(int)
    for shard in shards:
        assert shard.sites == SITE_COUNTS[shard.model, shard.kind, shard.layer, shard.fmt]
        for bit, count in zip(shard.bits, shard.counts, strict=True):
            assert count > 0
            totals[shard.model, shard.kind, shard.layer, shard.fmt, bit] += count
    assert dict(totals) == {key: n for key, n in EXTRA.items() if n > 0}
    # The stratum of 250 needs three shards of at most 100; small strata share a shard.
    split = [s for s in shards if s.layer == "conv1" and s.kind == "weight" and 30 in s.bits]
    assert len(split) >= 3
    assert any(len(s.bits) > 1 for s in shards)
    # Trials stay inside the layer and the image set.
    for (_, kind, layer, fmt, _), trials in _by_stratum(shards).items():
        assert all(0 <= i < SITE_COUNTS["m", kind, layer, fmt] for i, _ in trials)
        assert all(0 <= image < IMAGES for _, image in trials)


def test_round_trials_are_deterministic_yet_differ_between_shards_and_positions():
    shards = make_round(_spec(shard_size=100), EXTRA, SITE_COUNTS, round=1, first_id=40)
    for shard in shards:
        again = Shard(**{f: getattr(shard, f) for f in shard.__dataclass_fields__})
        assert _same_trials(shard.trials(IMAGES), again.trials(IMAGES))
    stratum = ("weight", "conv1", (30,), (100,))
    full = [s for s in shards if (s.kind, s.layer, s.bits, s.counts) == stratum]
    assert len(full) == 2  # two shards of 100 trials of the same stratum in one round
    assert not _same_trials(full[0].trials(IMAGES), full[1].trials(IMAGES))
    # The same bit twice in one shard draws two different sets of trials.
    twice = Shard(7, "m", "weight", "conv1", "fp32", (30, 30), 216, (50, 50), round=1)
    group = twice.trials(IMAGES)
    assert not torch.equal(group.index[:50], group.index[50:])
    # A later round never repeats the first round's draws for the stratum.
    first = Shard(0, "m", "weight", "conv1", "fp32", (30,), 216, (50,), round=0)
    later = Shard(9, "m", "weight", "conv1", "fp32", (30,), 216, (50,), round=1)
    assert not _same_trials(first.trials(IMAGES), later.trials(IMAGES))


@pytest.mark.parametrize("sampling", ["per_stratum", {"margin": 0.01}])
def test_first_round_trials_depend_on_the_stratum_not_on_shard_size(sampling):
    small = make_plan(_spec(shard_size=10, sampling=sampling), SITES, {"m": IMAGES})
    large = make_plan(_spec(shard_size=1000, sampling=sampling), SITES, {"m": IMAGES})
    assert len(small) > len(large)  # packed differently...
    assert all(s.round == 0 and set(s.counts) == {8} for s in small + large)
    assert _by_stratum(small) == _by_stratum(large)  # ...but the same trials per stratum
    assert len(_by_stratum(small)) == 2 * 2 * 3  # kinds x layers x bits


def test_an_exhaustive_last_layer_is_one_census_shard_per_kind_and_format():
    plan = make_plan(_spec(exhaustive_last_layer=True), SITES, {"m": IMAGES})
    census = [s for s in plan if s.census]
    assert [(s.kind, s.layer) for s in census] == [("weight", "fc"), ("neuron", "fc")]
    for shard in census:
        sites = 320 if shard.kind == "weight" else 10
        assert (shard.start, shard.stop, shard.bits) == (0, sites, (0, 5, 30))
        assert shard.size(IMAGES) == sites * 3 * IMAGES
        group = shard.trials(IMAGES)  # every site x bit x image exactly once
        assert len(
            set(zip(group.index.tolist(), group.bit.tolist(), group.image.tolist(), strict=True))
        ) == (sites * 3 * IMAGES)
    sampled = [s for s in plan if not s.census]
    assert {s.layer for s in sampled} == {"conv1"}
    assert [s.layer for s in make_plan(_spec(), SITES, {"m": IMAGES})].count("fc") >= 2

"""campaign.analysis.results on campaign folders written the way the runner writes them (Store,
trial_table, manifest): the DuckDB views, what is visible while shards are being written, and
the stratum counts the statistics take."""

import pandas as pd
import pytest

from bitstorm.errors import DataError
from campaign.analysis.results import (
    StratumCounts,
    by_estimate,
    counts,
    estimate,
    open_results,
    results_of,
    variance_rates,
)
from campaign.store import LAYOUT, Store, trial_table
from tests.campaign.conftest import model_entry

IMAGES = 8
SITES = {
    ("base", "weight", "conv1"): 100,
    ("base", "weight", "fc"): 50,
    ("base", "neuron", "conv1"): 300,
    ("text", "weight", "conv1"): 100,
    ("text", "weight", "fc.projection"): 200,
}
COUNTS = {  # (model, kind, layer, bit) -> (trials, sdc)
    ("base", "weight", "conv1", 0): (20, 1),
    ("base", "weight", "conv1", 30): (20, 8),
    ("base", "weight", "fc", 0): (10, 0),
    ("base", "weight", "fc", 30): (12, 6),
    ("base", "neuron", "conv1", 30): (7, 3),
    ("text", "weight", "conv1", 0): (20, 0),
    ("text", "weight", "conv1", 30): (20, 5),
    ("text", "weight", "fc.projection", 30): (16, 4),
}
MODELS = {"base": model_entry("linear"), "text": model_entry("text")}


@pytest.fixture
def campaign(synthetic_campaign):
    return synthetic_campaign("demo", COUNTS, SITES, MODELS, images=IMAGES)


def test_views_restore_the_hive_columns_and_hold_every_row(campaign):
    results = open_results(campaign)
    trials = results.df("select * from trials")
    assert isinstance(trials, pd.DataFrame)
    assert {"model", "kind", "layer", "bit", "sdc", "shard"} <= set(trials.columns)
    assert len(trials) == sum(n for n, _ in COUNTS.values())
    by_hand = {}
    for (model, kind, layer, _), (n, k) in COUNTS.items():
        trials_sdc = by_hand.setdefault((model, kind, layer), [0, 0])
        trials_sdc[0] += n
        trials_sdc[1] += k
    seen = trials.groupby(["model", "kind", "layer"]).agg(n=("sdc", "size"), k=("sdc", "sum"))
    assert {key: [int(r.n), int(r.k)] for key, r in seen.iterrows()} == by_hand
    golden = results.df("select * from golden")
    assert {"model", "image", "golden_top1"} <= set(golden.columns)
    assert len(golden) == IMAGES * len(MODELS)
    assert sorted(golden["model"].unique()) == sorted(MODELS)


def test_a_hidden_half_written_file_is_not_seen(campaign):
    folder = f"{campaign}/trials/model=base/kind=weight"
    with open(f"{folder}/.shard-000099.parquet.dead.tmp", "wb") as handle:
        handle.write(b"PAR1 half a file")
    results = open_results(campaign)
    assert results.sql("select count(*) from trials").fetchall() == [
        (sum(n for n, _ in COUNTS.values()),)
    ]


def test_strata_count_like_a_groupby_with_population_from_the_plan(campaign):
    results = open_results(campaign)
    strata = results.strata()
    frame = results.df("select * from trials")
    grouped = frame.groupby(["model", "kind", "layer", "format", "bit"])["sdc"].agg(["size", "sum"])
    assert {(s.model, s.kind, s.layer, s.fmt, s.bit): (s.trials, s.sdc) for s in strata} == {
        key: (int(row["size"]), int(row["sum"])) for key, row in grouped.iterrows()
    }
    assert len(strata) == len(COUNTS)
    for s in strata:
        assert s.population == SITES[s.model, s.kind, s.layer] * IMAGES
        assert (s.trials, s.sdc) == COUNTS[s.model, s.kind, s.layer, s.bit]
    # The where clause filters trials before counting.
    only_bit_30 = results.strata(where="bit = 30")
    assert {s.bit for s in only_bit_30} == {30}
    assert len(only_bit_30) == sum(1 for key in COUNTS if key[3] == 30)
    # Grouped per reported estimate, and as the columns the statistics take.
    groups = by_estimate(strata)
    assert list(groups) == [("base", "neuron"), ("base", "weight"), ("text", "weight")]
    successes, trials, population = counts(groups["text", "weight"])
    assert successes == [0, 5, 4] and trials == [20, 20, 16]
    assert population == [100 * IMAGES, 100 * IMAGES, 200 * IMAGES]


def test_only_the_files_the_plan_names_are_read(campaign):
    """A shard of another campaign copied in (an id this plan never had), a renamed copy of a
    real shard and a stray file: none of them is counted."""
    parent, _, name = campaign.rpartition("/")
    store = Store.open(parent, name, create=False)
    before = open_results(campaign).strata()
    rows = {"layer": "fc", "index": [1, 2], "bit": 0, "format": "fp32", "image": 0}
    rows |= {"faulty_top1": 0, "sdc": False, "non_finite": False}
    rows |= {"top2diff": 1.0, "value_before": 1.0, "value_after": 2.0, "shard": 99}
    store.write_table(store.shard_path("base", "weight", 99), trial_table(rows))
    real = store.shard_path("base", "weight", 0)
    copy = real.replace("shard-000000.parquet", "shard-000000 (1).parquet")
    store.filesystem.copy_file(real, copy)
    with store.filesystem.open_output_stream(real.rpartition("/")[0] + "/stray.tmp") as stream:
        stream.write(b"not parquet")
    assert open_results(campaign).strata() == before


def test_a_folder_without_manifest_is_refused_by_name(tmp_path):
    (tmp_path / "nothing" / "trials").mkdir(parents=True)
    with pytest.raises(DataError, match=rf"{tmp_path}/nothing is not a campaign folder"):
        open_results(str(tmp_path / "nothing"))
    with pytest.raises(DataError, match=r"no manifest\.json"):
        open_results(str(tmp_path), "missing")


@pytest.mark.parametrize("half_written", [False, True])
def test_a_campaign_without_trials_yet_gives_empty_views(tmp_path, half_written):
    store = Store.open(str(tmp_path), "fresh")
    manifest = {"layout": LAYOUT, "images": [0, 1], "plan": {"shard_list": [], "packs": []}}
    store.write_json(store.manifest_path, manifest)
    if half_written:  # the first shard is being written: its folder holds only a hidden file
        folder = tmp_path / "fresh" / "trials" / "model=m" / "kind=weight"
        folder.mkdir(parents=True)
        (folder / ".shard-000000.parquet.abc.tmp").write_bytes(b"PAR1 half")
    results = results_of(store)
    assert results.strata() == []
    assert results.sql("select count(*) from trials").fetchall() == [(0,)]
    assert results.sql("select count(*) from golden").fetchall() == [(0,)]
    columns = results.sql("select * from trials").columns
    assert {"model", "kind", "layer", "format", "bit", "sdc", "shard"} <= set(columns)
    assert {"model", "image"} <= set(results.sql("select * from golden").columns)


def test_parent_and_name_or_one_path_open_the_same_campaign(campaign):
    parent, _, name = campaign.rpartition("/")
    one, two, three = (
        open_results(parent, name),
        open_results(campaign),
        open_results(campaign + "/"),
    )
    assert one.store == two.store == three.store
    assert one.strata() == two.strata() == three.strata()
    assert one.manifest == two.manifest
    query = "select model, kind, layer, bit, count(*) n from trials group by all order by all"
    assert one.sql(query).fetchall() == two.sql(query).fetchall()
    assert one.images("base") == two.images("text") == IMAGES


def test_a_layer_estimate_takes_its_bit_pools_from_the_context():
    def stratum(layer, bit, sdc):
        return StratumCounts("m", "weight", layer, "fp32", bit, 20, sdc, 1000)

    layer = [stratum("a", 0, 0), stratum("a", 30, 5)]
    model = [*layer, stratum("b", 0, 0), stratum("c", 0, 0), stratum("b", 30, 9)]
    alone, in_context = estimate(layer), estimate(layer, rates=variance_rates(model))
    assert alone.rate == in_context.rate
    # Bit 0 is clean in layers b and c too: in context it is shrunk towards their 0 of 40,
    # alone towards 0.5 (no evidence), so the interval is narrower in context.
    assert in_context.variance < alone.variance
    prior = 0.5 / 41
    quiet = (0 + 2 * prior) / 22
    busy = 5.5 / 21
    expected = 0.25 * quiet * (1 - quiet) / 20 + 0.25 * busy * (1 - busy) / 20
    assert in_context.variance == pytest.approx(expected)

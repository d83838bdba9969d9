"""The notebook API (issue 14): one call on an nn.Module and tensors, Ray-free by default, over
the same plan, engine, statistics and Parquet layout as campaigns; the same seed gives the same
rows in-process and through Ray actors."""

import pandas
import pytest
import torch

import bitstorm
from bitstorm.errors import ConfigError
from campaign.faults.bits import same_bits
from campaign.faults.masking import UNCHANGED_TECHNIQUE
from tests.campaign.factories import small_net


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 16, 16, generator=generator)
    return images, torch.arange(12) % 10


def _run(data, tmp_path, **options):
    torch.manual_seed(3)
    model = small_net(width=4)
    images, labels = data
    fields = {"bits": [0, 30], "formats": ["fp32"], "trials_per_stratum": 8} | options
    return bitstorm.run_campaign(
        model,
        images,
        labels,
        image_selection="any",
        output=str(tmp_path),
        progress=False,
        **fields,
    )


def _rows(result):
    return result.sql("select * from trials order by model, kind, layer, shard, index, bit, image")


def test_in_process_and_ray_actors_give_the_same_rows(ray_local, data, tmp_path):
    local = _run(data, tmp_path / "local")
    ray = _run(data, tmp_path / "ray", use_ray=True, resources={"actors": 2})
    rows = _rows(local)
    assert len(rows) == 2 * 2 * 2 * 8  # kinds x layers x bits x trials
    pandas.testing.assert_frame_equal(rows, _rows(ray))


def test_the_tables_agree_with_the_rows(data, tmp_path):
    result = _run(data, tmp_path)
    summary = result.summary()
    assert list(summary["kind"]) == ["weight", "neuron"]
    counted = result.sql("select kind, count(*) n, sum(sdc::int) k from trials group by kind")
    for row in summary.itertuples():
        mine = counted[counted["kind"] == row.kind].iloc[0]
        assert row.trials == mine.n and row.sdc == mine.k and row.low <= row.rate <= row.high
    layers, bits = result.by_layer(), result.by_bit()
    assert set(layers["layer"]) == {"0", "4"} and set(bits["bit"]) == {0, 30}
    assert layers.groupby("kind")["trials"].sum().to_dict() == {"neuron": 32, "weight": 32}
    source = result.results.manifest["models"]["model"]["source"]
    assert source.startswith("in-memory torch.nn.modules.container.Sequential")


def test_compare_gives_an_improvement_per_kind(data, tmp_path):
    baseline = _run(data, tmp_path / "a")
    torch.manual_seed(4)
    other = bitstorm.run_campaign(
        small_net(width=4),
        *data,
        bits=[30],
        formats=["fp32"],
        trials_per_stratum=8,
        image_selection="any",
        output=str(tmp_path / "b"),
        progress=False,
    )
    table = bitstorm.compare(baseline, other)
    assert list(table["kind"]) == ["weight", "neuron"]
    assert {"overall_improvement", "overall_low", "overall_high"} <= set(table.columns)


def test_bad_tensors_and_fields_are_refused(data, tmp_path):
    images, labels = data
    with pytest.raises(ConfigError, match=r"images must be \[N, C, H, W\]"):
        bitstorm.run_campaign(small_net(), images[0], labels, output=str(tmp_path))
    with pytest.raises(ConfigError, match="train_images"):
        bitstorm.run_campaign(small_net(), images, labels, protocol="goldeneye")
    with pytest.raises(ConfigError, match="bitz"):
        bitstorm.run_campaign(small_net(), images, labels, bitz=[1])


def test_a_fault_model_runs_on_the_same_trials_and_every_report_names_it(data, tmp_path):
    """stuck_at_1 beside bit_flip on one spec: the same (index, bit, image) trials (paired), a
    no-op wherever the bit already held 1 (masked, in the denominator, settled without a
    forward), every value_after stored, the census swept under it, the report naming it."""
    from campaign.analysis.render import console_summary

    flips = _run(data, tmp_path / "flip", exhaustive_last_layer=True)
    stuck = _run(data, tmp_path / "stuck", exhaustive_last_layer=True, fault_model="stuck_at_1")
    query = "select kind, layer, index, bit, image from trials order by all"
    pandas.testing.assert_frame_equal(flips.sql(query), stuck.sql(query))
    rows = stuck.sql("select value_before, value_after, sdc from trials")
    before = torch.tensor(rows["value_before"].to_numpy(), dtype=torch.float32)
    after = torch.tensor(rows["value_after"].to_numpy(), dtype=torch.float32)
    held = same_bits(before, after).numpy()
    assert 0 < held.sum() < len(rows) and not rows["sdc"][held].any()
    manifest = stuck.results.manifest
    assert manifest["settled_without_forward"][UNCHANGED_TECHNIQUE] >= held.sum()
    assert manifest["spec"]["fault_model"] == "stuck_at_1"
    assert "fault model stuck_at_1" in console_summary(stuck.report())
    assert "fault model bit_flip" in console_summary(flips.report())
    census = stuck.sql("select sum(trials) n from census")["n"][0]
    assert census == flips.sql("select sum(trials) n from census")["n"][0] > 0


def test_a_multi_bit_upset_starts_only_where_it_fits_in_the_word(data, tmp_path):
    result = _run(data, tmp_path, fault_model="multi_bit:2")
    assert set(result.by_bit()["bit"]) == {0, 30}
    with pytest.raises(ConfigError, match=r"bits: 31 is outside fp32's bits 0\.\.30 under multi"):
        _run(data, tmp_path / "bad", fault_model="multi_bit:2", bits=[31])
    with pytest.raises(ConfigError, match="fault_model: unknown fault model 'bitflip'"):
        _run(data, tmp_path / "bad", fault_model="bitflip")

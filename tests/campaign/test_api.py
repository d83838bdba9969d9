"""The notebook API (issue 14): one call on an nn.Module and tensors, Ray-free by default, over
the same plan, engine, statistics and Parquet layout as campaigns; the same seed gives the same
rows in-process and through Ray actors."""

import pandas
import pytest
import torch

import bitstorm
from bitstorm.errors import ConfigError
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
    return bitstorm.run_campaign(
        model,
        images,
        labels,
        bits=[0, 30],
        formats=["fp32"],
        trials_per_stratum=8,
        image_selection="any",
        output=str(tmp_path),
        progress=False,
        **options,
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

"""Parquet shards: schema, atomic writes through pyarrow file systems, and what readers see."""

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from bitstorm.errors import DataError
from campaign import store as store_module
from campaign.store import GOLDEN_SCHEMA, TRIAL_SCHEMA, Store, trial_table


def _rows(n=5, shard=3, layer="fc"):
    return trial_table(
        {
            "layer": layer,
            "index": torch.arange(n),
            "bit": torch.full((n,), 30),
            "format": "fp32",
            "image": torch.arange(n),
            "faulty_top1": torch.arange(n) % 2,
            "sdc": torch.arange(n) % 2 == 1,
            "non_finite": torch.zeros(n, dtype=torch.bool),
            "top2diff": torch.linspace(0, 1, n),
            "value_before": torch.ones(n),
            "value_after": torch.full((n,), 2.0),
            "shard": shard,
        }
    )


def test_shards_read_back_with_every_required_column(tmp_path):
    store = Store.open(str(tmp_path), "demo")
    store.write_table(store.shard_path("resnet18_text", "weight", 3), _rows(layer="layer1.0.conv1"))
    store.write_table(store.shard_path("resnet18_text", "neuron", 4), _rows(shard=4))
    table = ds.dataset(f"{store.root}/trials", format="parquet", partitioning="hive").to_table()
    assert set(TRIAL_SCHEMA.names) <= set(table.column_names) and table.num_rows == 10
    assert sorted(set(table["layer"].to_pylist())) == ["fc", "layer1.0.conv1"]
    rows = duckdb.sql(
        "select kind, count(*) n, sum(sdc::int) s "
        f"from read_parquet('{store.root}/trials/**/*.parquet', hive_partitioning=true) "
        "group by kind order by kind"
    ).fetchall()
    assert rows == [("neuron", 5, 2), ("weight", 5, 2)]
    metadata = pq.read_metadata(store.shard_path("resnet18_text", "weight", 3))
    assert metadata.row_group(0).column(0).compression == "ZSTD"


def test_a_half_written_shard_is_never_seen(tmp_path, monkeypatch):
    store = Store.open(str(tmp_path), "demo")
    path = store.shard_path("m", "weight", 1)

    def crash(stream, schema, **kwargs):
        stream.write(b"PAR1 half a file")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(store_module.pq, "ParquetWriter", crash)
    with pytest.raises(KeyboardInterrupt):
        store.write_table(path, _rows())
    assert not store.exists(path)
    folder = tmp_path / "demo" / "trials" / "model=m" / "kind=weight"
    assert list(folder.iterdir()) == []  # the temporary file was removed too
    # Even a leftover temporary file (a killed process cannot clean up) is invisible to readers.
    (folder / ".shard-000001.parquet.dead.tmp").write_bytes(b"PAR1 half")
    monkeypatch.undo()
    store.write_table(store.shard_path("m", "weight", 2), _rows())
    assert (
        ds.dataset(f"{store.root}/trials", format="parquet", partitioning="hive")
        .to_table()
        .num_rows
        == 5
    )
    count = duckdb.sql(f"select count(*) from read_parquet('{store.root}/trials/**/*.parquet')")
    assert count.fetchall() == [(5,)]


def test_uris_and_the_manifest(tmp_path):
    store = Store.open(f"file://{tmp_path}", "demo")
    assert store.read_json(store.manifest_path) is None
    store.write_json(store.manifest_path, {"shards": {"1": "done"}})
    assert store.read_json(store.manifest_path) == {"shards": {"1": "done"}}
    assert (tmp_path / "demo" / "manifest.json").is_file()


def test_golden_schema_names():
    assert GOLDEN_SCHEMA.names == ["image", "label", "golden_top1", "confidence", "top2diff"]


def test_a_read_only_output_is_a_clear_error_and_leaves_nothing_behind(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    store = Store.open(str(tmp_path), "c")
    os.chmod(store.root, 0o500)
    try:
        with pytest.raises(DataError, match=r"cannot write .*writable and has room"):
            store.write_json(store.manifest_path, {"a": 1})
    finally:
        os.chmod(store.root, 0o700)
    assert os.listdir(store.root) == []


def test_a_failed_write_is_a_clear_error(tmp_path, monkeypatch):
    """A full disk, as the file system reports it: ENOSPC on write."""
    import errno

    store = Store.open(str(tmp_path), "c")

    def full(_stream):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DataError, match=r"No space left on device; check that the output"):
        store._write_atomically(store.manifest_path, full)
    assert [p.name for p in (tmp_path / "c").iterdir()] == []


def test_temporaries_a_killed_writer_left_are_removed_and_nothing_else(tmp_path):
    store = Store.open(str(tmp_path), "demo")
    shard = store.shard_path("m", "weight", 3)
    store.write_table(shard, _rows())
    folder = tmp_path / "demo" / "trials" / "model=m" / "kind=weight"
    (folder / ".shard-000004.parquet.0123abcd.tmp").write_bytes(b"half a shard")
    (folder / "notes.tmp").write_text("a user's file, not hidden: not ours")
    assert store.remove_temporaries() == 1
    assert sorted(p.name for p in folder.iterdir()) == ["notes.tmp", "shard-000003.parquet"]
    assert Store.open(str(tmp_path), "none", create=False).remove_temporaries() == 0

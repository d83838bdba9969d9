"""Campaigns on an object store (a moto S3 server on the loopback address): the rows, the resume
and the report are those of the same campaign in a local folder; a shard upload that fails
leaves nothing; a missing bucket or an endpoint that does not answer is one error line."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from bitstorm.errors import DataError
from campaign.analysis.results import open_results
from campaign.report import main as report_main
from campaign.runner import run_campaign
from campaign.store import Store
from tests.campaign.conftest import model_entry, write_campaign
from tests.campaign.runs import planned_files, tiny_spec

ROOT = Path(__file__).resolve().parents[2]
ORDER = ["model", "kind", "layer", "shard", "index", "bit", "image", "format"]
# A synthetic campaign (tests.campaign.conftest.write_campaign): sites per layer, and
# (trials, sdc) per (model, kind, layer, bit).
SITES = {("base", "weight", "conv1"): 100, ("base", "weight", "fc"): 50}
SITES |= {("text", "weight", "conv1"): 100}
COUNTS = {
    ("base", "weight", "conv1", 0): (20, 1),
    ("base", "weight", "fc", 30): (12, 6),
    ("text", "weight", "conv1", 30): (20, 5),
}
MODELS = {"base": model_entry("linear"), "text": model_entry("text")}


def rows(location: str):
    """Every trial of campaign ``test`` at ``location``, read back through open_results."""
    frame = open_results(location, "test").df("select * from trials")
    return frame.sort_values(ORDER).reset_index(drop=True)


def objects(store: Store) -> dict[str, object]:
    """Each file under the campaign with its modification time."""
    found = store.filesystem.get_file_info(pafs.FileSelector(store.root, recursive=True))
    return {info.path: info.mtime for info in found if info.type == pafs.FileType.File}


@pytest.fixture(scope="module")
def campaigns(ray_local, checkpoints, tmp_path_factory, s3_endpoint):
    """The tiny campaign run once into a local folder and once into a new bucket."""
    bucket = f"bitstorm-campaign-{os.getpid()}"
    pafs.S3FileSystem(endpoint_override=s3_endpoint, allow_bucket_creation=True).create_dir(bucket)
    local = tmp_path_factory.mktemp("local")
    remote = f"s3://{bucket}/results"
    for output in (str(local), remote):
        run_campaign(tiny_spec(checkpoints, output), progress=False)
    return str(local), remote


def test_a_campaign_on_s3_holds_the_rows_of_the_same_campaign_in_a_folder(campaigns):
    local, remote = campaigns
    on_s3 = rows(remote)
    assert len(on_s3) > 0 and on_s3.equals(rows(local))
    store = Store.open(remote, "test", create=False)
    names = [path.rpartition("/")[2] for path in objects(store)]
    assert "manifest.json" in names and not [n for n in names if n.startswith(".")]


def test_a_resume_on_s3_redoes_only_the_deleted_shards(campaigns, checkpoints):
    local, remote = campaigns
    spec = tiny_spec(checkpoints, remote)
    store = Store.open(remote, "test")
    _, paths = planned_files(spec, store)
    removed = set(paths[::3])
    for path in removed:
        store.filesystem.delete_file(path)
    kept = {path: mtime for path, mtime in objects(store).items() if "/shard-" in path}
    time.sleep(1.1)  # an object store's times have a second's resolution
    run_campaign(spec, progress=False)
    after = objects(store)
    assert removed <= set(after) and removed.isdisjoint(kept)
    assert {path: after[path] for path in kept} == kept  # finished shards untouched
    assert rows(remote).equals(rows(local))


def reports(locations: dict[str, str], out: Path, capsys) -> dict[str, str]:
    """``python -m campaign.report`` of each campaign location, as report.json and report.md
    text with the location itself and the spec's output taken out (all that differs)."""
    texts = {}
    for key, location in locations.items():
        assert report_main([location, "--out", str(out / key)]) == 0
        for name in ("report.json", "report.md"):
            text = (out / key / name).read_text().replace(location, "<campaign>")
            text = text.replace(location.rpartition("/")[0], "<output>")  # the spec's output
            texts[f"{key} {name}"] = text
    capsys.readouterr()
    return texts


def test_the_report_from_s3_is_the_report_of_the_local_copy(campaigns, tmp_path, capsys):
    local, remote = campaigns
    texts = reports({"s3": f"{remote}/test", "local": f"{local}/test"}, tmp_path, capsys)
    for name in ("report.json", "report.md"):
        assert "<campaign>" in texts[f"s3 {name}"] and texts[f"s3 {name}"] == texts[f"local {name}"]


def test_results_and_report_read_from_s3_are_those_of_the_same_files_in_a_folder(
    s3_bucket, tmp_path, capsys
):
    written = {
        "s3": write_campaign(f"{s3_bucket}/results", "demo", COUNTS, SITES, MODELS),
        "local": write_campaign(tmp_path / "results", "demo", COUNTS, SITES, MODELS),
    }
    locations = {"s3": f"{s3_bucket}/results/demo", "local": written["local"]}
    for view in ("trials", "golden", "census"):
        tables = [
            open_results(locations[key]).df(f"select * from {view} order by all")
            for key in ("s3", "local")
        ]
        assert tables[0].equals(tables[1]) and (view == "census" or len(tables[0]) > 0)
    # A copy of a shard under another name is not read, on S3 as in a folder.
    store = Store.open(f"{s3_bucket}/results", "demo")
    shard = store.shard_path("base", "weight", 1)
    store.filesystem.copy_file(shard, shard.replace("shard-", "copy-of-shard-"))
    texts = reports(locations, tmp_path / "reports", capsys)
    for name in ("report.json", "report.md"):
        assert "<campaign>" in texts[f"s3 {name}"] and texts[f"s3 {name}"] == texts[f"local {name}"]


def test_a_shard_whose_write_fails_leaves_what_was_there(s3_bucket, monkeypatch):
    store = Store.open(f"{s3_bucket}/results", "c")
    kept, new = (store.shard_path("m", "weight", shard) for shard in (0, 1))
    store.write_table(kept, pa.table({"a": [1, 2, 3]}))

    def dies_half_way(stream, _schema, **_options):
        stream.write(b"PAR1 half a file")
        raise OSError("the disk filled")

    monkeypatch.setattr(pq, "ParquetWriter", dies_half_way)
    for path in (kept, new):
        with pytest.raises(DataError, match=r"cannot write .*the disk filled"):
            store.write_table(path, pa.table({"a": [4, 5]}))
    assert list(objects(store)) == [kept]  # no half object, no temporary
    assert store.read_columns(kept, ["a"]).column("a").to_pylist() == [1, 2, 3]


def test_a_campaign_into_a_missing_bucket_is_refused_before_ray_starts(
    checkpoints, s3_endpoint, monkeypatch
):
    import campaign.runner

    monkeypatch.setattr(campaign.runner, "connect", lambda *_a: pytest.fail("Ray started"))
    spec = tiny_spec(checkpoints, "s3://no-such-bucket/results")
    with pytest.raises(DataError, match=r"cannot write no-such-bucket/results/test: .*not found"):
        run_campaign(spec, progress=False)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("problem", "says"),
    [
        ("missing bucket", "no-such-bucket/results/test is not a campaign folder"),
        ("endpoint not answering", "cannot read no-such-bucket/results/test: .*AWS_ENDPOINT_URL"),
    ],
)
def test_a_report_from_an_unreachable_store_is_one_error_line(s3_endpoint, problem, says):
    endpoint = s3_endpoint if problem == "missing bucket" else f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "campaign.report", "s3://no-such-bucket/results/test"],
        cwd=ROOT,
        env=os.environ | {"AWS_ENDPOINT_URL": endpoint},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.match(f"error: {says}", done.stderr) and len(done.stderr.splitlines()) == 1
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in done.stdout + done.stderr
    assert time.monotonic() - started < 30  # pyarrow's retries, not a hang

"""Fault injection, as storage systems are tested: killed actors and drivers, damaged, foreign
and stray files, a deleted manifest, a full disk and a read-only output. Each ends with every
planned trial exactly once after at most one rerun, or with one clear refusal; none reports a
wrong count (issue 13)."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from bitstorm import ray_reaper
from bitstorm.config import to_dict
from bitstorm.errors import DataError
from campaign.analysis.results import overall_rates, results_of
from campaign.runner import run_campaign
from campaign.store import Store
from tests.campaign.runs import (
    actor_pids,
    planned,
    planned_files,
    shard_files,
    stored_rows,
    summary_of,
    tiny_spec,
    trial_rows,
)

ROOT = Path(__file__).resolve().parents[2]


def test_a_killed_actor_still_gives_exactly_once_results(ray_local, checkpoints, tmp_path):
    spec = tiny_spec(checkpoints, tmp_path, trials_per_stratum=40, shard_size=40)
    killed = {}

    def kill_first_actor():
        """SIGKILL one actor process (Ray titles it ray::ShardWorker) once shards are landing."""
        deadline = time.time() + 300
        while time.time() < deadline and len(shard_files(tmp_path)) < 3:
            time.sleep(0.05)
        for pid in actor_pids():
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid
            return

    thread = threading.Thread(target=kill_first_actor)
    thread.start()
    run_campaign(spec, progress=False)
    thread.join()
    assert killed, "the test never managed to kill an actor"
    plan, images, _ = planned(spec)
    rows = trial_rows(tmp_path)
    assert rows.groupby("shard").size().to_dict() == {
        s.id: s.size(len(images.indices)) for s in plan
    }


def test_a_killed_driver_leaves_no_ray_behind_and_resumes_on_rerun(
    ray_local, checkpoints, tmp_path
):
    """SIGKILL the driver (on its own private Ray) mid-campaign: within a few seconds no process
    of its Ray instance is left; the rerun records every planned trial exactly once, and each
    shard holds exactly the trials its seed defines."""
    spec = tiny_spec(
        checkpoints, tmp_path, trials_per_stratum=40, shard_size=40, resources={"actors": 1}
    )
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(to_dict(spec)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private instance
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        [sys.executable, "campaign/run.py", "--spec", str(spec_file)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(shard_files(tmp_path)) < 3 and driver.poll() is None:
        time.sleep(0.05)
    assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    ray_processes = ray_reaper.descendants(driver.pid)
    assert len(ray_processes) >= 3, "the driver's Ray instance was not found"  # GCS, raylet, ...
    driver.kill()
    driver.wait()
    log.close()
    deadline = time.time() + 10
    while any(map(ray_reaper.running, ray_processes)) and time.time() < deadline:
        time.sleep(0.2)
    left = [pid for pid, start in ray_processes if ray_reaper.running((pid, start))]
    assert not left, f"Ray processes outlived the driver: {left}"
    plan, images, _ = planned(spec)
    assert 3 <= len(shard_files(tmp_path)) < len(plan), "the driver was not stopped mid-way"
    run_campaign(spec, progress=False)
    rows = trial_rows(tmp_path)
    assert rows.groupby("shard").size().to_dict() == {
        s.id: s.size(len(images.indices)) for s in plan
    }
    position = {index: i for i, index in enumerate(images.indices)}
    for shard in plan[:: max(1, len(plan) // 8)]:
        expected = shard.trials(len(images.indices))
        got = rows[rows["shard"] == shard.id]
        assert got["index"].tolist() == expected.index.tolist()
        assert got["bit"].tolist() == expected.bit.tolist()
        assert [position[i] for i in got["image"]] == expected.image.tolist()


def test_damaged_foreign_and_stray_files_are_redone_or_ignored_on_rerun(
    ray_local, checkpoints, tmp_path
):
    """A shard truncated to half its bytes, one rewritten with half its rows (seal kept), one
    rewritten without a seal and with other trials, one with its rows but not its seal, a
    renamed copy and a stray file: the rerun moves the damaged ones aside and redoes them,
    ignores the rest, and every planned trial is there exactly once."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    spec = tiny_spec(checkpoints, tmp_path)
    run_campaign(spec, progress=False)
    store = Store.open(str(tmp_path), "test")
    plan, images, _ = planned(spec)
    packs, paths = planned_files(spec, store)
    expected = {p.id: p.size(len(images.indices)) for p in packs}
    truncated, halved, unsealed, copied, seal_lost = paths[:5]
    with open(truncated, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    table = pq.read_table(halved)
    pq.write_table(table.slice(0, table.num_rows // 2), halved)  # schema metadata: the seal
    foreign = pq.read_table(unsealed).replace_schema_metadata(None)
    index = foreign.schema.get_field_index("index")
    shifted = pc.add(foreign["index"], 1)
    pq.write_table(foreign.set_column(index, "index", shifted), unsealed)
    pq.write_table(pq.read_table(seal_lost).replace_schema_metadata(None), seal_lost)
    Path(copied.replace(".parquet", " (1).parquet")).write_bytes(Path(copied).read_bytes())
    Path(copied).with_name("stray.tmp").write_text("not a shard")
    run_campaign(spec, progress=False)
    rows = stored_rows(tmp_path)  # read_parquet over every *.parquet: the copy would count here
    assert len(rows) == sum(expected.values()) + expected[packs[3].id]
    results = results_of(store)
    strata = results.strata()
    census = sum(s.size(len(images.indices)) for s in plan if s.census)
    assert sum(s.trials for s in strata) == sum(expected.values()) + census
    moved = sorted(p.name for p in (tmp_path / "test" / "damaged").rglob("*.parquet.*"))
    assert len(moved) == 4 and all(p.startswith("shard-00000") for p in moved)
    assert list(summary_of(store).values()) == list(overall_rates(results).values())


def test_a_deleted_manifest_keeps_every_sealed_shard_and_adds_none_twice(
    ray_local, checkpoints, tmp_path
):
    """The manifest is the only record of the plan on disk: with it gone, the rerun trusts the
    sealed shards (they carry their own plan digest), redoes nothing, and ends complete."""
    spec = tiny_spec(checkpoints, tmp_path)
    store = run_campaign(spec, progress=False)
    before = {p: os.path.getmtime(p) for p in shard_files(tmp_path)}
    summary = summary_of(store)
    os.remove(Path(store.root) / "manifest.json")
    store = run_campaign(spec, progress=False)
    assert {p: os.path.getmtime(p) for p in shard_files(tmp_path)} == before
    assert results_of(store).manifest["status"] == "complete"
    assert summary_of(store) == summary


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 1 MiB mounted at ``tmp_path/disk`` (skips where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def _remount(disk: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(disk)], check=True)


def test_a_full_disk_is_a_clear_error_and_one_rerun_finishes_exactly_once(
    ray_local, checkpoints, small_disk
):
    spec = tiny_spec(checkpoints, small_disk, trials_per_stratum=40, shard_size=40)
    _fill(small_disk, keep=64 * 1024)
    with pytest.raises(DataError, match=r"No space left on device.*rerun to go on") as error:
        run_campaign(spec, progress=False)
    assert str(error.value).startswith("cannot write ")  # the cause, not Ray's wrapping
    (small_disk / "filler").unlink()
    _remount(small_disk, "size=64m")
    run_campaign(spec, progress=False)
    assert not list(small_disk.rglob(".*.tmp")), "a temporary file outlived the rerun"
    _assert_exactly_once(spec, small_disk)


def test_a_read_only_output_is_a_clear_error_and_one_rerun_finishes_exactly_once(
    ray_local, checkpoints, small_disk
):
    _remount(small_disk, "size=64m")
    spec = tiny_spec(checkpoints, small_disk)
    run_campaign(spec, progress=False)
    for path in shard_files(small_disk)[::2]:
        os.remove(path)  # as if stopped part way
    _remount(small_disk, "ro")
    with pytest.raises(DataError, match=r"Read-only file system.*writable"):
        run_campaign(spec, progress=False)
    _remount(small_disk, "rw")
    run_campaign(spec, progress=False)
    _assert_exactly_once(spec, small_disk)


def _fill(disk: Path, keep: int) -> None:
    """Fill ``disk`` up to ``keep`` bytes of free space."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, free - keep))


def _assert_exactly_once(spec, output: Path) -> None:
    plan, images, _ = planned(spec)
    rows = trial_rows(output)
    assert rows.groupby("shard").size().to_dict() == {
        s.id: s.size(len(images.indices)) for s in plan
    }
    assert sum(
        r.trials for r in overall_rates(results_of(Store.open(str(output), "test"))).values()
    ) == len(rows)

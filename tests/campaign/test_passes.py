"""The passes over the data set before the trials (campaign.passes): on Ray they run in a task
with an actor's resources, not on the driver (a CPU head node), and find what a local run finds."""

import os

import pytest

from campaign.analysis.results import open_results
from campaign.runner import run_campaign
from campaign.spec import CampaignSpec


def _spec(record, output):
    return CampaignSpec.parse(
        {
            "name": "passes",
            "models": [
                {
                    "name": "own",
                    "factory": "tests.campaign.factories:recorded_net",
                    "kwargs": {"record": str(record)},
                }
            ],
            "dataset": "digits",
            "images": 8,
            "protocol": "goldeneye",  # range restriction and the validation Top2Diff: 2 passes
            "image_selection": "any",
            "profile_images": 40,
            "kinds": ["neuron"],
            "bits": [30],
            "trials_per_stratum": 2,
            "output": str(output),
            "resources": {"actors": 1},
        }
    )


def _forwards(record):
    """(pid, images) of every forward the model made."""
    return [tuple(map(int, line.split())) for line in record.read_text().splitlines()]


@pytest.mark.parametrize("local", [True, False], ids=["local", "ray"])
def test_the_data_passes_run_where_the_campaign_runs(ray_local, tmp_path, local):
    record = tmp_path / "forwards.txt"
    run_campaign(_spec(record, tmp_path / "out"), progress=False, local=local)
    # the driver's own forwards: the fault-site census (two images) and, locally, the passes
    driver = [n for pid, n in _forwards(record) if pid == os.getpid() and n > 2]
    if local:
        assert 40 in driver and 256 in driver  # the profile, the validation split
    else:
        assert driver == []


def test_passes_on_ray_find_what_a_local_run_finds(ray_local, tmp_path):
    manifests = []
    for local in (True, False):
        out = tmp_path / str(local)
        run_campaign(_spec(tmp_path / f"{local}.txt", out), progress=False, local=local)
        manifests.append(open_results(out / "passes").manifest)
    here, there = manifests
    assert here["profile"] == there["profile"] and here["profile"]["images"] == 40
    top2diff = [m["models"]["own"]["val_top2diff"] for m in manifests]
    assert top2diff[0] == pytest.approx(top2diff[1], rel=1e-6)

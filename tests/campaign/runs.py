"""Small two-model campaigns on tiny CNNs, for the tests that run them end to end: their spec (over
conftest's ``checkpoints``) and readers of what they wrote."""

import os

import duckdb

from campaign.analysis.results import open_results, overall_rates, results_of
from campaign.images import select_images
from campaign.plan import make_packs, make_plan
from campaign.runner import validate
from campaign.spec import CampaignSpec


def tiny_settings(checkpoints, output, **changes):
    """The tiny campaign as a spec file holds it."""
    return {
        "models": [
            {"name": "base", "checkpoint": checkpoints["linear"]},
            {"name": "text", "checkpoint": checkpoints["text_random"]},
        ],
        "name": "test",
        "images": 16,
        "image_selection": "any",
        "trials_per_stratum": 6,
        "formats": ["fp32", "int8"],
        "bits": [0, 6, 7],
        "output": str(output),
        "resources": {"actors": 2},
        "shard_size": 24,
    } | changes


def tiny_spec(checkpoints, output, **changes):
    return CampaignSpec.parse(tiny_settings(checkpoints, output, **changes))


def summary_of(store):
    """Each model x kind's overall SDC rate, as the console summary and the report give it."""
    return overall_rates(results_of(store))


def trial_rows(output):
    """Every trial of campaign ``test`` as the ``trials`` view gives it (columns restored)."""
    return open_results(f"{output}/test").df("select * from trials")


def stored_rows(output):
    """The rows of every trial file under campaign ``test``'s folder, planned or not."""
    return duckdb.sql(
        f"select * from read_parquet('{output}/test/trials/**/*.parquet', hive_partitioning=true)"
    ).df()


def planned(spec):
    checked = validate(spec)
    per_model = select_images(spec, checked.models, checked.data)
    images = next(iter(per_model.values()))  # one image set: image_selection is shared here
    plan = make_plan(spec, checked.sites, {name: len(i.indices) for name, i in per_model.items()})
    return plan, images, checked.models


def planned_files(spec, store):
    """The plan's trial files (its sampled packs, campaign.plan.Pack) and their paths."""
    plan, images, _ = planned(spec)
    packs = make_packs(plan, {m.name: len(images.indices) for m in spec.models}, spec.shard_size)
    sampled = [p for p in packs if not p.census]
    return sampled, [store.shard_path(p.model, p.kind, p.id) for p in sampled]


def actor_pids():
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if b"ray::ShardWorker" in handle.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def shard_files(root):
    return [
        os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.startswith("shard-")
    ]

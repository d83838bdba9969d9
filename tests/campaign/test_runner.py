"""Campaigns end to end on local Ray: exactly the planned trials, exact rows, resume, and specs
refused before any work starts (kills and damaged files: test_fault_injection)."""

import os

import duckdb
import pytest
import torch

from bitstorm.errors import ConfigError
from campaign.analysis.results import results_of
from campaign.faults.masking import NEURON_TECHNIQUE, WEIGHT_TECHNIQUE
from campaign.faults.reference import Trial, reference_logits
from campaign.images import select_images
from campaign.runner import run_campaign, validate
from campaign.sequential import Target, group_status
from campaign.store import Store
from tests.campaign.runs import (
    planned,
    planned_files,
    shard_files,
    summary_of,
    tiny_spec,
    trial_rows,
)


def test_results_hold_exactly_the_planned_trials_and_agree_with_the_reference(
    ray_local, checkpoints, tmp_path
):
    spec = tiny_spec(checkpoints, tmp_path)
    store = run_campaign(spec, progress=False)
    summary = list(summary_of(store).values())
    plan, images, models = planned(spec)
    rows = trial_rows(tmp_path)
    expected = {s.id: s.size(len(images.indices)) for s in plan}
    assert rows.groupby("shard").size().to_dict() == expected  # none missing, none twice
    # tiny_cnn's convs feed ReLUs, and its padding meets kernel taps: some trials need no
    # forward (their rows are checked against the reference below with the rest).
    settled = store.read_json(store.manifest_path)["settled_without_forward"]
    for kind in ("neuron", "weight"):
        technique = NEURON_TECHNIQUE if kind == "neuron" else WEIGHT_TECHNIQUE
        assert 0 < settled[technique] < (rows["kind"] == kind).sum()
    assert len(rows) == sum(expected.values()) == sum(r.trials for r in summary)
    assert all(r.low <= r.rate <= r.high for r in summary) and len(summary) == 4
    assert set(rows["format"]) == {"fp32", "int8"} and set(rows["bit"]) == {0, 6, 7}
    # A random sample of rows, recomputed through pytorchfi one by one.
    position = {index: i for i, index in enumerate(images.indices)}
    for _, row in rows[rows["format"] == "fp32"].sample(12, random_state=0).iterrows():
        image = images.images[position[int(row["image"])]].unsqueeze(0)
        trial = Trial(row["kind"], row["layer"], int(row["index"]), int(row["bit"]), "fp32")
        logits = reference_logits(models[row["model"]], image, [trial])[0, 0]
        assert int(row["faulty_top1"]) == int(logits.argmax()) or bool(row["non_finite"])
        assert bool(row["sdc"]) == (
            int(row["faulty_top1"]) != int(row["golden_top1"]) or bool(row["non_finite"])
        )
    golden = duckdb.sql(
        f"select * from read_parquet('{tmp_path}/test/golden/**/*.parquet', hive_partitioning=true)"
    ).df()
    assert len(golden) == 2 * 16 and set(golden["model"]) == {"base", "text"}


def test_rerun_skips_finished_shards_and_gives_the_same_result(ray_local, checkpoints, tmp_path):
    spec = tiny_spec(checkpoints, tmp_path)
    run_campaign(spec, progress=False)
    order = ["shard", "index", "bit", "image"]
    first = trial_rows(tmp_path).sort_values(order).reset_index(drop=True)
    store = Store.open(str(tmp_path), "test")
    _, paths = planned_files(spec, store)
    for path in paths[::3]:  # as if the driver had stopped before these
        os.remove(path)
    before = {p: os.path.getmtime(p) for p in shard_files(tmp_path)}
    run_campaign(spec, progress=False)
    after = trial_rows(tmp_path).sort_values(order).reset_index(drop=True)
    assert after.equals(first)
    assert all(os.path.getmtime(p) == t for p, t in before.items())  # finished shards untouched
    with pytest.raises(
        ConfigError, match=r"different campaign spec \(trials_per_stratum: 6 -> 7\)"
    ):
        run_campaign(tiny_spec(checkpoints, tmp_path, trials_per_stratum=7), progress=False)
    run_campaign(tiny_spec(checkpoints, tmp_path, trials_per_stratum=7), fresh=True, progress=False)
    assert len(trial_rows(tmp_path)) != len(first)


def test_a_sequential_campaign_meets_the_margin_and_replays_its_rounds_on_rerun(
    ray_local, checkpoints, tmp_path
):
    # The pilot of 6 per stratum is far from a 2% margin for every model x kind; a round or two
    # reach it.
    spec = tiny_spec(checkpoints, tmp_path, sampling={"margin": 0.02, "confidence": 0.95})
    assert spec.sampling == "sequential"
    summary = summary_of(run_campaign(spec, progress=False))
    store = Store.open(str(tmp_path), "test")
    target = Target(spec.margin, spec.confidence, spec.max_trials)
    statuses = group_status(results_of(store).strata(), target)
    assert len(statuses) == 4 and all(s.met and s.rate.margin <= spec.margin for s in statuses)
    manifest = store.read_json(store.manifest_path)
    plan = manifest["plan"]["shard_list"]
    assert manifest["status"] == "complete" and manifest["spec"]["sampling"] == "sequential"
    assert [s["id"] for s in plan] == list(range(len(plan)))
    rounds = [s["round"] for s in plan]
    assert rounds == sorted(rounds) and max(rounds) >= 1  # ids grow with the rounds
    sizes = {s["id"]: sum(s["counts"]) for s in plan}
    rows = trial_rows(tmp_path)
    assert rows.groupby("shard").size().to_dict() == sizes  # every planned trial, exactly once
    assert manifest["plan"]["trials"] == len(rows) == sum(r.trials for r in summary.values())
    # A rerun replays the same rounds from the files: nothing new runs, nothing changes.
    before = {p: os.path.getmtime(p) for p in shard_files(tmp_path)}
    assert summary_of(run_campaign(spec, progress=False)) == summary
    assert {p: os.path.getmtime(p) for p in shard_files(tmp_path)} == before
    assert store.read_json(store.manifest_path)["plan"] == manifest["plan"]
    # A later round's shard lost (a driver killed mid-round): the rerun redoes exactly it.
    lost = plan[manifest["plan"]["packs"][-1][0]]
    os.remove(store.shard_path(lost["model"], lost["kind"], lost["id"]))
    assert summary_of(run_campaign(spec, progress=False)) == summary
    assert store.read_json(store.manifest_path)["plan"] == manifest["plan"]
    order = ["shard", "model", "kind", "layer", "index", "bit", "image"]
    again = trial_rows(tmp_path).sort_values(order).reset_index(drop=True)
    assert again.equals(rows.sort_values(order).reset_index(drop=True))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layers": ["layer9.*"]}, "layers: 'layer9.*' matches no"),
        ({"models": [{"name": "base", "checkpoint": "/nonexistent"}]}, "neither a checkpoint"),
        ({"bits": [40]}, "bits: 40 is outside fp32"),
        ({"formats": ["fp8"]}, "formats: 'fp8'"),
    ],
)
def test_bad_specs_fail_before_any_work(checkpoints, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        run_campaign(tiny_spec(checkpoints, tmp_path, **change), progress=False)
    assert not (tmp_path / "test").exists() or not shard_files(tmp_path)


def test_wrong_embedding_file_is_refused(checkpoints, tmp_path):
    from embeddings.store import ClassEmbeddings, save_embeddings

    rows = torch.nn.functional.normalize(torch.randn(10, 16), dim=1)
    path = save_embeddings(
        ClassEmbeddings(
            rows,
            tuple(f"class{i}" for i in range(10)),
            "x",
            "x",
            False,
            "x",
            "0" * 64,
            "2026-01-01T00:00:00+00:00",
        ),
        tmp_path / "other.safetensors",
    )
    models = [{"name": "text", "checkpoint": checkpoints["text_random"], "embeddings": str(path)}]
    with pytest.raises(ConfigError, match="not the embedding file this checkpoint was trained"):
        run_campaign(tiny_spec(checkpoints, tmp_path, models=models), progress=False)


def test_a_goldeneye_campaign_profiles_on_the_training_split_and_counts_the_last_layer(
    ray_local, checkpoints, tmp_path
):
    """protocol: goldeneye end to end: bounds from the training split (in profile.json and the
    manifest), each model its own correct images, the last layer as exact census counts that
    the engine's own suffix path reproduces, and a report that names the protocol."""
    from campaign.analysis.build import build_report
    from campaign.analysis.render import console_summary
    from campaign.analysis.summary import Options
    from campaign.faults.engine import Engine
    from campaign.faults.inject import RangeRestriction
    from campaign.faults.sites import activation_peaks
    from campaign.faults.trials import TrialGroup

    spec = tiny_spec(
        checkpoints,
        tmp_path,
        protocol="goldeneye",
        image_selection="own_correct",
        images=6,
        exhaustive_last_layer=True,
        formats=["fp32"],
        bits=[23, 30],
    )
    store = run_campaign(spec, progress=False)
    results = results_of(store)
    manifest = results.manifest
    checked = validate(spec)
    train = torch.stack([checked.data.train[i][0] for i in range(len(checked.data.train))])
    for name, model in checked.models.items():
        bounds = manifest["profile"]["bounds"][name]
        assert bounds == pytest.approx(activation_peaks(model, train, list(bounds)))
    assert manifest["profile"]["images"] == len(checked.data.train)
    assert Store.open(str(tmp_path), "test").exists(store.profile_path)
    images = select_images(spec, checked.models, checked.data)
    assert manifest["images"] == {name: i.indices for name, i in images.items()}
    for name, model in checked.models.items():  # own images: correct, with a margin
        with torch.no_grad():
            logits = model(images[name].images)
        assert torch.equal(logits.argmax(dim=1), images[name].labels)
    # The last layer: every weight x bit x image once, and the suffix path agrees.
    census = results.sql(
        "select model, kind, layer, sum(trials), sum(sdc) from census group by all"
    ).fetchall()
    assert {(m, k) for m, k, *_ in census} == {(m, k) for m in ("base", "text") for k in spec.kinds}
    for model, kind, layer, trials, sdc in census:
        engine = Engine(
            checked.models[model],
            images[model].images[:2],
            device="cpu",
            restriction=RangeRestriction(manifest["profile"]["bounds"][model]),
            non_finite_sdc=False,
        )
        cache = engine.golden(images[model].images)
        site = engine.sites[layer]
        sites = site.weight_elements if kind == "weight" else site.neuron_elements
        n = len(images[model].indices)
        assert trials == sites * 2 * n
        group = TrialGroup(
            kind,
            layer,
            "fp32",
            torch.arange(sites).repeat_interleave(2 * n),
            torch.tensor([23, 30]).repeat_interleave(n).repeat(sites),
            torch.arange(n).repeat(2 * sites),
        )
        assert int(engine.run(cache, group).sdc.sum()) == sdc
    last = [s for s in results.strata() if s.census]
    assert last and all(s.trials == s.population for s in last)
    text = console_summary(build_report([store.root], Options()))
    assert "protocol goldeneye (range restriction on" in text
    assert "mean of per-layer rates" in text

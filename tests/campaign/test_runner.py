"""Campaigns end to end on local Ray: exactly the planned trials, exact rows, resume, actor
deaths, and specs refused before any work starts."""

import os
import signal
import threading
import time
from pathlib import Path

import duckdb
import pytest
import torch

from bitstorm.config import to_dict
from bitstorm.errors import ConfigError
from campaign.analysis.results import overall_rates, results_of
from campaign.faults.reference import Trial, reference_logits
from campaign.images import select_images
from campaign.plan import make_plan
from campaign.runner import run_campaign, validate
from campaign.sequential import Target, group_status
from campaign.spec import CampaignSpec
from campaign.store import Store
from trainers.checkpoint import save_checkpoint
from trainers.config import TrainConfig
from trainers.models import build_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for head in ("linear", "text_random"):
        cfg = TrainConfig(backbone="tiny_cnn", head=head, dataset="synthetic", embedding_dim=16)
        model = build_model("tiny_cnn", head, 10, embedding_dim=16, seed=1)
        paths[head] = str(
            save_checkpoint(
                folder / head,
                model,
                cfg,
                epoch=1,
                history=[],
                class_names=tuple(f"class{i}" for i in range(10)),
            )
        )
    return paths


def _spec(checkpoints, output, **changes):
    settings = {
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
    return CampaignSpec.parse(settings)


def _summary(store):
    """Each model x kind's overall SDC rate, as the console summary and the report give it."""
    return overall_rates(results_of(store))


def _trials(output):
    return duckdb.sql(
        f"select * from read_parquet('{output}/test/trials/**/*.parquet', hive_partitioning=true)"
    ).df()


def _planned(spec):
    checked = validate(spec)
    per_model = select_images(spec, checked.models, checked.data)
    images = next(iter(per_model.values()))  # one image set: image_selection is shared here
    plan = make_plan(spec, checked.sites, {name: len(i.indices) for name, i in per_model.items()})
    return plan, images, checked.models


def test_results_hold_exactly_the_planned_trials_and_agree_with_the_reference(
    ray_local, checkpoints, tmp_path
):
    spec = _spec(checkpoints, tmp_path)
    summary = list(_summary(run_campaign(spec, progress=False)).values())
    plan, images, models = _planned(spec)
    rows = _trials(tmp_path)
    expected = {s.id: s.size(len(images.indices)) for s in plan}
    assert rows.groupby("shard").size().to_dict() == expected  # none missing, none twice
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
    spec = _spec(checkpoints, tmp_path)
    run_campaign(spec, progress=False)
    first = _trials(tmp_path).sort_values(["shard", "index", "bit", "image"]).reset_index(drop=True)
    store = Store.open(str(tmp_path), "test")
    plan, _, _ = _planned(spec)
    removed = [s for s in plan if s.id % 3 == 0]  # as if the driver had stopped before these
    for shard in removed:
        os.remove(store.shard_path(shard.model, shard.kind, shard.layer, shard.id))
    before = {p: os.path.getmtime(p) for p in _shard_files(tmp_path)}
    run_campaign(spec, progress=False)
    after = _trials(tmp_path).sort_values(["shard", "index", "bit", "image"]).reset_index(drop=True)
    assert after.equals(first)
    assert all(os.path.getmtime(p) == t for p, t in before.items())  # finished shards untouched
    with pytest.raises(ConfigError, match="different campaign spec"):
        run_campaign(_spec(checkpoints, tmp_path, trials_per_stratum=7), progress=False)
    run_campaign(_spec(checkpoints, tmp_path, trials_per_stratum=7), fresh=True, progress=False)
    assert len(_trials(tmp_path)) != len(first)


def _actor_pids():
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


def _shard_files(root):
    return [
        os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.startswith("shard-")
    ]


def test_a_killed_actor_still_gives_exactly_once_results(ray_local, checkpoints, tmp_path):
    spec = _spec(checkpoints, tmp_path, trials_per_stratum=40, shard_size=40)
    killed = {}

    def kill_first_actor():
        """SIGKILL one actor process (Ray titles it ray::ShardWorker) once shards are landing."""
        deadline = time.time() + 300
        while time.time() < deadline and len(_shard_files(tmp_path)) < 3:
            time.sleep(0.05)
        for pid in _actor_pids():
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid
            return

    thread = threading.Thread(target=kill_first_actor)
    thread.start()
    run_campaign(spec, progress=False)
    thread.join()
    assert killed, "the test never managed to kill an actor"
    plan, images, _ = _planned(spec)
    rows = _trials(tmp_path)
    assert rows.groupby("shard").size().to_dict() == {
        s.id: s.size(len(images.indices)) for s in plan
    }


def test_a_sequential_campaign_meets_the_margin_and_replays_its_rounds_on_rerun(
    ray_local, checkpoints, tmp_path
):
    # The pilot of 6 per stratum is far from a 2% margin for every model x kind; a round or two
    # reach it.
    spec = _spec(checkpoints, tmp_path, sampling={"margin": 0.02, "confidence": 0.95})
    assert spec.sampling == "sequential"
    summary = _summary(run_campaign(spec, progress=False))
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
    rows = _trials(tmp_path)
    assert rows.groupby("shard").size().to_dict() == sizes  # every planned trial, exactly once
    assert manifest["plan"]["trials"] == len(rows) == sum(r.trials for r in summary.values())
    # A rerun replays the same rounds from the files: nothing new runs, nothing changes.
    before = {p: os.path.getmtime(p) for p in _shard_files(tmp_path)}
    assert _summary(run_campaign(spec, progress=False)) == summary
    assert {p: os.path.getmtime(p) for p in _shard_files(tmp_path)} == before
    assert store.read_json(store.manifest_path)["plan"] == manifest["plan"]
    # A later round's shard lost (a driver killed mid-round): the rerun redoes exactly it.
    lost = plan[-1]
    os.remove(store.shard_path(lost["model"], lost["kind"], lost["layer"], lost["id"]))
    assert _summary(run_campaign(spec, progress=False)) == summary
    assert store.read_json(store.manifest_path)["plan"] == manifest["plan"]
    order = ["shard", "model", "kind", "layer", "index", "bit", "image"]
    again = _trials(tmp_path).sort_values(order).reset_index(drop=True)
    assert again.equals(rows.sort_values(order).reset_index(drop=True))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layers": ["layer9.*"]}, "layers: 'layer9.*' matches no"),
        ({"models": [{"name": "base", "checkpoint": "/nonexistent"}]}, "not a checkpoint"),
        ({"bits": [40]}, "bits: 40 is outside fp32"),
        ({"formats": ["fp8"]}, "formats: 'fp8'"),
    ],
)
def test_bad_specs_fail_before_any_work(checkpoints, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        run_campaign(_spec(checkpoints, tmp_path, **change), progress=False)
    assert not (tmp_path / "test").exists() or not _shard_files(tmp_path)


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
        run_campaign(_spec(checkpoints, tmp_path, models=models), progress=False)


def test_a_killed_driver_resumes_on_rerun(ray_local, checkpoints, tmp_path):
    """SIGKILL the driver process mid-campaign, rerun: every planned trial exactly once, and
    each shard holds exactly the trials its seed defines."""
    import subprocess
    import sys

    import yaml

    spec = _spec(
        checkpoints, tmp_path, trials_per_stratum=40, shard_size=40, resources={"actors": 1}
    )
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(to_dict(spec)))
    root = Path(__file__).resolve().parents[2]
    # The driver joins this test's Ray instance, so killing it leaves no cluster behind.
    env = os.environ | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, "campaign/run.py", "--spec", str(spec_file)],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(_shard_files(tmp_path)) < 3 and driver.poll() is None:
        time.sleep(0.05)
    driver.kill()
    driver.wait()
    plan, images, _ = _planned(spec)
    assert 3 <= len(_shard_files(tmp_path)) < len(plan), "the driver was not stopped mid-way"
    run_campaign(spec, progress=False)
    rows = _trials(tmp_path)
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

    spec = _spec(
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


def test_damaged_foreign_and_stray_files_are_redone_or_ignored_on_rerun(
    ray_local, checkpoints, tmp_path
):
    """A shard truncated to half its bytes, one rewritten with half its rows (seal kept), one
    rewritten without a seal and with other trials, a renamed copy and a stray file: the rerun
    moves the damaged ones aside and redoes them, ignores the rest, and every planned trial is
    there exactly once. An unsealed shard whose rows are the plan's trials (as bitstorm wrote
    them before seals) is kept."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    spec = _spec(checkpoints, tmp_path)
    run_campaign(spec, progress=False)
    store = Store.open(str(tmp_path), "test")
    plan, images, _ = _planned(spec)
    expected = {s.id: s.size(len(images.indices)) for s in plan}
    paths = [store.shard_path(s.model, s.kind, s.layer, s.id) for s in plan]
    truncated, halved, unsealed, copied, legacy = paths[:5]
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
    pq.write_table(pq.read_table(legacy).replace_schema_metadata(None), legacy)
    legacy_bytes = Path(legacy).read_bytes()
    Path(copied.replace(".parquet", " (1).parquet")).write_bytes(Path(copied).read_bytes())
    Path(copied).with_name("stray.tmp").write_text("not a shard")
    run_campaign(spec, progress=False)
    rows = _trials(tmp_path)  # read_parquet over every *.parquet: the copy would count here
    assert len(rows) == sum(expected.values()) + expected[plan[3].id]
    results = results_of(store)
    strata = results.strata()
    assert sum(s.trials for s in strata) == sum(expected.values())
    moved = sorted(p.name for p in (tmp_path / "test" / "damaged").rglob("*.parquet.*"))
    assert len(moved) == 3 and all(p.startswith("shard-00000") for p in moved)
    assert Path(legacy).read_bytes() == legacy_bytes  # kept, not redone
    assert list(_summary(store).values()) == list(overall_rates(results).values())

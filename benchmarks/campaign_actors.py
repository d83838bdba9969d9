"""The distribution layer's cost: a campaign through Ray actors (1 and 2) against the bare engine
on the same trials, in one run on one machine, and Parquet bytes per trial.

    python benchmarks/campaign_actors.py [--trials-per-stratum 384] [--repeats 3] [--out FILE]

Uses two ResNet-18 checkpoints made here with random weights (accuracy does not matter for
speed) on digits, every Conv/Linear layer, weights and neurons, fp32, all 32 bits: the bare
engine on one thread against the campaign through 1 and 2 actors of one CPU each, their
trials/s over the time spent running trials (start-up, from the manifest's ``seconds``, printed
apart, summed over the repeats). The setups take turns over ``--repeats`` rounds of fresh
trials, so that drift in the machine's speed (seen here: +-15% between runs) falls on all of
them. Prints a table and writes JSON (atomically).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from bitstorm import __version__
from bitstorm.atomic import write_json_atomic
from campaign.images import select_images
from campaign.plan import make_plan
from campaign.runner import run_campaign, validate
from campaign.spec import CampaignSpec
from trainers.checkpoint import save_checkpoint
from trainers.config import TrainConfig
from trainers.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials-per-stratum", type=int, default=384)  # ~1M trials
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of setups")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/campaign.json"))
    args = parser.parse_args()

    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        models = []
        for head in ("linear", "text_random"):
            cfg = TrainConfig(backbone="resnet18", head=head, dataset="digits")
            model = build_model("resnet18", head, 10, embedding_dim=384, seed=1)
            path = save_checkpoint(
                root / head, model, cfg, class_names=tuple(map(str, range(10))), epoch=1, history=[]
            )
            models.append({"name": head, "checkpoint": str(path)})
        base = {
            "models": models,
            "images": args.images,
            "image_selection": "any",
            "trials_per_stratum": args.trials_per_stratum // args.repeats,
            "output": str(root / "results"),
        }
        setups = ["bare engine, 1 thread"] + [f"campaign, {a} actor(s) x 1 CPU" for a in (1, 2)]
        totals = {setup: {"trials": 0, "startup_s": 0.0, "seconds": 0.0} for setup in setups}
        parquet_bytes = 0
        # The setups take turns, each repeat on fresh trials (its own seed): a machine whose
        # speed drifts during the run slows them alike instead of whichever ran last.
        for repeat in range(args.repeats):
            trials, seconds = _bare(CampaignSpec.parse({**base, "name": "bare", "seed": repeat}))
            _add(totals[setups[0]], trials, 0.0, seconds)
            for actors in (1, 2):
                resources = {"actors": actors, "cpus_per_actor": 1.0}
                name = f"actors{actors}-{repeat}"
                spec = {**base, "name": name, "seed": repeat, "resources": resources}
                store = run_campaign(CampaignSpec.parse(spec), progress=False)
                times = store.read_json(store.manifest_path)["seconds"]
                running = times["running trials"]
                _add(totals[setups[actors]], trials, times["total"] - running, running)
                if actors == 2:  # the same trials as the 1-actor campaign wrote
                    files = (root / "results" / name / "trials").rglob("*.parquet")
                    parquet_bytes += sum(path.stat().st_size for path in files)
        rows = [
            {"setup": setup, **t, "trials_per_s": t["trials"] / t["seconds"]}
            for setup, t in totals.items()
        ]
        trials = rows[0]["trials"]
    for row in rows:
        row["vs_bare_engine"] = row["trials_per_s"] / rows[0]["trials_per_s"]
    two_vs_one = rows[2]["trials_per_s"] / rows[1]["trials_per_s"]
    print(
        f"bitstorm {__version__}, torch {torch.__version__}, 2 ResNet-18 models on digits, "
        f"{args.images} images, {trials:,} trials in {args.repeats} interleaved repeats "
        "(start-up: loading, golden passes and actors, timed apart)"
    )
    print(f"{'setup':<36}{'start-up s':>11}{'trials s':>10}{'trials/s':>11}{'x bare':>8}")
    for row in rows:
        print(
            f"{row['setup']:<36}{row['startup_s']:>11.1f}{row['seconds']:>10.1f}"
            f"{row['trials_per_s']:>11,.0f}{row['vs_bare_engine']:>8.2f}"
        )
    print(f"2 actors / 1 actor: {two_vs_one:.2f}x")
    print(f"Parquet: {parquet_bytes / trials:.2f} bytes per trial ({parquet_bytes:,} bytes)")
    write_json_atomic(
        args.out,
        {
            "benchmark": "campaign",
            "bitstorm": __version__,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "trials": trials,
            "repeats": args.repeats,
            "rows": rows,
            "two_actors_vs_one": two_vs_one,
            "parquet_bytes_per_trial": parquet_bytes / trials,
        },
    )
    print(f"wrote {args.out}")


def _bare(spec: CampaignSpec) -> tuple[int, float]:
    """The bare engine on ``spec``'s trials: one process, one thread (as one actor of one CPU
    has), no Ray, no Parquet; the golden pass before the clock, as actors build. Returns
    (trials, seconds)."""
    from campaign.faults.engine import Engine

    checked = validate(spec)
    loaded, sites = checked.models, checked.sites
    per_model = select_images(spec, loaded, checked.data)
    images = next(iter(per_model.values()))  # image_selection any: one set for all
    plan = make_plan(spec, sites, {name: len(images.indices) for name in per_model})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engines = {
        name: Engine(model, images.images[:1], device="cpu") for name, model in loaded.items()
    }
    caches = {
        name: engine.golden(images.images, [site.name for site in sites[name]], spec.kinds)
        for name, engine in engines.items()
    }
    start = time.perf_counter()
    for shard in plan:
        engines[shard.model].run(caches[shard.model], shard.trials(len(images.indices)))
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    return sum(s.size(len(images.indices)) for s in plan), seconds


def _add(total: dict[str, float], trials: int, startup_s: float, seconds: float) -> None:
    total["trials"] += trials
    total["startup_s"] += startup_s
    total["seconds"] += seconds


if __name__ == "__main__":
    main()

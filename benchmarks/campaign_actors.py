"""The distribution layer's cost: a campaign through Ray actors (1 and 2) against the bare engine
on the same trials, in one run on one machine, and Parquet bytes per trial.

    python benchmarks/campaign_actors.py [--trials-per-stratum 32] [--out FILE]

Uses two ResNet-18 checkpoints made here with random weights (accuracy does not matter for
speed) on digits, every Conv/Linear layer, weights and neurons, fp32, all 32 bits. Prints a table
and writes JSON (atomically).
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
    parser.add_argument("--trials-per-stratum", type=int, default=32)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/campaign.json"))
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
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
            "trials_per_stratum": args.trials_per_stratum,
            "output": str(root / "results"),
        }

        # The bare engine on the same trials: one process, both cores, no Ray, no Parquet.
        spec = CampaignSpec.parse({**base, "name": "bare"})
        checked = validate(spec)
        loaded, sites = checked.models, checked.sites
        per_model = select_images(spec, loaded, checked.data)
        images = next(iter(per_model.values()))  # image_selection any: one set for all
        plan = make_plan(spec, sites, {name: len(images.indices) for name in per_model})
        from campaign.faults.engine import Engine

        engines = {
            name: Engine(model, images.images[:1], device="cpu") for name, model in loaded.items()
        }
        trials = sum(s.size(len(images.indices)) for s in plan)
        start = time.perf_counter()
        caches = {  # the golden pass once, as the actors do
            name: engine.golden(images.images, [site.name for site in sites[name]], spec.kinds)
            for name, engine in engines.items()
        }
        for shard in plan:
            engines[shard.model].run(caches[shard.model], shard.trials(len(images.indices)))
        bare_s = time.perf_counter() - start

        rows = [
            {
                "setup": "bare engine, 1 process (2 threads)",
                "trials": trials,
                "seconds": bare_s,
                "trials_per_s": trials / bare_s,
            }
        ]
        parquet_bytes = 0
        for actors in (1, 2):
            resources = {"actors": actors, "cpus_per_actor": 2.0 / actors}
            spec = CampaignSpec.parse({**base, "name": f"actors{actors}", "resources": resources})
            start = time.perf_counter()
            run_campaign(spec, progress=False)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "setup": f"campaign, {actors} actor(s) x {2 / actors:g} CPU",
                    "trials": trials,
                    "seconds": seconds,
                    "trials_per_s": trials / seconds,
                }
            )
            parquet_bytes = sum(
                p.stat().st_size
                for p in (root / "results" / spec.name / "trials").rglob("*.parquet")
            )
    for row in rows:
        row["vs_bare_engine"] = row["trials_per_s"] / rows[0]["trials_per_s"]
    print(
        f"bitstorm {__version__}, torch {torch.__version__}, 2 ResNet-18 models on digits, "
        f"{args.images} images, {trials:,} trials (start-up included in campaign times)"
    )
    print(f"{'setup':<40}{'seconds':>10}{'trials/s':>12}{'x bare':>9}")
    for row in rows:
        print(
            f"{row['setup']:<40}{row['seconds']:>10.1f}{row['trials_per_s']:>12,.0f}"
            f"{row['vs_bare_engine']:>9.2f}"
        )
    print(f"Parquet: {parquet_bytes / trials:.2f} bytes per trial ({parquet_bytes:,} bytes)")
    write_json_atomic(
        args.out,
        {
            "benchmark": "campaign",
            "bitstorm": __version__,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "trials": trials,
            "rows": rows,
            "parquet_bytes_per_trial": parquet_bytes / trials,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

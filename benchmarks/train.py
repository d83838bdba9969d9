"""Training throughput (images/s) with Ray Train on 1 and 2 workers, against a plain PyTorch loop
in one process (no Ray) on the same machine, in one run.

    python benchmarks/train.py [--backbone resnet18] [--epochs 2] [--out FILE]

Each Ray run is a real ``trainers.driver.fit`` of the digits recipe; its throughput is the last
epoch's (the first pays for start-up). The plain loop trains the same model on the same data with
torch's default threads. Prints a table and writes JSON (atomically).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import torch
from timing import timed

from bitstorm import __version__
from bitstorm.atomic import write_json_atomic
from trainers.checkpoint import read_manifest
from trainers.config import TrainConfig
from trainers.data import build_data
from trainers.loop import make_optimizer, make_train_loader, run_epoch
from trainers.models import build_model


def plain_loop(cfg: TrainConfig) -> float:
    """images/s of the same loop in this process, without Ray: the reference."""
    data = build_data(cfg.dataset)
    model = build_model(cfg.backbone, cfg.head, data.num_classes, seed=cfg.seed)
    loader = make_train_loader(data.train, cfg, 0, 1)
    optimizer = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    rates = []
    for epoch in range(cfg.epochs):
        loader.sampler.set_epoch(epoch)
        seconds, stats = timed(
            lambda: run_epoch(model, loader, torch.device("cpu"), cfg, optimizer, scaler)
        )
        rates.append(stats["count"] / seconds)
    return rates[-1]


def ray_run(cfg: TrainConfig) -> tuple[float, float]:
    from trainers.driver import fit

    wall, result = timed(lambda: fit(cfg))
    history = read_manifest(result.checkpoint.path)["history"]
    return history[-1]["images_per_s"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train.json"))
    args = parser.parse_args()

    import ray

    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    base = TrainConfig(
        backbone=args.backbone,
        head="linear",
        dataset="digits",
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_failures=0,
    )
    reference = plain_loop(base)
    rows.append(
        {
            "setup": f"plain torch loop, 1 process, {torch.get_num_threads()} threads",
            "images_per_s": reference,
            "wall_s": None,
        }
    )
    with tempfile.TemporaryDirectory() as output:
        for workers, cpus_each in ((1, cpus), (2, max(1, cpus // 2))):
            cfg = TrainConfig(
                **{
                    **base.__dict__,
                    "num_workers": workers,
                    "cpus_per_worker": cpus_each,
                    "output": output,
                    "name": f"bench{workers}",
                }
            )
            rate, wall = ray_run(cfg)
            rows.append(
                {
                    "setup": f"Ray Train, {workers} worker(s) x {cpus_each} CPU",
                    "images_per_s": rate,
                    "wall_s": wall,
                }
            )
    for row in rows:
        row["vs_plain_loop"] = row["images_per_s"] / reference

    print(
        f"bitstorm {__version__}, torch {torch.__version__}, {args.backbone} on digits 32x32, "
        f"global batch {args.batch_size}, {cpus} CPUs"
    )
    print(f"{'setup':<48}{'images/s':>10}{'x plain':>9}{'run wall s':>12}")
    for row in rows:
        wall = f"{row['wall_s']:.1f}" if row["wall_s"] else "-"
        print(
            f"{row['setup']:<48}{row['images_per_s']:>10.1f}{row['vs_plain_loop']:>9.2f}{wall:>12}"
        )
    write_json_atomic(
        args.out,
        {
            "benchmark": "train",
            "bitstorm": __version__,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": cpus,
            "backbone": args.backbone,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

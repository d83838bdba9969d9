"""``python -m trainers.train --config RECIPE [key=value ...]``: train one model with Ray Train.

RECIPE is a YAML file or the name of a shipped one (``digits_linear``, ``digits_text``,
``cifar10_text``, ``imagenet_paper``). Rerunning the same command resumes from the latest
checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys

from bitstorm.errors import BitstormError
from bitstorm.storage import uri_of
from trainers.checkpoint import read_manifest
from trainers.config import load_train_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.train", description=__doc__)
    parser.add_argument("--config", required=True, help="recipe file or shipped recipe name")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override recipe fields, e.g. epochs=3 num_workers=2",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ray.train import TrainingFailedError  # here: --help need not import Ray

    try:
        cfg = load_train_config(args.config, args.overrides)
        from trainers.driver import fit

        result = fit(cfg)
    except BitstormError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingFailedError as error:
        causes = list(getattr(error, "worker_failures", {}).values())
        if causes and all(isinstance(c, BitstormError) for c in causes):
            print(f"error: {causes[0]}", file=sys.stderr)  # bad input found only by a worker
            return 2
        print(f"training failed: {causes[0] if causes else error}", file=sys.stderr)
        return 1
    if result.checkpoint is None:
        print("no checkpoint was written (num_workers=0 keeps none)")
        return 0
    with result.checkpoint.as_directory() as folder:  # a local copy when on an object store
        history = read_manifest(folder)["history"]
    print(format_history(history))
    print(f"checkpoint: {uri_of(result.checkpoint.filesystem, result.checkpoint.path)}")
    return 0


def format_history(history: list[dict[str, float]]) -> str:
    columns = [
        "epoch",
        "train_loss",
        "train_top1",
        "val_loss",
        "val_top1",
        "val_top5",
        "val_top2diff",
        "images_per_s",
    ]
    lines = ["  ".join(f"{c:>12}" for c in columns)]
    for row in history:
        lines.append(
            "  ".join(f"{row[c]:>12.4f}" if c != "epoch" else f"{int(row[c]):>12}" for c in columns)
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

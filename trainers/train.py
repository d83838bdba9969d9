"""``bitstorm train`` (``python -m trainers.train``) ``--config RECIPE [key=value ...]``: train
one model with Ray Train; rerunning the same command resumes from the latest checkpoint."""

from __future__ import annotations

import argparse
import sys

from bitstorm.command import FAILED, command_parser, run_command
from bitstorm.errors import BitstormError
from bitstorm.storage import uri_of
from trainers.checkpoint import read_manifest
from trainers.config import load_train_config


def main(argv: list[str] | None = None, prog: str = "python -m trainers.train") -> int:
    from trainers.config import TrainConfig

    parser = command_parser(
        prog,
        "Train one model (a backbone with a linear or text head) with Ray Train. RECIPE is a "
        "YAML file or a shipped recipe's name (digits_linear, digits_text, cifar10_text, "
        "imagenet_paper). Rerunning the same command resumes from the latest checkpoint.",
        fields=TrainConfig,
        examples=(
            "bitstorm train --config digits_text epochs=3",
            "bitstorm train --config imagenet_paper backbone=resnet50 head=text "
            "num_workers=8 use_gpu=true",
        ),
    )
    parser.add_argument("--config", required=True, metavar="RECIPE", help="recipe file or name")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override recipe fields, e.g. epochs=3 num_workers=2",
    )
    args = parser.parse_args(argv)
    return run_command(args, lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    from ray.train import TrainingFailedError  # here: --help need not import Ray

    cfg = load_train_config(args.config, args.overrides)
    from trainers.driver import fit

    try:
        result = fit(cfg)
    except TrainingFailedError as error:
        causes = list(getattr(error, "worker_failures", {}).values())
        if causes and all(isinstance(c, BitstormError) for c in causes):
            raise causes[0] from None  # bad input found only by a worker
        print(f"training failed: {causes[0] if causes else error}", file=sys.stderr)
        return FAILED
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

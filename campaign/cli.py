"""The command line of ``campaign/run.py``: run the embedded default, a spec file or a shipped
preset, or list a model's fault sites; then print the summary and the baseline-vs-text
comparison (the same tables the report prints)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from bitstorm.errors import BitstormError, ConfigError, DataError
from bitstorm.version import __version__
from campaign.faults.bits import FORMATS
from campaign.faults.sites import find_sites

if TYPE_CHECKING:
    from campaign.spec import CampaignSpec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="campaign/run.py",
        description="Measure how often single bit flips silently corrupt an image classifier. "
        "Without arguments: the embedded digits default (baseline vs text head).",
    )
    parser.add_argument("--version", action="version", version=f"bitstorm {__version__}")
    parser.add_argument(
        "--spec",
        metavar="FILE",
        help="run the campaign this YAML spec describes: a file, or the name of a shipped "
        "preset such as paper/digits_resnet18 (an unknown name lists them)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override spec fields, e.g. images=64 actors=4",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="discard earlier results of this campaign instead of resuming",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and plan the campaign, print its trials, shards and files, and exit: "
        "no Ray, nothing written",
    )
    parser.add_argument(
        "--address",
        metavar="ADDRESS",
        help="join this Ray cluster ('auto': the one running on this machine, as under ray "
        "submit); default: RAY_ADDRESS if set, else a private local Ray",
    )
    parser.add_argument(
        "--output",
        default="bitstorm-default",
        help="folder for the default run's models and results (default: ./bitstorm-default)",
    )
    parser.add_argument(
        "--list-sites",
        metavar="MODEL",
        help="print the fault-site space of a torchvision or timm model and exit",
    )
    parser.add_argument(
        "--input",
        default="3,224,224",
        metavar="C,H,W",
        help="--list-sites: shape of one input image (default: 3,224,224)",
    )
    parser.add_argument(
        "--num-classes", type=int, default=1000, help="--list-sites: classifier outputs"
    )
    parser.add_argument(
        "--types",
        default="conv_linear",
        help="--list-sites: 'conv_linear', 'weighted', or comma-separated module class names",
    )
    parser.add_argument(
        "--include", action="append", metavar="GLOB", help="--list-sites: module-name glob"
    )
    parser.add_argument(
        "--exclude", action="append", metavar="GLOB", help="--list-sites: module-name glob"
    )
    parser.add_argument(
        "--format",
        default="fp32",
        choices=list(FORMATS),
        help="--list-sites: number format for site counts",
    )
    return parser


def build_named_model(name: str, num_classes: int) -> nn.Module:
    """A torchvision or timm classifier with random weights: enough to count its fault sites."""
    import timm
    import torchvision

    if name in torchvision.models.list_models():
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    known = list(dict.fromkeys(torchvision.models.list_models() + timm.list_models()))
    close = difflib.get_close_matches(name, known, n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown model {name!r}: not a torchvision or timm model name{hint}")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(size <= 0 for size in shape):
        raise ConfigError(f"--input {text!r}: pass positive sizes joined by commas, e.g. 3,32,32")
    return shape


def list_sites(args: argparse.Namespace) -> None:
    model = build_named_model(args.list_sites, args.num_classes)
    types = args.types if args.types in ("conv_linear", "weighted") else args.types.split(",")
    shape = parse_shape(args.input)
    try:
        space = find_sites(
            model, shape, types=types, include=args.include or ["*"], exclude=args.exclude or []
        )
    except (RuntimeError, ValueError, AssertionError) as error:  # the forward refused the shape
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"--input {args.input}: {args.list_sites} cannot run on an input of shape "
            f"{list(shape)} ({reason}); give channels,height,width, e.g. 3,224,224"
        ) from None
    print(space.table(args.format))


def load_campaign_spec(spec: str, overrides: list[str]) -> CampaignSpec:
    """The spec of ``--spec``: a YAML file or a shipped preset's name, with ``overrides``; a
    model's ``checkpoint`` may name a training run folder, which becomes its latest checkpoint."""
    from campaign.spec import load_spec
    from trainers.checkpoint import resolve_checkpoint

    loaded = load_spec(spec, overrides)
    models = []
    for entry in loaded.models:
        if entry.checkpoint:
            try:
                checkpoint = resolve_checkpoint(entry.checkpoint)
            except DataError as error:
                raise ConfigError(f"models[{entry.name}].checkpoint: {error}") from None
            entry = dataclasses.replace(entry, checkpoint=str(checkpoint))
        models.append(entry)
    return dataclasses.replace(loaded, models=models)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.list_sites is not None:
            list_sites(args)
            return 0
        from campaign.analysis.build import build_report
        from campaign.analysis.render import console_summary
        from campaign.analysis.summary import Options
        from campaign.runner import run_campaign

        if args.dry_run and not args.spec:
            raise ConfigError(
                "--dry-run plans a --spec campaign; the default trains its models first, so "
                "there is nothing to plan before it runs"
            )
        if args.spec:
            specs = [load_campaign_spec(args.spec, args.overrides)]
        else:
            from campaign.default import default_campaigns

            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default runs offline
            specs = default_campaigns(Path(args.output).resolve())
        if args.dry_run:
            from campaign.runner import plan_campaign

            print("\n\n".join(plan_campaign(spec).table() for spec in specs))
            return 0
        roots = [run_campaign(spec, fresh=args.fresh, address=args.address).root for spec in specs]
        report = build_report(roots, Options(confidence=specs[0].confidence))
    except BitstormError as error:
        parser.exit(2, f"error: {error}\n")
    print(console_summary(report))
    compare = f" --compare {roots[1]}" if len(roots) > 1 else ""
    print(f"\nby layer and bit, with plots: python -m campaign.report {roots[0]}{compare}")
    return 0

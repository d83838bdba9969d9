"""The command line of ``campaign/run.py``: run the embedded default, a spec file or a shipped
preset, or list a model's fault sites; then print the summary and the baseline-vs-text
comparison (the same tables the report prints)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from bitstorm.command import command_parser, run_command
from bitstorm.errors import ConfigError, DataError
from bitstorm.version import __version__
from campaign.faults.bits import FORMATS
from campaign.faults.sites import find_sites

if TYPE_CHECKING:
    from campaign.spec import CampaignSpec


RUN_EXAMPLES = (
    "bitstorm run                                   # the embedded digits default",
    "bitstorm run --spec my_campaign.yaml images=512 resources.actors=4",
    "bitstorm run --spec paper/digits_resnet18      # a shipped preset, by name",
    "bitstorm run --spec my_campaign.yaml --dry-run # its trials and files; runs nothing",
    "ray submit cluster.yaml campaign/run.py -- --address auto --spec paper/imagenet_resnet50",
)
SITES_EXAMPLES = (
    "bitstorm sites resnet18 --input 3,32,32 --num-classes 10",
    "bitstorm sites vit_b_16 --include 'encoder.layers.encoder_layer_0.*'",
)
DEFAULT_OUTPUT = "bitstorm-default"


def build_parser(prog: str = "campaign/run.py") -> argparse.ArgumentParser:
    from campaign.spec import CampaignSpec

    parser = command_parser(
        prog,
        "Measure how often single bit flips silently corrupt an image classifier. Without "
        "--spec: the embedded digits default (trains a baseline and a text-headed model, then "
        "compares them). Rerunning a campaign resumes it.",
        fields=CampaignSpec,
        examples=RUN_EXAMPLES,
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
        help="override fields of the --spec campaign, e.g. images=64 resources.actors=4",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="discard earlier results of this campaign instead of resuming",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and plan the --spec campaign, print its trials, shards and files, and "
        "exit: no Ray, nothing written",
    )
    parser.add_argument(
        "--address",
        metavar="ADDRESS",
        help="join this Ray cluster ('auto': the one running on this machine, as under ray "
        "submit); default: RAY_ADDRESS if set, else a private local Ray",
    )
    parser.add_argument(
        "--output",
        help=f"folder for the default run's models and results (default: ./{DEFAULT_OUTPUT}); "
        "a --spec campaign writes to its output field",
    )
    parser.add_argument(
        "--list-sites",
        metavar="MODEL",
        help="print the fault-site space of a torchvision or timm model and exit (the same as "
        "bitstorm sites MODEL)",
    )
    _add_site_options(parser, "--list-sites: ")
    return parser


def build_sites_parser(prog: str = "bitstorm sites") -> argparse.ArgumentParser:
    parser = command_parser(
        prog,
        "Print the fault-site space of a torchvision or timm model (random weights): layers, "
        "weights and neurons per layer, and their bits in a number format.",
        examples=SITES_EXAMPLES,
    )
    parser.add_argument("list_sites", metavar="MODEL", help="a torchvision or timm model name")
    _add_site_options(parser)
    return parser


# what the fault-site options are when a user sets none (a set one needs --list-sites)
SITE_DEFAULTS = {
    "input": "3,224,224",
    "num_classes": 1000,
    "types": "conv_linear",
    "include": None,
    "exclude": None,
    "format": "fp32",
}


def _add_site_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    sites = parser.add_argument_group("fault sites")
    sites.add_argument(
        "--input",
        default=SITE_DEFAULTS["input"],
        metavar="C,H,W",
        help=f"{prefix}shape of one input image (default: 3,224,224)",
    )
    sites.add_argument(
        "--num-classes",
        type=int,
        default=SITE_DEFAULTS["num_classes"],
        help=f"{prefix}classifier outputs (default: 1000)",
    )
    sites.add_argument(
        "--types",
        default=SITE_DEFAULTS["types"],
        help=f"{prefix}'conv_linear', 'weighted', or comma-separated module class names",
    )
    sites.add_argument(
        "--include", action="append", metavar="GLOB", help=f"{prefix}module-name glob"
    )
    sites.add_argument(
        "--exclude", action="append", metavar="GLOB", help=f"{prefix}module-name glob"
    )
    sites.add_argument(
        "--format",
        default=SITE_DEFAULTS["format"],
        choices=list(FORMATS),
        help=f"{prefix}number format for site counts",
    )


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


def main(argv: list[str] | None = None, prog: str = "campaign/run.py") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    return run_command(args, lambda: _run(args))


def sites_main(argv: list[str] | None = None, prog: str = "bitstorm sites") -> int:
    args = build_sites_parser(prog).parse_args(argv)
    return run_command(args, lambda: list_sites(args) or 0)


def refuse_unused(args: argparse.Namespace) -> None:
    """Every flag and override applies or is refused: none is silently ignored."""
    run_flags = {"--spec": args.spec, "--dry-run": args.dry_run, "--fresh": args.fresh}
    run_flags |= {"--address": args.address, "--output": args.output}
    run_flags["key=value overrides"] = args.overrides
    if args.list_sites is not None:
        if given := [flag for flag, value in run_flags.items() if value]:
            raise ConfigError(
                f"--list-sites prints a model's fault sites and runs nothing; drop "
                f"{', '.join(given)}"
            )
        return
    site_flags = [
        f"--{k.replace('_', '-')}" for k, v in SITE_DEFAULTS.items() if getattr(args, k) != v
    ]
    if site_flags:
        raise ConfigError(
            f"{', '.join(site_flags)}: fault-site options describe the model of --list-sites "
            "MODEL; add it, or drop them"
        )
    if args.spec:
        if args.output:
            raise ConfigError(
                f"--output is the default run's folder; a --spec campaign writes where its "
                f"output field says: pass output={args.output} instead"
            )
        if args.dry_run and (args.fresh or args.address):
            raise ConfigError("--dry-run runs nothing, so drop --fresh and --address")
        return
    if args.overrides:
        raise ConfigError(
            f"{args.overrides[0]}: key=value overrides change a --spec campaign; the embedded "
            "default takes none (start from its preset instead: --spec paper/digits_resnet18 "
            f"{' '.join(args.overrides)})"
        )
    if args.dry_run:
        raise ConfigError(
            "--dry-run plans a --spec campaign; the default trains its models first, so "
            "there is nothing to plan before it runs"
        )


def _run(args: argparse.Namespace) -> int:
    refuse_unused(args)
    if args.list_sites is not None:
        list_sites(args)
        return 0
    from campaign.analysis.build import build_report
    from campaign.analysis.render import console_summary
    from campaign.analysis.summary import Options
    from campaign.runner import run_campaign

    if args.spec:
        specs = [load_campaign_spec(args.spec, args.overrides)]
    else:
        from campaign.default import default_campaigns

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default runs offline
        specs = default_campaigns(Path(args.output or DEFAULT_OUTPUT).resolve())
    if args.dry_run:
        from campaign.runner import plan_campaign

        print("\n\n".join(plan_campaign(spec).table() for spec in specs))
        return 0
    roots = [run_campaign(spec, fresh=args.fresh, address=args.address).root for spec in specs]
    report = build_report(roots, Options(confidence=specs[0].confidence))
    print(console_summary(report))
    compare = f" --compare {roots[1]}" if len(roots) > 1 else ""
    print(f"\nby layer and bit, with plots: bitstorm report {roots[0]}{compare}")
    return 0

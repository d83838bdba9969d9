"""bitstorm's entry point: ``python campaign/run.py`` on one machine, and
``ray submit cluster.yaml campaign/run.py -- ARGS`` on a cluster (Ray copies only this file to
the head node, so it imports the installed package, never its neighbours).

This version lists a model's fault-site space (``--list-sites``); running campaigns arrives with
the campaign runner.
"""

from __future__ import annotations

import os
import sys

# Run as a script, Python puts this file's folder first on sys.path, where campaign/*.py would
# shadow top-level modules of the same names. Drop it: everything comes from the installed package.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import difflib

from torch import nn

from bitstorm import ConfigError, __version__
from campaign.bits import FORMATS
from campaign.sites import find_sites


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="campaign/run.py",
        description="Measure how often single bit flips silently corrupt an image classifier.",
    )
    parser.add_argument("--version", action="version", version=f"bitstorm {__version__}")
    parser.add_argument(
        "--list-sites",
        metavar="MODEL",
        help="print the fault-site space of a torchvision or timm model (random weights) and exit",
    )
    parser.add_argument(
        "--input",
        default="3,224,224",
        metavar="C,H,W",
        help="shape of one input image (default: 3,224,224)",
    )
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs")
    parser.add_argument(
        "--types",
        default="conv_linear",
        help="'conv_linear' (default), 'weighted' (any module with a weight), "
        "or comma-separated module class names",
    )
    parser.add_argument("--include", action="append", metavar="GLOB", help="module-name glob")
    parser.add_argument("--exclude", action="append", metavar="GLOB", help="module-name glob")
    parser.add_argument(
        "--format", default="fp32", choices=list(FORMATS), help="number format for site counts"
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.list_sites is None:
            raise ConfigError(
                "running campaigns is not available in this version yet; "
                "use --list-sites MODEL to see a model's fault-site space"
            )
        model = build_named_model(args.list_sites, args.num_classes)
        types = args.types if args.types in ("conv_linear", "weighted") else args.types.split(",")
        space = find_sites(
            model,
            parse_shape(args.input),
            types=types,
            include=args.include or ["*"],
            exclude=args.exclude or [],
        )
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    print(space.table(args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())

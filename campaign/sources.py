"""Where a campaign's models come from, one loader for all: a bitstorm checkpoint, a torchvision
or timm model with its weights, or an importable factory of the user's.

Why one loader: the driver (validation, golden pass) and every actor build each model through
it, so they inject faults into the same weights, and the report can say where each model came
from. Weights are read only from local files and the usual caches (``TORCH_HOME``, the
Hugging Face cache): a campaign never downloads, so offline it fails at once with the path to
put the file at, never hangs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from bitstorm.errors import ConfigError, DataError
from campaign.spec import SOURCES
from trainers.checkpoint import file_sha256
from trainers.data import DataConfig, Preprocessing

# The seed of every model's own initialisation (load_model): the same model in every process.
INIT_SEED = 0


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for faults (eval mode, CPU), what the report records of it, and how its
    images are made: ``data`` for a checkpoint (the data it trained on), else ``preprocessing``
    (its weights' or the spec's) over the spec's data set."""

    model: nn.Module
    facts: dict[str, Any]
    data: DataConfig | None = None
    preprocessing: Preprocessing | None = None


def load_model(entry: Any) -> LoadedModel:
    """The model of a spec's ``models`` entry (a ``campaign.spec.ModelEntry``)."""
    field_name = next(s for s in SOURCES if getattr(entry, s))
    where = f"models[{entry.name}].{field_name}"
    try:
        with torch.random.fork_rng(devices=[]):
            # A model whose weights are its own initialisation (a factory's, or a torchvision
            # or timm model without weights) must be the same model in the driver and in every
            # actor, each of which builds it anew: seed the initialisation, never the caller's
            # random state.
            torch.manual_seed(INIT_SEED)
            loaded = _load(entry)
    except DataError as error:
        raise ConfigError(f"{where}: {error}") from None
    preprocessing = loaded.preprocessing
    if entry.input_size or entry.mean or entry.std:  # the spec's word over the weights'
        base = (preprocessing or Preprocessing()).at(entry.input_size)
        preprocessing = dataclasses.replace(
            base, mean=tuple(entry.mean or base.mean), std=tuple(entry.std or base.std)
        )
    facts = dict(loaded.facts)
    if preprocessing is not None:
        facts["preprocessing"] = preprocessing.describe()
    return LoadedModel(loaded.model.eval(), facts, loaded.data, preprocessing)


def _load(entry: Any) -> LoadedModel:
    if entry.checkpoint:
        return _from_checkpoint(entry)
    if entry.torchvision:
        return _from_torchvision(entry)
    if entry.timm:
        return _from_timm(entry)
    if entry.in_memory:
        raise DataError(
            "an in-memory model reaches a campaign only through bitstorm.run_campaign, "
            "which hands it over; a spec file names a checkpoint, torchvision, timm or factory"
        )
    return _from_factory(entry)


def _from_checkpoint(entry: Any) -> LoadedModel:
    from trainers.checkpoint import fetched_checkpoint, load_checkpoint, read_manifest

    with fetched_checkpoint(entry.checkpoint) as (folder, where):
        manifest = read_manifest(folder)
        model, _config = load_checkpoint(folder)
    config = manifest["config"]
    facts = {
        "source": f"bitstorm checkpoint {where}",
        "backbone": config["backbone"],
        "head": config["head"],
        "dataset": config["dataset"],
        "val_top1": manifest.get("metrics", {}).get("val_top1"),
        "epoch": manifest.get("epoch"),
        "weights_sha256": manifest["weights_sha256"],
    }
    return LoadedModel(model, facts, data=DataConfig.of(config))


def _from_torchvision(entry: Any) -> LoadedModel:
    import torchvision

    name = entry.torchvision
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise DataError(f"torchvision: {name!r} is not a torchvision classification model")
    weights, preprocessing = entry.weights, None
    if weights and not _is_file_name(weights):
        try:
            enum = torchvision.models.get_weight(weights)
        except (ValueError, KeyError, AttributeError):
            raise DataError(
                f"weights: {weights!r} is neither a file nor a torchvision weights name such "
                "as ResNet50_Weights.IMAGENET1K_V2"
            ) from None
        model = torchvision.models.get_model(
            name, weights=None, num_classes=len(enum.meta["categories"])
        )
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(enum.url).path).name
        if not cached.is_file():
            raise DataError(
                f"weights {weights}: not in the torch cache; put {enum.url} at {cached} "
                f"(TORCH_HOME sets the cache folder), or give the file as weights: PATH"
            )
        state = read_state_dict(cached)
        transform = enum.transforms()
        preprocessing = Preprocessing(
            input_size=transform.crop_size[0],
            resize=transform.resize_size[0],
            mean=tuple(transform.mean),
            std=tuple(transform.std),
        )
        source = f"torchvision {name}, weights {weights}"
    else:
        model = torchvision.models.get_model(
            name, weights=None, num_classes=entry.num_classes or 1000
        )
        state = read_state_dict(weights) if weights else None
        source = f"torchvision {name}, weights {_described(weights)}"
    if state is not None:
        _load_into(model, state, source)
    return LoadedModel(model, _facts(source, name, model, "linear"), preprocessing=preprocessing)


def _from_timm(entry: Any) -> LoadedModel:
    import timm
    from timm.data import resolve_data_config

    name = entry.timm
    if not timm.is_model(name.split(".")[0]):
        raise DataError(f"timm: {name!r} is not a timm model name")
    options = {"num_classes": entry.num_classes} if entry.num_classes else {}
    if entry.weights:
        model = timm.create_model(name, pretrained=False, **options)
        _load_into(model, read_state_dict(entry.weights), f"timm {name}")
        source = f"timm {name}, weights {_described(entry.weights)}"
    elif "." in name:  # name.pretrained_tag: from the Hugging Face cache
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(_hf_cached(name))}, **options
        )
        source = f"timm {name} (pretrained)"
    else:
        model = timm.create_model(name, pretrained=False, **options)
        source = f"timm {name}, weights random (no tag, no file)"
    config = resolve_data_config({}, model=model)
    size = config["input_size"][-1]
    preprocessing = Preprocessing(
        input_size=size,
        resize=round(size / config.get("crop_pct", 1.0)),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
    )
    return LoadedModel(model, _facts(source, name, model, "linear"), preprocessing=preprocessing)


def _hf_cached(name: str) -> Path:
    """The cached weights file of timm's ``name.tag`` (never downloaded here)."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(name)
    repo = getattr(config, "hf_hub_id", None) if config else None
    if not repo:
        raise DataError(f"timm: {name!r} names no pretrained weights timm knows")
    for file in ("model.safetensors", "pytorch_model.bin"):
        # HF_HUB_CACHE read now, not when huggingface_hub was imported
        path = try_to_load_from_cache(repo, file, cache_dir=os.environ.get("HF_HUB_CACHE"))
        if isinstance(path, str):
            return Path(path)
    raise DataError(
        f"timm {name}: its weights are not in the Hugging Face cache (HF_HOME); fetch them "
        f"where there is internet (huggingface-cli download {repo}), or download "
        f"model.safetensors from https://huggingface.co/{repo} and give it as weights: PATH"
    )


def _from_factory(entry: Any) -> LoadedModel:
    module_name, _, function_name = entry.factory.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise DataError(
            f"cannot import {entry.factory!r} ({error}); the module must be importable here "
            "and on every node"
        ) from None
    model = factory(**(entry.kwargs or {}))
    if not isinstance(model, nn.Module):
        raise DataError(f"{entry.factory} returned {type(model).__name__}, not an nn.Module")
    if entry.weights:
        _load_into(model, read_state_dict(entry.weights), entry.factory)
    weights = _described(entry.weights) if entry.weights else "its own"
    source = f"factory {entry.factory}, weights {weights}"
    return LoadedModel(model, _facts(source, entry.factory, model, "custom"))


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"weights: no file {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as error:
            raise DataError(f"weights {path}: unreadable safetensors ({error})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DataError(
            f"weights {path}: not a state dict torch can read safely (weights_only=True: "
            f"{str(error).splitlines()[0]})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"weights {path}: not a state dict (a mapping of names to tensors)")
    return state


def state_sha256(model: nn.Module) -> str:
    """The model's identity by content: a hash of every tensor of its state dict, in order."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise DataError(f"weights do not fit {what} ({str(error).splitlines()[0]} ...)") from None


def _facts(source: str, backbone: str, model: nn.Module, head: str) -> dict[str, Any]:
    """``dataset`` is the spec's, filled in by campaign.runner.validate."""
    return {
        "source": source,
        "backbone": backbone,
        "head": head,
        "dataset": None,
        "val_top1": None,
        "epoch": None,
        "weights_sha256": state_sha256(model),
    }


def _is_file_name(weights: str) -> bool:
    return "/" in weights or Path(weights).suffix in (".safetensors", ".pt", ".pth", ".bin")


def _described(weights: str | None) -> str:
    if not weights:
        return "random (none given)"
    return f"{weights} (sha256 {file_sha256(weights)[:12]}...)"

"""Checkpoints: everything needed to rebuild a trained model, and nothing that needs unpickling.

A checkpoint is a folder: ``checkpoint.json`` (format, the full ``TrainConfig``, class names,
embedding geometry and file hash, epoch, the metrics of every epoch so far, and the sha256 of the
weights), ``model.safetensors``
(the weights) and ``train_state.pt`` (optimiser and schedule, for resuming; read with
``weights_only=True``). ``load_checkpoint`` is the one loader every later stage uses; it and
resuming read the weights through ``load_weights``, which checks their sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from bitstorm import __version__
from bitstorm.atomic import write_bytes_atomic, write_json_atomic
from bitstorm.config import from_dict, to_dict
from bitstorm.errors import BitstormError, DataError
from trainers.config import TrainConfig
from trainers.heads import TextHead, head_kind
from trainers.models import build_model

FORMAT = "bitstorm.checkpoint.v1"
MANIFEST, WEIGHTS, TRAIN_STATE = "checkpoint.json", "model.safetensors", "train_state.pt"


def save_checkpoint(
    folder: str | Path,
    model: nn.Module,
    config: TrainConfig,
    *,
    class_names: tuple[str, ...],
    epoch: int,
    history: list[dict[str, float]],
    embeddings_sha256: str | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder; the manifest goes last, so a complete manifest means a complete
    checkpoint."""
    folder = Path(folder)
    weights = save_safetensors(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    )
    write_bytes_atomic(folder / WEIGHTS, weights)
    if train_state is not None:
        buffer = io.BytesIO()
        torch.save(train_state, buffer)
        write_bytes_atomic(folder / TRAIN_STATE, buffer.getvalue())
    head = _text_head(model)
    write_json_atomic(
        folder / MANIFEST,
        {
            "format": FORMAT,
            "config": to_dict(config),
            "class_names": list(class_names),
            "embedding_dim": head.classes.in_features if head is not None else None,
            "embeddings_sha256": embeddings_sha256,
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "epoch": epoch,
            "metrics": history[-1] if history else {},
            "history": history,
            "bitstorm_version": __version__,
        },
    )
    return folder


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{folder}: not a checkpoint (no {MANIFEST})") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: corrupt manifest ({error})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: unknown checkpoint format {manifest.get('format')!r}")
    return manifest


def load_checkpoint(folder: str | Path) -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model of a checkpoint, in eval mode on the CPU, and its training config.

    Refuses weights whose hash differs from the manifest (a tampered or swapped file) and weights
    that do not fit the architecture the config describes.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    state = load_weights(folder, manifest)
    try:
        config = from_dict(TrainConfig, manifest["config"], f"{folder / MANIFEST}")
    except BitstormError as error:
        raise DataError(f"{folder}: unreadable checkpoint ({error})") from None
    # The class rows come from the weights, so any text head of the same geometry will do.
    head = "text_random" if head_kind(config.head).rows is not None else config.head
    model = build_model(
        config.backbone,
        head,
        len(manifest["class_names"]),
        embedding_dim=manifest["embedding_dim"],
        small_input=config.small_input,
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise DataError(
            f"{folder}: weights do not fit {config.backbone} with a {config.head} "
            f"head ({str(error).splitlines()[0]} ...)"
        ) from None
    return model.eval(), config


def load_weights(
    folder: str | Path, manifest: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint's ``model.safetensors``, on the CPU, after checking its
    sha256 against the manifest (``manifest``, if already read)."""
    folder = Path(folder)
    if manifest is None:
        manifest = read_manifest(folder)
    try:
        raw = (folder / WEIGHTS).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{folder}: checkpoint has no {WEIGHTS}") from None
    if hashlib.sha256(raw).hexdigest() != manifest["weights_sha256"]:
        raise DataError(
            f"{folder / WEIGHTS}: sha256 does not match the manifest: the weights "
            "were modified or replaced after the checkpoint was written"
        )
    try:
        return load_safetensors(raw)
    except SafetensorError as error:
        raise DataError(f"{folder}: unreadable checkpoint ({error})") from None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint of the highest epoch under a run folder (Ray Train's layout), or None."""
    best: tuple[int, Path] | None = None
    for manifest in Path(run_dir).glob(f"*/{MANIFEST}"):
        try:
            epoch = int(read_manifest(manifest.parent)["epoch"])
        except (DataError, KeyError, ValueError):
            continue
        if best is None or epoch > best[0]:
            best = (epoch, manifest.parent)
    return best[1] if best else None


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a checkpoint folder, else the latest checkpoint of the training run
    folder ``path`` (a run's ``<output>/<name>``, whose checkpoint folders Ray Train names by
    time, so a spec can name the run rather than one of its checkpoints)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise DataError(
            f"{path}: neither a checkpoint (no {MANIFEST}) nor a training run folder holding "
            "one; train the model first, or name its checkpoint folder"
        )
    return latest


def load_train_state(folder: str | Path) -> dict[str, Any]:
    """The optimiser and schedule state of a checkpoint (no weights: see ``load_weights``)."""
    return torch.load(Path(folder) / TRAIN_STATE, map_location="cpu", weights_only=True)


def _text_head(model: nn.Module) -> TextHead | None:
    return next((m for m in model.modules() if isinstance(m, TextHead)), None)

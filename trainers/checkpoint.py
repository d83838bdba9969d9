"""Checkpoints: everything needed to rebuild a trained model, and nothing that needs unpickling.

A checkpoint is a folder: ``checkpoint.json`` (format, the full ``TrainConfig``, class names,
embedding geometry, epoch, the metrics of every epoch so far, and sha256 hashes: of the weights,
of the class-embedding file a text head was trained with, ``embeddings_file_sha256``, and of that
file's descriptions, ``descriptions_sha256``), ``model.safetensors`` (the weights) and
``train_state.pt`` (optimiser and schedule, for resuming; read with ``weights_only=True``).
``load_checkpoint`` is the one loader every later stage uses; it and resuming read the weights
through ``load_weights``, which checks their sha256. ``verify_embeddings`` loads an embedding
file for a checkpoint only if it is the one the checkpoint was trained with.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from bitstorm.atomic import write_bytes_atomic, write_json_atomic
from bitstorm.config import from_dict, to_dict
from bitstorm.errors import BitstormError, DataError
from bitstorm.storage import is_uri, open_location, store_error, uri_of
from bitstorm.version import __version__
from embeddings.store import ClassEmbeddings, load_embeddings
from trainers.config import TrainConfig
from trainers.heads import TextHead, head_kind
from trainers.models import build_model

FORMAT = "bitstorm.checkpoint.v1"
MANIFEST, WEIGHTS, TRAIN_STATE = "checkpoint.json", "model.safetensors", "train_state.pt"
# What readers of a manifest rely on (save_checkpoint writes them all).
REQUIRED = ("config", "class_names", "embedding_dim", "weights_sha256", "epoch", "history")


def save_checkpoint(
    folder: str | Path,
    model: nn.Module,
    config: TrainConfig,
    *,
    class_names: tuple[str, ...],
    epoch: int,
    history: list[dict[str, float]],
    descriptions_sha256: str | None = None,
    embeddings_file_sha256: str | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder; the manifest goes last, so a complete manifest means a complete
    checkpoint.

    A head trained from a class-embedding file records the file's sha256
    (``embeddings_file_sha256``, see ``file_sha256``) and its ``description_hash``
    (``descriptions_sha256``); both stay None for heads trained without one.
    """
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
            "descriptions_sha256": descriptions_sha256,
            "embeddings_file_sha256": embeddings_file_sha256,
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "epoch": epoch,
            "metrics": history[-1] if history else {},
            "history": history,
            "bitstorm_version": __version__,
        },
    )
    return folder


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's manifest, in the current vocabulary whatever version wrote it: manifests
    from before the rename have their ``embeddings_sha256`` (always the descriptions' hash) as
    ``descriptions_sha256``, and an unknown (None) ``embeddings_file_sha256``."""
    path = Path(folder) / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{folder}: not a checkpoint (no {MANIFEST})") from None
    return parse_manifest(raw, str(path))


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """The manifest ``raw`` read from ``where`` (read_manifest's checks, for any file system)."""
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: corrupt manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"{where}: unknown checkpoint format {found!r}")
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise DataError(
            f"{where}: the manifest lacks {', '.join(missing)}: it was edited, or not written "
            "by bitstorm; use the checkpoint folder training wrote"
        )
    return _upgrade(manifest)


def _upgrade(manifest: dict[str, Any]) -> dict[str, Any]:
    if "embeddings_sha256" in manifest and "descriptions_sha256" not in manifest:
        manifest["descriptions_sha256"] = manifest.pop("embeddings_sha256")
    manifest.setdefault("descriptions_sha256", None)
    manifest.setdefault("embeddings_file_sha256", None)
    return manifest


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (what ``embeddings_file_sha256`` records)."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def verify_embeddings(manifest: dict[str, Any], path: str | Path) -> ClassEmbeddings:
    """Load the class-embedding file ``path`` for the checkpoint whose manifest (from
    ``read_manifest``) is ``manifest``, refusing, with a ``DataError``, any file but the one the
    checkpoint was trained with.

    The file's sha256 must be the manifest's ``embeddings_file_sha256``, so a file with the same
    descriptions but other vectors (another text encoder, or a rebuild) is refused too. Manifests
    written before that hash was recorded only know the descriptions: for them the file's
    ``description_hash`` must be ``descriptions_sha256``, which cannot tell encoders apart.
    """
    path = Path(path)
    manifest = _upgrade(dict(manifest))
    embeddings = load_embeddings(path, manifest["class_names"])
    want_file = manifest["embeddings_file_sha256"]
    want_descriptions = manifest["descriptions_sha256"]
    if want_file is None and want_descriptions is None:
        head = manifest.get("config", {}).get("head")
        raise DataError(
            f"{path}: not the embedding file this checkpoint was trained with: it was trained "
            f"without one (its {head!r} head records none), so leave it out"
        )
    same_descriptions = embeddings.description_hash == want_descriptions
    if want_file is not None:
        have_file = file_sha256(path)
        if have_file != want_file:
            why = (
                "it encodes the same descriptions, so it was built with another text encoder "
                f"(this one: {embeddings.encoder}) or rebuilt"
                if same_descriptions
                else "it encodes other descriptions"
            )
            raise DataError(
                f"{path}: not the embedding file this checkpoint was trained with: its sha256 "
                f"is {have_file[:12]}..., the checkpoint's file had {want_file[:12]}...; {why}. "
                "Pass the file the model was trained with"
            )
    elif not same_descriptions:
        raise DataError(
            f"{path}: not the embedding file this checkpoint was trained with: it encodes other "
            f"descriptions (description hash {embeddings.description_hash[:12]}..., the "
            f"checkpoint's {want_descriptions[:12]}...). Pass the file the model was trained with"
        )
    return embeddings


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
    """The checkpoint of the highest epoch under a local run folder (Ray Train's layout)."""
    found = latest_stored(pafs.LocalFileSystem(), str(Path(run_dir).resolve()))
    return Path(run_dir) / Path(found).name if found is not None else None  # as named


def latest_stored(filesystem: pafs.FileSystem, run_dir: str) -> str | None:
    """The checkpoint of the highest epoch under the run folder ``run_dir`` of ``filesystem``
    (local or an object store), or None; folders whose manifest does not read are skipped."""
    best: tuple[int, str] | None = None
    try:
        found = filesystem.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    except NotADirectoryError:
        return None
    for info in found:
        if info.type != pafs.FileType.Directory:
            continue
        try:
            epoch = int(_stored_manifest(filesystem, info.path)["epoch"])
        except (DataError, FileNotFoundError, KeyError, TypeError, ValueError):
            continue
        if best is None or epoch > best[0]:
            best = (epoch, info.path)
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
        raise _no_checkpoint(path)
    return latest


@contextmanager
def fetched_checkpoint(location: str) -> Iterator[tuple[Path, str]]:
    """The checkpoint ``location`` names (as ``resolve_checkpoint`` finds it) as a local folder,
    and where it is: itself when local; from an object store (``s3://bucket/runs/name``), a
    temporary copy of its manifest and weights, removed on exit, which ``load_checkpoint``
    reads and checks like any other."""
    if not is_uri(location):
        folder = resolve_checkpoint(location)
        yield folder, str(folder)
        return
    filesystem, path = open_location(location)
    try:
        found = path if _is_file(filesystem, f"{path}/{MANIFEST}") else None
        found = found or latest_stored(filesystem, path)
    except OSError as error:
        raise store_error(location, error) from None
    if found is None:
        raise _no_checkpoint(location)
    with fetched_stored(filesystem, found) as folder:
        yield folder, uri_of(filesystem, found)


@contextmanager
def fetched_stored(filesystem: pafs.FileSystem, folder: str) -> Iterator[Path]:
    """The checkpoint folder ``folder`` of ``filesystem`` as a local folder: itself when local,
    else a temporary copy of its files, removed on exit."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        yield Path(folder)
        return
    with tempfile.TemporaryDirectory(prefix="bitstorm-checkpoint-") as scratch:
        try:
            for name in (MANIFEST, WEIGHTS, TRAIN_STATE):
                if name == TRAIN_STATE and not _is_file(filesystem, f"{folder}/{name}"):
                    continue  # written only by training, for resuming
                with filesystem.open_input_stream(f"{folder}/{name}") as stream:
                    (Path(scratch) / name).write_bytes(stream.read())
        except OSError as error:
            raise store_error(folder, error) from None
        yield Path(scratch)


def _stored_manifest(filesystem: pafs.FileSystem, folder: str) -> dict[str, Any]:
    with filesystem.open_input_stream(f"{folder}/{MANIFEST}") as stream:
        return parse_manifest(stream.read(), f"{folder}/{MANIFEST}")


def _is_file(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type == pafs.FileType.File


def _no_checkpoint(location: str | Path) -> DataError:
    return DataError(
        f"{location}: neither a checkpoint (no {MANIFEST}) nor a training run folder holding "
        "one; train the model first, or name its checkpoint folder"
    )


def load_train_state(folder: str | Path) -> dict[str, Any]:
    """The optimiser and schedule state of a checkpoint (no weights: see ``load_weights``)."""
    return torch.load(Path(folder) / TRAIN_STATE, map_location="cpu", weights_only=True)


def _text_head(model: nn.Module) -> TextHead | None:
    return next((m for m in model.modules() if isinstance(m, TextHead)), None)

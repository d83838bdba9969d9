"""The class-embedding file: a safetensors tensor ``embeddings`` ``[C, D]`` float32 with its
metadata, and the one loader every later stage uses.

Metadata (one safetensors field, ``bitstorm``, holding a JSON object): ``format``,
``class_names``, ``encoder``, ``pretrained``, ``random_init``, ``description_source``,
``description_hash``, ``dim``, ``num_classes``, ``created_at`` and ``bitstorm_version``. The
paper's release format (a bare tensor saved with ``torch.save``) is imported with
``weights_only=True``, never unpickled freely.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from bitstorm.atomic import write_bytes_atomic
from bitstorm.errors import DataError
from bitstorm.version import __version__

FORMAT = "bitstorm.class_embeddings.v1"
TENSOR_KEY = "embeddings"
METADATA_KEY = "bitstorm"
NORM_TOLERANCE = 1e-3


class RandomEncoderWarning(UserWarning):
    """The embeddings came from a randomly initialised text encoder: no language knowledge."""


@dataclass(frozen=True)
class ClassEmbeddings:
    """One unit-norm row per class, and where the rows came from."""

    embeddings: torch.Tensor
    class_names: tuple[str, ...]
    encoder: str
    pretrained: str
    random_init: bool
    description_source: str
    description_hash: str
    created_at: str
    bitstorm_version: str = __version__

    @property
    def num_classes(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def metadata(self) -> dict[str, object]:
        return {
            "format": FORMAT,
            "class_names": list(self.class_names),
            "encoder": self.encoder,
            "pretrained": self.pretrained,
            "random_init": self.random_init,
            "description_source": self.description_source,
            "description_hash": self.description_hash,
            "dim": self.dim,
            "num_classes": self.num_classes,
            "created_at": self.created_at,
            "bitstorm_version": self.bitstorm_version,
        }


def created_at() -> str:
    """UTC build time; SOURCE_DATE_EPOCH (the reproducible-builds convention) pins it."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), UTC) if epoch else datetime.now(UTC)
    return moment.replace(microsecond=0).isoformat()


def save_embeddings(result: ClassEmbeddings, path: str | Path) -> Path:
    """Validate and write atomically: a crash never leaves a file that looks complete."""
    _validate(result.embeddings, len(result.class_names), str(path))
    # One metadata key holding canonical JSON: safetensors writes several keys in hash order, which
    # would make identical builds differ byte for byte.
    header = {METADATA_KEY: json.dumps(result.metadata(), sort_keys=True, ensure_ascii=False)}
    data = save_safetensors({TENSOR_KEY: result.embeddings.contiguous()}, header)
    return write_bytes_atomic(path, data)


def load_embeddings(path: str | Path, class_names: Sequence[str] | None = None) -> ClassEmbeddings:
    """Read and validate a class-embedding file; with ``class_names``, also check they match.

    Files made with a randomly initialised encoder load, with a :class:`RandomEncoderWarning`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such embedding file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = json.loads(header.get(METADATA_KEY, "{}"))
    except (SafetensorError, ValueError, OSError) as error:
        raise DataError(f"{path}: not a safetensors embedding file ({error})") from None
    if metadata.get("format") != FORMAT or TENSOR_KEY not in tensors:
        raise DataError(
            f"{path}: not a bitstorm class-embedding file; "
            "import a bare [C, D] tensor with `python -m embeddings import`"
        )
    names = tuple(metadata["class_names"])
    _validate(tensors[TENSOR_KEY], len(names), str(path))
    result = ClassEmbeddings(
        embeddings=tensors[TENSOR_KEY],
        class_names=names,
        encoder=metadata["encoder"],
        pretrained=metadata["pretrained"],
        random_init=bool(metadata["random_init"]),
        description_source=metadata["description_source"],
        description_hash=metadata["description_hash"],
        created_at=metadata["created_at"],
        bitstorm_version=metadata["bitstorm_version"],
    )
    if class_names is not None:
        check_classes(result, class_names, str(path))
    if result.random_init:
        warnings.warn(
            f"{path} was built with a RANDOMLY INITIALISED text encoder ({result.encoder}): its "
            "class geometry carries no language knowledge; use it for tests and demos only",
            RandomEncoderWarning,
            stacklevel=2,
        )
    return result


def check_classes(result: ClassEmbeddings, class_names: Sequence[str], origin: str) -> None:
    """Refuse embeddings whose classes are not exactly ``class_names``, in order."""
    if len(class_names) != result.num_classes:
        raise DataError(
            f"{origin}: has {result.num_classes} classes but the data set has "
            f"{len(class_names)}; build embeddings for this class set"
        )
    wrong = [
        (i, a, b)
        for i, (a, b) in enumerate(zip(result.class_names, class_names, strict=True))
        if a != b
    ]
    if wrong:
        i, have, want = wrong[0]
        raise DataError(
            f"{origin}: class {i} is {have!r} but the data set's class {i} is {want!r} "
            f"({len(wrong)} of {len(class_names)} differ); build embeddings for this class set"
        )


def import_release(
    path: str | Path, class_names: Sequence[str], *, description_source: str | None = None
) -> ClassEmbeddings:
    """Import a bare ``[C, D]`` tensor saved with ``torch.save`` (the paper's release format).

    Rows are L2-normalised on import (the template-based release is not normalised); the
    description hash is the sha256 of the file, since its descriptions are not known.
    """
    path = Path(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise DataError(
            f"{path}: refused to load: it is not a plain tensor file, and arbitrary pickled "
            f"objects are never unpickled ({str(error).splitlines()[0][:200]})"
        ) from None
    if not isinstance(loaded, torch.Tensor) or loaded.ndim != 2:
        kind = (
            type(loaded).__name__
            if not isinstance(loaded, torch.Tensor)
            else (f"a {loaded.ndim}-d tensor")
        )
        raise DataError(f"{path}: expected one [classes, dim] tensor, found {kind}")
    if not torch.isfinite(loaded).all():
        raise DataError(f"{path}: the tensor holds NaN or Inf")
    rows = loaded.float()
    rows = rows / rows.norm(dim=1, keepdim=True)
    result = ClassEmbeddings(
        embeddings=rows.contiguous(),
        class_names=tuple(class_names),
        encoder="unknown (imported release)",
        pretrained="unknown",
        random_init=False,
        description_source=description_source or f"release:{path.name}",
        description_hash=hashlib.sha256(path.read_bytes()).hexdigest(),
        created_at=created_at(),
    )
    _validate(result.embeddings, len(class_names), str(path))
    return result


def _validate(embeddings: torch.Tensor, num_classes: int, origin: str) -> None:
    if embeddings.ndim != 2 or embeddings.dtype != torch.float32:
        raise DataError(
            f"{origin}: embeddings must be a 2-d float32 tensor, got {embeddings.ndim}-d "
            f"{embeddings.dtype}"
        )
    if embeddings.shape[0] != num_classes:
        raise DataError(
            f"{origin}: {embeddings.shape[0]} embedding rows for {num_classes} class names"
        )
    if not torch.isfinite(embeddings).all():
        raise DataError(f"{origin}: embeddings hold NaN or Inf")
    norms = embeddings.norm(dim=1)
    off = (norms - 1).abs()
    bad = (off > NORM_TOLERANCE).nonzero().flatten()
    if len(bad):
        row = int(bad[0])  # the first bad row: a user fixes files top down
        raise DataError(
            f"{origin}: rows must have unit L2 norm; row {row} has norm {float(norms[row]):.4f}"
        )

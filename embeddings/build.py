"""Descriptions -> one embedding per class: encode every description, L2-normalise each,
average per class, renormalise (the CuPL / text-guided-head recipe)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from bitstorm.errors import DataError
from embeddings.descriptions import description_hash
from embeddings.encoders import TextEncoder
from embeddings.store import ClassEmbeddings, created_at


def build_embeddings(
    class_names: Sequence[str],
    descriptions: Mapping[str, Sequence[str]],
    encoder: TextEncoder,
    *,
    description_source: str,
    batch_size: int = 256,
    progress: bool = True,
) -> ClassEmbeddings:
    """Embed cleaned ``descriptions`` (see ``clean_descriptions``) for ``class_names``, in order."""
    empty = [name for name in class_names if not descriptions.get(name)]
    if empty:
        raise DataError(f"no descriptions for classes {empty[:10]}")
    texts = [text for name in class_names for text in descriptions[name]]
    owners = torch.repeat_interleave(
        torch.arange(len(class_names)), torch.tensor([len(descriptions[n]) for n in class_names])
    )
    encoded = F.normalize(encoder.encode(texts, batch_size=batch_size, progress=progress), dim=1)
    sums = torch.zeros(len(class_names), encoded.shape[1]).index_add_(0, owners, encoded)
    return ClassEmbeddings(
        embeddings=F.normalize(sums, dim=1).contiguous(),
        class_names=tuple(class_names),
        encoder=encoder.id,
        pretrained=encoder.pretrained,
        random_init=encoder.random_init,
        description_source=description_source,
        description_hash=description_hash({n: list(descriptions[n]) for n in class_names}),
        created_at=created_at(),
    )

"""Classification heads. ``linear`` is the backbone's own classifier (the baseline); ``text`` is
the paper's text-guided head; the other ``text_*`` kinds keep its geometry with other class rows,
for sweeps over head initialisations.

The text head (Wasim et al., NeurIPS 2023): Linear(features -> D) with bias, L2-normalised image
features, a bias-free Linear(D -> C) initialised from the row-normalised class embeddings, and
logits multiplied by exp(logit_scale), learnable, initialised to log(1/0.07). Nothing is frozen
unless the kind says so. Both Linears are ordinary modules, so every fault site stays visible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bitstorm.errors import ConfigError

INITIAL_LOGIT_SCALE = math.log(1 / 0.07)


class TextHead(nn.Module):
    """Image features -> unit vectors in the text space -> scaled cosine logits per class."""

    def __init__(self, in_features: int, class_rows: torch.Tensor, *, freeze_rows: bool = False):
        super().__init__()
        num_classes, dim = class_rows.shape
        self.projection = nn.Linear(in_features, dim)
        self.classes = nn.Linear(dim, num_classes, bias=False)
        with torch.no_grad():
            self.classes.weight.copy_(F.normalize(class_rows.float(), dim=1))
        self.classes.weight.requires_grad_(not freeze_rows)
        self.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.projection(features), dim=-1)
        return self.classes(image) * self.logit_scale.exp()


@dataclass(frozen=True)
class HeadKind:
    """How a head kind gets its class rows ``[C, D]``; ``rows`` is None for the ``linear`` head,
    which keeps the backbone's classifier (every other kind is a ``TextHead``)."""

    needs_embeddings: bool
    rows: Callable[[int, int, torch.Tensor | None, torch.Generator], torch.Tensor] | None
    freeze_rows: bool = False


def _embedding_rows(_c: int, _d: int, embeddings: torch.Tensor | None, _g) -> torch.Tensor:
    assert embeddings is not None
    return embeddings


def _random_rows(c: int, d: int, _e, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(c, d, generator=generator), dim=1)


def _orthogonal_rows(c: int, d: int, _e, generator: torch.Generator) -> torch.Tensor:
    if c > d:
        raise ConfigError(f"text_orthogonal needs classes <= dim; got {c} classes in {d} dims")
    q, _ = torch.linalg.qr(torch.randn(d, c, generator=generator))
    return q.T.contiguous()


HEADS: dict[str, HeadKind] = {
    "linear": HeadKind(False, None),  # the backbone's own linear classifier (baseline)
    "text": HeadKind(True, _embedding_rows),  # the paper's head, rows from class embeddings
    "text_frozen": HeadKind(True, _embedding_rows, freeze_rows=True),  # class rows fixed
    "text_random": HeadKind(False, _random_rows),  # text geometry, random unit rows
    "text_orthogonal": HeadKind(False, _orthogonal_rows),  # text geometry, orthonormal rows
}


def head_kind(name: str) -> HeadKind:
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    return HEADS[name]


def make_head(
    name: str,
    in_features: int,
    num_classes: int,
    *,
    embeddings: torch.Tensor | None = None,
    embedding_dim: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """A head module for ``name``; ``linear`` gives a plain Linear(in_features, num_classes)."""
    kind = head_kind(name)
    if kind.rows is None:
        return nn.Linear(in_features, num_classes)
    if kind.needs_embeddings and embeddings is None:
        raise ConfigError(
            f"head {name!r} needs class embeddings: set `embeddings` to a file "
            "made with `python -m embeddings build`"
        )
    if embeddings is not None:
        if embeddings.ndim != 2 or embeddings.shape[0] != num_classes:
            raise ConfigError(
                f"class embeddings of shape {tuple(embeddings.shape)} do not fit "
                f"{num_classes} classes"
            )
        dim = embeddings.shape[1]
    elif embedding_dim:
        dim = embedding_dim
    else:
        raise ConfigError(f"head {name!r} needs embedding_dim (or an embeddings file)")
    generator = torch.Generator().manual_seed(seed)
    rows = kind.rows(num_classes, dim, embeddings, generator)
    return TextHead(in_features, rows, freeze_rows=kind.freeze_rows)

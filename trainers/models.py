"""``build_model``: a backbone by name with a head by name: the models faults are injected into."""

from __future__ import annotations

import torch
from torch import nn

from trainers.backbones import classifier, create_backbone, replace_module, use_small_input_stem
from trainers.heads import head_kind, make_head


def build_model(
    backbone: str,
    head: str,
    num_classes: int,
    embeddings: torch.Tensor | None = None,
    *,
    embedding_dim: int | None = None,
    small_input: bool = False,
    pretrained: bool = False,
    seed: int = 0,
) -> nn.Module:
    """Build ``backbone`` (torchvision, timm or built-in) with ``head`` (see ``trainers.heads``).

    ``embeddings`` ``[num_classes, D]`` initialise a text head's class rows; ``embedding_dim``
    sets D for the heads that need no embeddings. ``seed`` fixes every random initialisation.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_backbone(backbone, num_classes, pretrained=pretrained)
        if small_input:
            use_small_input_stem(model, backbone)
        if head_kind(head).rows is not None:  # a text-style head replaces the classifier
            path, linear = classifier(model, num_classes)
            replace_module(
                model,
                path,
                make_head(
                    head,
                    linear.in_features,
                    num_classes,
                    embeddings=embeddings,
                    embedding_dim=embedding_dim,
                    seed=seed,
                ),
            )
    return model

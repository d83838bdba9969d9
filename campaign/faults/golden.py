"""The golden cache: what the fault-free model computed on one set of images, held by the caller.

``Engine.golden(images, layers, kinds)`` makes one; ``Engine.run(cache, group)`` reads it. A cache
belongs to exactly one image set, so nothing computed on one set (golden top-1, the values the
suffixes need, the activation profile behind int8 scales) can leak into
trials on another: there is no hidden state keyed by a tensor's address.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx


@dataclass
class GoldenCache:
    """Fault-free facts of ``images``.

    ``values``: golden values by graph node, for every image, when they fit in the engine's
    cache budget (empty otherwise, or for a model without a traced graph: then each run
    recomputes them chunk by chunk). ``peaks``: max |output| per layer over these images, filled
    on first need (int8 neuron scales; range-restriction bounds come from the training split,
    never from here).
    """

    images: torch.Tensor
    logits: torch.Tensor  # on the engine's device
    values: dict[fx.Node, torch.Tensor] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)
    top1: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.top1 = self.logits.argmax(dim=1)

    def __len__(self) -> int:
        return len(self.images)

    def holds(self, nodes: tuple[fx.Node, ...]) -> bool:
        """Whether every value of ``nodes`` is resident for all images."""
        return bool(self.values) and all(node in self.values for node in nodes)

"""What a trial is and what it yields: the fault kinds, a group of trials that share kind, layer
and number format, and their outcomes (docs/design.md, "Fault semantics").

Every evaluator of the engine, the analytic last layer and the shard worker speak these types,
so an outcome means the same thing whichever path computed it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from bitstorm.errors import ConfigError
from bitstorm.metrics import top2diff
from campaign.faults.bits import BIT_FLIP, FaultModel, format_width

# A weight fault changes one weight for one inference; a neuron fault one element of a layer's
# output for one image (how: the group's fault model, campaign.faults.bits).
KINDS = ("weight", "neuron")


@dataclass(frozen=True)
class TrialGroup:
    """Trials that share kind, layer, number format and fault model; one entry per trial in
    each tensor.

    ``index`` is the flat index into the weight tensor (weight) or into one image's layer output
    (neuron; over all calls of a reused module, in call order); ``bit`` is the lowest bit the
    fault changes; ``image`` indexes the images.
    """

    kind: str
    layer: str
    fmt: str
    index: torch.Tensor
    bit: torch.Tensor
    image: torch.Tensor
    fault: FaultModel = BIT_FLIP

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"trial kind {self.kind!r}: pass {' or '.join(map(repr, KINDS))}")
        sizes = {len(self.index), len(self.bit), len(self.image)}
        if len(sizes) != 1:
            raise ConfigError(f"index, bit and image need one entry per trial; got {sizes}")
        last = format_width(self.fmt) - self.fault.width
        if len(self.bit) and (int(self.bit.min()) < 0 or int(self.bit.max()) > last):
            raise ConfigError(f"bits must lie in 0..{last} for {self.fmt} under {self.fault.name}")

    def __len__(self) -> int:
        return len(self.index)

    def subset(
        self,
        positions: torch.Tensor,
        *,
        index_offset: torch.Tensor | int = 0,
        image_offset: int = 0,
    ) -> TrialGroup:
        """The trials at ``positions``, with indices and images shifted down by the offsets."""
        return TrialGroup(
            self.kind,
            self.layer,
            self.fmt,
            self.index[positions] - index_offset,
            self.bit[positions],
            self.image[positions] - image_offset,
            self.fault,
        )


@dataclass(frozen=True)
class Outcomes:
    """Per trial, in the order of the trials given. ``value_before`` is the faulty value as the
    number format stores it, ``value_after`` the value the model computed with."""

    faulty_top1: torch.Tensor  # int64; -1 where a logit is NaN
    golden_top1: torch.Tensor
    sdc: torch.Tensor
    non_finite: torch.Tensor
    top2diff: torch.Tensor  # percent; NaN where non_finite
    value_before: torch.Tensor
    value_after: torch.Tensor

    @staticmethod
    def cat(parts: Sequence[Outcomes]) -> Outcomes:
        return Outcomes(
            **{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Outcomes)}
        )

    @staticmethod
    def empty() -> Outcomes:
        long, boolean, real = (
            torch.empty(0, dtype=t) for t in (torch.long, torch.bool, torch.float32)
        )
        return Outcomes(long, long, boolean, boolean, real, real, real)

    def select(self, order: torch.Tensor) -> Outcomes:
        return Outcomes(**{f.name: getattr(self, f.name)[order] for f in fields(Outcomes)})


def is_sdc(
    faulty_top1: torch.Tensor,
    golden_top1: torch.Tensor,
    non_finite: torch.Tensor,
    non_finite_sdc: bool,
) -> torch.Tensor:
    """The SDC rule. ``non_finite_sdc`` (bitstorm's protocol): any non-finite logit is an SDC.
    Otherwise (goldeneye's: its loss is NaN, and goldeneye leaves such a trial out of the SDC
    count but in the denominator) a trial with a non-finite logit is never an SDC."""
    if non_finite_sdc:
        return non_finite | (faulty_top1 != golden_top1)
    return ~non_finite & (faulty_top1 != golden_top1)


def outcomes_of(
    logits: torch.Tensor,
    golden_top1: torch.Tensor,
    before: torch.Tensor,
    after: torch.Tensor,
    non_finite_sdc: bool = True,
) -> Outcomes:
    """Outcomes of faulty ``logits`` (one row per trial) under the SDC rule :func:`is_sdc`; a
    NaN logit leaves no top-1 (-1)."""
    non_finite = ~torch.isfinite(logits).all(dim=1)
    has_nan = logits.isnan().any(dim=1)
    faulty = torch.where(has_nan, -1, logits.nan_to_num(nan=-math.inf).argmax(dim=1))
    return Outcomes(
        faulty_top1=faulty.cpu(),
        golden_top1=golden_top1.cpu(),
        sdc=is_sdc(faulty, golden_top1, non_finite, non_finite_sdc).cpu(),
        non_finite=non_finite.cpu(),
        top2diff=top2diff(logits).cpu(),
        value_before=before.float().cpu(),
        value_after=after.float().cpu(),
    )

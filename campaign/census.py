"""The exhaustive last layer as counts: every site x bit x image of a final classifier, swept
without a forward (campaign.faults.analytic), tallied by bit, golden value range and whether the
faulty output unit is the image's golden top-1 (``census`` in campaign.store).

Why counts: a final Linear of 512 x 10 weights, 32 bits and 256 images is 42 million trials;
its rates, the reproduction's breakdowns and its share of non-finite logits need only these.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from torch import nn

from campaign.faults.trials import Outcomes, TrialGroup
from campaign.store import CENSUS_SCHEMA, VALUE_RANGE_EDGES, VALUE_RANGES, trial_table

_RANGES = len(VALUE_RANGES)


class CensusTally:
    """Counts of trials, SDCs and non-finite logits per (bit, value range, top-1 unit)."""

    def __init__(self, width: int) -> None:
        self.width = width
        cells = width * _RANGES * 2
        self.trials = torch.zeros(cells, dtype=torch.long)
        self.sdc = torch.zeros(cells, dtype=torch.long)
        self.non_finite = torch.zeros(cells, dtype=torch.long)

    def add(self, module: nn.Linear, group: TrialGroup, outcomes: Outcomes) -> None:
        if group.kind == "weight":
            unit = group.index // module.in_features
        else:
            unit = group.index % module.out_features
        top1 = (unit == outcomes.golden_top1).long()
        edges = torch.tensor(VALUE_RANGE_EDGES)
        value_range = torch.bucketize(outcomes.value_before, edges, right=True)
        cell = (group.bit * _RANGES + value_range) * 2 + top1
        size = len(self.trials)
        self.trials += torch.bincount(cell, minlength=size)
        self.sdc += torch.bincount(cell, weights=outcomes.sdc.double(), minlength=size).long()
        self.non_finite += torch.bincount(
            cell, weights=outcomes.non_finite.double(), minlength=size
        ).long()

    def table(self, fmt: str, shard: int) -> pa.Table:
        seen = self.trials.nonzero().flatten()
        return trial_table(
            {
                "format": fmt,
                "bit": seen // (2 * _RANGES),
                "value_range": (seen // 2) % _RANGES,
                "top1": (seen % 2).bool(),
                "trials": self.trials[seen],
                "sdc": self.sdc[seen],
                "non_finite": self.non_finite[seen],
                "shard": shard,
            },
            CENSUS_SCHEMA,
            "census",
        )

"""The exhaustive last layer's counts: every trial lands in exactly one cell (bit, golden value
range, top-1 unit or not), and the cells add up to what the outcomes say."""

import torch
from torch import nn

from campaign.census import CensusTally
from campaign.faults.trials import Outcomes, TrialGroup
from campaign.store import VALUE_RANGES


def test_census_cells_add_up_to_the_outcomes():
    layer = nn.Linear(4, 3)  # weight index i is output unit i // 4
    index = torch.tensor([0, 4, 8, 0, 4, 11])
    bit = torch.tensor([30, 30, 30, 1, 1, 31])
    before = torch.tensor([-3.0, -2.0, -0.5, 0.5, 1.0, 2.0])  # one per value range
    golden_top1 = torch.tensor([0, 0, 2, 1, 1, 2])
    sdc = torch.tensor([True, False, True, False, False, True])
    non_finite = torch.tensor([True, False, False, False, False, False])
    outcomes = Outcomes(golden_top1, golden_top1, sdc, non_finite, torch.zeros(6), before, before)
    group = TrialGroup("weight", "0", "fp32", index, bit, torch.zeros(6, dtype=torch.long))
    tally = CensusTally(32)
    tally.add(layer, group, outcomes)
    table = tally.table("fp32", shard=7).to_pylist()
    assert sum(r["trials"] for r in table) == 6 and sum(r["sdc"] for r in table) == 3
    cells = {(r["bit"], VALUE_RANGES[r["value_range"]], r["top1"]): r for r in table}
    assert cells[30, "v < -2", True]["non_finite"] == 1  # unit 0, golden top-1 0
    assert cells[30, "-2 <= v < -1", False]["trials"] == 1  # unit 1, golden top-1 0
    assert cells[30, "-1 <= v < 0", True]["sdc"] == 1  # unit 2
    assert cells[1, "0 <= v < 1", False]["trials"] == 1  # unit 0 vs golden 1
    assert cells[1, "1 <= v < 2", True]["trials"] == 1  # unit 1
    assert cells[31, "v >= 2", True]["sdc"] == 1  # unit 2
    assert {r["shard"] for r in table} == {7} and {r["format"] for r in table} == {"fp32"}
    neuron = TrialGroup(
        "neuron", "0", "fp32", torch.tensor([2]), torch.tensor([3]), torch.tensor([0])
    )
    tally.add(layer, neuron, outcomes.select(torch.tensor([2])))  # logit 2, top-1 2
    assert any(r["bit"] == 3 and r["top1"] for r in tally.table("fp32", 7).to_pylist())

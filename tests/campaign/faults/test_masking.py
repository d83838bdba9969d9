"""Faults that change nothing downstream (the next clamp removes them, or they leave their value
as it was): settled without a suffix, and only those."""

import math

import pytest
import torch
import torchvision
from torch import nn

from campaign.faults.bits import fault_model, flip, same_bits
from campaign.faults.engine import Engine
from campaign.faults.masking import (
    NEURON_TECHNIQUE,
    UNCHANGED_TECHNIQUE,
    WEIGHT_TECHNIQUE,
    ClampRule,
    clamp_rule,
)
from campaign.faults.trials import TrialGroup


class Block(nn.Module):
    """conv -> bn -> (+ residual) -> relu, then a classifier: the chain masking follows."""

    def __init__(self, residual: bool, reader: str = "relu") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.residual, self.reader = residual, reader
        self.head = nn.Linear(3 * 8 * 8, 5)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.residual:
            y = y + x
        y = torch.relu(y) if self.reader == "relu" else torch.sigmoid(y)
        return self.head(y.flatten(1))


def _block(residual: bool, reader: str = "relu") -> nn.Module:
    torch.manual_seed(0)
    model = Block(residual, reader).eval()
    with torch.no_grad():  # a BatchNorm that is not the identity: the affine map matters
        model.bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1]))
        model.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
        model.bn.weight.copy_(torch.tensor([1.2, -0.7, 0.9]))
        model.bn.bias.copy_(torch.tensor([-0.1, 0.2, 0.05]))
    return model


def _all_neuron_faults(engine: Engine, layer: str, images: int) -> TrialGroup:
    """Every element x bit x image of ``layer``'s output."""
    elements = engine.sites[layer].neuron_elements
    index = torch.arange(elements).repeat_interleave(32 * images)
    bit = torch.arange(32).repeat_interleave(images).repeat(elements)
    image = torch.arange(images).repeat(elements * 32)
    return TrialGroup("neuron", layer, "fp32", index, bit, image)


@pytest.mark.parametrize("residual", [False, True])
def test_settled_trials_have_the_outcomes_their_suffix_gives(residual):
    model = _block(residual)
    images = torch.randn(4, 3, 8, 8)
    group = _all_neuron_faults(Engine(model, images[:1], device="cpu"), "conv", len(images))
    on = Engine(model, images[:1], device="cpu")
    off = Engine(model, images[:1], device="cpu", settle_masked=False)
    settled, ran = (e.run(e.golden(images), group) for e in (on, off))
    count = on.settled[NEURON_TECHNIQUE]
    assert 0 < count < len(group) and not off.settled
    for field in ("faulty_top1", "sdc", "non_finite"):
        assert torch.equal(getattr(settled, field), getattr(ran, field)), field
    assert torch.equal(settled.value_after.nan_to_num(7), ran.value_after.nan_to_num(7))
    # The settled ones are exactly the trials whose relu input stays <= 0 both ways.
    with torch.no_grad():
        pre = model.bn(model.conv(images)) + (images if residual else 0)
    golden = pre.reshape(len(images), -1)[group.image, group.index]
    channel = group.index // 64
    bn = model.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    after = (settled.value_after - bn.running_mean[channel]) * scale[channel] + bn.bias[channel]
    if residual:
        after = after + images.reshape(len(images), -1)[group.image, group.index]
    clearly_masked = (golden < -1e-3) & (after < -1e-3)
    assert clearly_masked.sum() <= count <= ((golden <= 0) & (after <= 0)).sum()


def test_no_rule_where_the_layer_output_has_another_reader_or_no_clamp():
    images = torch.randn(2, 3, 8, 8)
    sigmoid = Engine(_block(False, "sigmoid"), images[:1], device="cpu")
    assert clamp_rule(sigmoid.traced.cut("conv", 0)) is None
    # resnet18: conv1 -> bn1 -> relu settles; the stem's relu is read by a maxpool: still one
    # chain; the final Linear has no clamp after it.
    resnet = Engine(torchvision.models.resnet18(num_classes=10), images[:1], device="cpu")
    assert clamp_rule(resnet.traced.cut("layer1.0.conv1", 0)) is not None
    assert clamp_rule(resnet.traced.cut("layer1.0.conv2", 0)).addend is not None
    assert clamp_rule(resnet.traced.cut("fc", 0)) is None
    # mobilenet_v2's projection convs (no activation after them) have none.
    mobilenet = Engine(torchvision.models.mobilenet_v2(num_classes=10), images[:1], device="cpu")
    assert clamp_rule(mobilenet.traced.cut("features.1.conv.1", 0)) is None
    assert clamp_rule(mobilenet.traced.cut("features.0.0", 0)).high == 6.0


def test_a_near_tie_at_the_clamp_and_nan_are_not_settled():
    rule = ClampRule(
        0.0,
        math.inf,
        scale=torch.tensor([2.0]),
        shift=torch.tensor([-1.0]),
        magnitude=torch.tensor([1.0]),
    )
    channel = torch.zeros(4, dtype=torch.long)
    golden = torch.tensor([-3.0, -3.0, -3.0, -3.0])
    # 0.5 * 2 - 1 is exactly 0 in float64, but a kernel in float32 could round either way:
    # only a value clearly below stays; NaN passes a relu; -inf stays below.
    faulty = torch.tensor([0.5 - 1e-9, float("nan"), -1.0, -math.inf])
    assert rule.settles(channel, golden, faulty).tolist() == [False, False, True, True]
    above = ClampRule(0.0, 6.0)
    both_high = above.settles(channel[:2], torch.tensor([7.0, 7.0]), torch.tensor([9.0, 5.0]))
    assert both_high.tolist() == [True, False]


def test_weight_faults_that_meet_only_padding_or_zeros_are_settled_exactly():
    """A 3x3 conv on a 1x1 map: only the centre tap meets the image, the other eight only the
    padding; and an input channel that is zero leaves its centre taps nothing to change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4, 5))
    model.eval()
    images = torch.randn(3, 3, 1, 1)
    images[1, 2] = 0.0  # image 1's third channel: its centre taps multiply a zero
    probe = Engine(model, images[:1], device="cpu")
    weights = probe.sites["0"].weight_elements
    index = torch.arange(weights).repeat_interleave(32 * 3)
    bit = torch.arange(32).repeat_interleave(3).repeat(weights)
    image = torch.arange(3).repeat(weights * 32)
    group = TrialGroup("weight", "0", "fp32", index, bit, image)
    on = Engine(model, images[:1], device="cpu")
    off = Engine(model, images[:1], device="cpu", settle_masked=False)
    settled, ran = (e.run(e.golden(images), group) for e in (on, off))
    for field in ("faulty_top1", "sdc", "non_finite"):
        assert torch.equal(getattr(settled, field), getattr(ran, field)), field
    tap, in_channel = index % 9, (index // 9) % 3
    zero_input = (tap != 4) | ((image == 1) & (in_channel == 2))
    finite = torch.isfinite(flip(model[0].weight.detach().flatten()[index], bit, "fp32"))
    assert on.settled[WEIGHT_TECHNIQUE] == int((zero_input & finite).sum()) > 0
    assert not off.settled


@pytest.mark.parametrize("kind", ["weight", "neuron"])
def test_a_stuck_at_bit_that_already_holds_is_settled_as_a_masked_trial(kind):
    """Sign bit stuck at 0: a no-op for every non-negative value, which takes the golden
    outcome without a forward, counted in the group (never dropped); the others run."""
    model = _block(residual=False, reader="sigmoid")  # no clamp: only the no-op rule settles
    images = torch.randn(6, 3, 8, 8)
    size = model.conv.weight.numel() if kind == "weight" else 3 * 8 * 8
    generator = torch.Generator().manual_seed(5)
    index = torch.randint(0, size, (300,), generator=generator)
    group = TrialGroup(
        kind,
        "conv",
        "fp32",
        index,
        torch.full((300,), 31),
        torch.randint(0, 6, (300,), generator=generator),
        fault_model("stuck_at_0"),
    )
    on = Engine(model, images[:1], device="cpu")
    off = Engine(model, images[:1], device="cpu", settle_masked=False)
    settled, ran = (e.run(e.golden(images), group) for e in (on, off))
    held = same_bits(settled.value_before, settled.value_after)
    assert 0 < int(held.sum()) < len(group)
    assert on.settled[UNCHANGED_TECHNIQUE] == int(held.sum()) and not off.settled
    for field in ("faulty_top1", "sdc", "non_finite", "top2diff"):
        assert torch.equal(getattr(settled, field), getattr(ran, field)), field
    assert not settled.sdc[held].any() and len(settled.sdc) == len(group)

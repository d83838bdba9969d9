"""Layers that are not torch.nn's own: subclasses that compute otherwise, and layers that torch.fx
keeps inside a torch.nn module (the engine once crashed on both: the zoo found them in timm's
``resnetv2_50x1_bit`` and ``tf_efficientnet_b0``); and how the engine evaluates weights that the
delta rule does not cover, and groups that share a layer."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, Conv2dSame, StdConv2d
from torch import nn

from bitstorm.metrics import top2diff
from campaign.faults.bits import FORMATS, flip
from campaign.faults.engine import Engine
from campaign.faults.graph import computes_as
from campaign.faults.reference import Trial
from campaign.faults.sites import find_sites
from campaign.faults.trials import KINDS, TrialGroup

from .checks import check, run_trials
from .test_sites import BiasTable, SharedConv


class CustomLayers(nn.Module):
    """A weight-standardised conv, a BatchNorm with its activation inside, a conv with
    TensorFlow's "same" padding computed in its forward, and a torch.nn encoder layer (kept
    whole by torch.fx, so its Linears have no nodes of their own)."""

    def __init__(self) -> None:
        super().__init__()
        self.std = StdConv2d(3, 8, 3, padding=1)
        self.bn = BatchNormAct2d(8)
        self.same = Conv2dSame(8, 8, 3, stride=2)
        # A SiLU keeps the encoder off PyTorch's fused fast path, so its Linears run as modules.
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, 0.0, F.silu, batch_first=True)
        self.head = nn.Linear(8 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.same(self.bn(self.std(x)))  # [B, 8, 4, 4]
        return self.head(self.encoder(x.flatten(2).transpose(1, 2)).flatten(1))


def _model() -> CustomLayers:
    torch.manual_seed(0)
    model = CustomLayers()
    with torch.no_grad():  # statistics that matter, and negative values for the activation
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_layers_beyond_torch_nn_take_the_evaluator_that_is_exact_for_them():
    model = _model()
    images = torch.randn(4, 3, 8, 8)
    engine = Engine(model, images[:1], device="cpu")
    assert engine.mode == "suffix"
    assert not computes_as(model.std, nn.Conv2d) and not computes_as(model.bn, nn.BatchNorm2d)
    assert computes_as(model.head, nn.Linear)
    expected = {
        ("weight", "std"): "weight edit",  # the whole weight is standardised: no delta rule
        ("neuron", "std"): "suffix",  # kept as one node although timm's, not torch.nn's
        ("weight", "same"): "weight edit",  # pads inside its forward
        ("neuron", "same"): "suffix",
        ("weight", "encoder.linear1"): "hooks",  # no node of its own: the delta in a hook
        ("neuron", "encoder.linear1"): "hooks",
        ("weight", "encoder.self_attn.out_proj"): "weight edit",  # never called
        ("weight", "head"): "suffix",
        ("neuron", "head"): "suffix",
    }
    assert {key: engine.evaluator(*key) for key in expected} == expected

    space = find_sites(model, images)
    rng = random.Random(0)
    trials = []
    for site in space:
        for kind in KINDS if site.output_shapes else ("weight",):
            size = site.weight_elements if kind == "weight" else site.neuron_elements
            for fmt in ("fp32", "fp32", "fp32", "fp16", "int8"):
                bit = rng.choice([FORMATS[fmt].width - 2, rng.randrange(FORMATS[fmt].width)])
                trials.append(Trial(kind, site.name, rng.randrange(size), bit, fmt))
    cache = engine.golden(images, space.names(), KINDS)
    checked = check(engine, model, cache, trials)
    assert not checked.unchecked
    assert all(d.near_tie for d in checked.disagreements), checked.disagreements
    sdc = torch.cat([o.sdc for o in checked.outcomes.values()])
    assert sdc.any() and not sdc.all()


def test_batchnorm_is_folded_only_where_both_layers_compute_as_torch_nn_does():
    """A suffix folds an eval BatchNorm into the conv before it, but never into a StdConv2d (its
    forward would standardise the folded weight again) and never a BatchNormAct2d (its
    activation would be lost)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        StdConv2d(4, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1),
        BatchNormAct2d(8),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )
    with torch.no_grad():
        for norm in (model[2], model[4], model[6]):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    model.eval()
    images = torch.randn(3, 3, 6, 6)
    engine = Engine(model, images[:1], device="cpu")
    folded = [name for name, _ in engine.traced.cut("0", 0).suffix.named_children()]
    assert [name for name in folded if name.startswith("folded_")] == ["folded_5"]
    cache = engine.golden(images, ["0"], ["neuron"])
    trials = [
        Trial("neuron", "0", index, bit, "fp32") for index in range(0, 144, 13) for bit in (31, 22)
    ]
    checked = check(engine, model, cache, trials)
    assert all(d.near_tie for d in checked.disagreements), checked.disagreements


def _hand_weight(model, images, trial):
    """Faulty logits: the weight element flipped in a copy, a full forward."""
    faulty = copy.deepcopy(model)
    with torch.no_grad():
        flat = faulty.get_submodule(trial.layer).weight.view(-1)
        flat[trial.index] = flip(flat[trial.index].clone(), trial.bit, trial.fmt)
        return faulty(images)


@pytest.mark.parametrize(
    ("make", "layer", "shape", "external"),
    [(BiasTable, "table_mlp", (3, 2, 2), "head"), (SharedConv, "conv", (4, 16, 16), "x")],
    ids=["read_only_by_constants", "module_called_twice"],
)
def test_weight_edits_rerun_only_from_where_the_weight_meets_the_images(
    make, layer, shape, external
):
    """A weight the delta rule does not cover is edited for a run of the part of the graph
    that sees it: a bias table's MLP from the add where the table meets the images (the head's
    output its one cached input), a shared conv from its first call (on the image). Outcomes
    equal a full forward with the weight edited by hand."""
    torch.manual_seed(0)
    model = make().eval()
    images = torch.randn(4, *shape)
    engine = Engine(model, images[:1], device="cpu")
    assert engine.evaluator("weight", layer) == "weight edit"
    edit = engine.traced.edit_cut(layer, engine.model.get_submodule(layer).weight)
    assert [node.name for node in edit.externals] == [external]
    cache = engine.golden(images, [layer], ["weight"])
    size = engine.sites[layer].weight_elements
    trials = [Trial("weight", layer, i % size, bit, "fp32") for i in range(6) for bit in (30, 22)]
    outcomes = run_trials(engine, cache, trials)
    for trial in trials:
        logits = _hand_weight(model, images, trial)
        expected = torch.where(logits.isnan().any(1), -1, logits.nan_to_num(nan=-1e38).argmax(1))
        assert torch.equal(outcomes[trial].faulty_top1, expected), trial
        torch.testing.assert_close(
            outcomes[trial].top2diff, top2diff(logits), equal_nan=True, rtol=1e-4, atol=1e-4
        )


def test_groups_at_one_cut_share_their_forwards_and_keep_their_outcomes():
    """run_many packs every group at a layer (both kinds, several formats) into shared suffix
    batches; each group's outcomes are those it gets alone."""
    torch.manual_seed(0)
    model = _model()
    images = torch.randn(6, 3, 8, 8)
    gen = torch.Generator().manual_seed(1)

    def group(kind, layer, fmt, n):
        size = engine.sites[layer]
        limit = size.weight_elements if kind == "weight" else size.neuron_elements
        return TrialGroup(
            kind,
            layer,
            fmt,
            torch.randint(0, limit, (n,), generator=gen),
            torch.randint(0, FORMATS[fmt].width, (n,), generator=gen),
            torch.randint(0, len(images), (n,), generator=gen),
        )

    engine = Engine(model, images[:1], device="cpu", batch_size=7)
    groups = [
        group("neuron", "same", "fp32", 9),
        group("weight", "head", "fp32", 5),
        group("neuron", "head", "int8", 11),
        group("neuron", "head", "fp16", 3),
        group("weight", "same", "fp32", 4),  # an edit: its own forwards
    ]
    cache = engine.golden(images)
    together = engine.run_many(cache, groups)
    for g, shared in zip(groups, together, strict=True):
        alone = engine.run(cache, g)
        assert torch.equal(shared.faulty_top1, alone.faulty_top1)
        assert torch.equal(shared.value_after, alone.value_after)
        torch.testing.assert_close(shared.top2diff, alone.top2diff, equal_nan=True)


def _windows(t: torch.Tensor) -> torch.Tensor:
    """[B, 8, 8, C] -> [B * 4, 16, C]: four 4x4 windows per image, as Swin partitions."""
    b, _, _, c = t.shape
    return t.reshape(b, 2, 4, 2, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(b * 4, 16, c)


class Windowed(nn.Module):
    """A Linear on windows (its output has no image dimension) beside a Linear on the image's
    tokens, whose output is then windowed too and added: the suffix after ``tokens`` needs the
    windows' value, laid out ``[images x windows, ...]``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.windowed = nn.Linear(8, 8)
        self.tokens = nn.Linear(8, 8)
        self.head = nn.Linear(8 * 64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).permute(0, 2, 3, 1)  # [B, 8, 8, 8]
        y = _windows(self.tokens(t)) + self.windowed(_windows(t))  # [B * 4, 16, 8]
        return self.head(y.reshape(x.shape[0], -1))


def test_values_without_one_row_per_image_are_recomputed_not_taken_from_the_cache():
    """A cached value is selected per trial by image; one laid out [images x windows, ...]
    cannot be, so a suffix recomputes it from the image's tokens (the engine once took window
    rows for images: timm's Swin and MaxViT crashed on it in the zoo)."""
    torch.manual_seed(0)
    model = Windowed().eval()
    images = torch.randn(4, 3, 8, 8)
    engine = Engine(model, images[:1], device="cpu")
    edit = engine.traced.edit_cut("windowed", engine.model.windowed.weight)
    for externals in (engine.traced.cut("tokens", 0).externals, edit.externals):
        assert externals and all(node in engine.traced.batched for node in externals)
    assert not engine.sites["windowed"].output_shapes
    rng = random.Random(0)
    trials = [
        Trial(kind, layer, rng.randrange(size), bit, "fp32")
        for kind, layer, size in [
            ("neuron", "tokens", 8 * 64),
            ("weight", "tokens", 64),
            ("weight", "windowed", 64),
            ("neuron", "stem", 8 * 64),
        ]
        for bit in (30, 28, 26, 31)
    ]
    cache = engine.golden(images, ["tokens", "windowed", "stem"], KINDS)
    checked = check(engine, model, cache, trials)
    assert not checked.unchecked
    assert all(d.near_tie for d in checked.disagreements), checked.disagreements

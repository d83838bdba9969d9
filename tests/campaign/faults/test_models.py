"""Real torchvision models whose graphs once broke the engine, every layer of them.

- Swin-V2's continuous position bias: ``attn.cpb_mlp`` maps a fixed coordinate table, not the
  images, so its output has no image dimension and the table is shared by every image. Such a
  layer has weight sites only; a weight fault is the weight edited in place and the graph run
  again from the window attention where the table meets the images. The test holds each one
  against a full forward with the weight edited by hand.
- ViT: ``n, c, h, w = x.shape`` sizes a later reshape from the input image itself, so the suffix
  after ``conv_proj`` must take the image as an external value.
"""

import copy
import math
import random

import pytest
import torch
import torchvision
from torch import nn

from bitstorm.errors import ConfigError
from bitstorm.metrics import top2diff
from campaign.faults.bits import flip
from campaign.faults.engine import Engine
from campaign.faults.reference import Trial
from campaign.faults.sites import find_sites
from campaign.faults.trials import KINDS, TrialGroup

from .checks import check, run_trials

# Exponent bits and the sign make most flips matter; a low mantissa bit rarely does.
BITS = (30, 29, 28, 27, 26, 23, 31, 10)


def _top1(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 per row with the engine's convention: -1 where a logit is NaN."""
    return torch.where(logits.isnan().any(dim=1), -1, logits.nan_to_num(nan=-math.inf).argmax(1))


def test_swin_v2_every_layer_runs_and_position_bias_weight_faults_are_exact():
    torch.manual_seed(0)
    model = torchvision.models.swin_v2_t(num_classes=10).eval()
    images = torch.randn(2, 3, 64, 64)  # 16x16 tokens in stage 1: shifted, masked windows
    engine = Engine(model, images[:1], device="cpu")
    assert engine.mode == "suffix"
    space = find_sites(model, images)
    bias_mlps = [site for site in space if ".attn.cpb_mlp." in site.name]
    assert len(bias_mlps) == 2 * sum(len(model.features[i]) for i in (1, 3, 5, 7))
    for site in bias_mlps:
        assert site.output_shapes == () and "no image dimension" in site.neuron_note
    cache = engine.golden(images, space.names(), KINDS)
    rng = random.Random(0)
    trials = []
    for site in space:
        trials.append(Trial("weight", site.name, rng.randrange(site.weight_elements), 30, "fp32"))
        if site.output_shapes:
            trials += [
                Trial("neuron", site.name, rng.randrange(site.neuron_elements), bit, "fp32")
                for bit in (30, rng.choice(BITS))
            ]
    trials = list(dict.fromkeys(trials))  # each once
    outcomes = run_trials(engine, cache, trials)
    assert all(len(outcome.sdc) == len(images) for outcome in outcomes.values())
    zero = torch.tensor([0])
    with pytest.raises(ConfigError, match="no neuron sites"):
        engine.run(cache, TrialGroup("neuron", bias_mlps[0].name, "fp32", zero, zero, zero))

    # The position-bias weights by hand: the element flipped in a copy, a full forward.
    faulty = copy.deepcopy(model)
    with torch.no_grad():
        golden_margin = top2diff(model(images))
    changed = 0
    for trial in (t for t in trials if ".attn.cpb_mlp." in t.layer):
        flat = faulty.get_submodule(trial.layer).weight.data.view(-1)
        original = flat[trial.index].clone()
        flat[trial.index] = flip(original, trial.bit, trial.fmt)
        with torch.no_grad():
            logits = faulty(images)
        flat[trial.index] = original
        outcome = outcomes[trial]
        assert torch.equal(outcome.faulty_top1, _top1(logits)), trial
        assert torch.equal(outcome.non_finite, ~torch.isfinite(logits).all(dim=1)), trial
        torch.testing.assert_close(outcome.top2diff, top2diff(logits), equal_nan=True)
        changed += int((outcome.top2diff != golden_margin).any())
    assert changed > 0  # the check saw faults that change the logits


def test_vit_suffix_after_conv_proj_takes_the_image_and_agrees_with_the_reference():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight, std=0.5)  # zero-initialised: all logits equal
    images = torch.randn(3, 3, 32, 32)
    engine = Engine(model, images[:1], device="cpu")
    assert engine.mode == "suffix"
    assert engine.traced.image in engine.traced.cut("conv_proj", 0).externals
    blocks = "encoder.layers.encoder_layer_"
    out_proj = f"{blocks}0.self_attention.out_proj"
    rng = random.Random(1)
    trials = []
    for layer, formats in [
        ("conv_proj", ("fp32", "fp32", "fp32", "int8", "fp16")),
        (f"{blocks}0.mlp.0", ("fp32", "bf16")),
        (f"{blocks}11.mlp.3", ("fp32",)),
        ("heads.head", ("fp32", "int8")),
        (out_proj, ("fp32", "fp32")),
    ]:
        site = engine.sites[layer]
        for kind in KINDS if site.output_shapes else ("weight",):
            size = site.weight_elements if kind == "weight" else site.neuron_elements
            for fmt in formats:
                bit = rng.choice(BITS) % (8 if fmt == "int8" else 16 if fmt != "fp32" else 32)
                trials.append(Trial(kind, layer, rng.randrange(size), bit, fmt))
    assert not engine.sites[out_proj].output_shapes  # MultiheadAttention runs it functionally
    cache = engine.golden(images, sorted({t.layer for t in trials}), KINDS)
    checked = check(engine, model, cache, trials)
    assert not checked.unchecked and len(checked.compared) == len(trials)
    assert all(d.near_tie for d in checked.disagreements), checked.disagreements
    sdc = torch.cat([o.sdc for o in checked.outcomes.values()])
    assert sdc.any() and not sdc.all()

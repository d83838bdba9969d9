"""The pytorchfi oracle against injections made by hand: a weight edited in place, or a plain
forward hook that flips one output element."""

import copy
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitstorm.errors import ConfigError
from campaign.faults.bits import FORMATS, flip, int8_scale
from campaign.faults.reference import Trial, random_weight_trials, reference_logits
from campaign.faults.sites import activation_peaks, find_sites

from .test_sites import SharedConv


class TinyNet(nn.Module):
    """Covers 4-d (conv), 3-d (token Linear) and 2-d (classifier) outputs, plus a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.tokens = nn.Linear(8, 12)
        self.fc = nn.Linear(16 * 12, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.conv2(x))  # [B, 8, 4, 4]
        t = F.gelu(self.tokens(x.flatten(2).transpose(1, 2)))  # [B, 16, 12]
        return self.fc(t.flatten(1))


def _tiny_net() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _by_hand(
    model: nn.Module, images: torch.Tensor, trial: Trial, neuron_scale=None
) -> torch.Tensor:
    faulty = copy.deepcopy(model)
    module = faulty.get_submodule(trial.layer)
    with torch.no_grad():
        if trial.kind == "weight":
            flat = module.weight.view(-1)
            scale = int8_scale(module.weight) if trial.fmt == "int8" else None
            flat[trial.index] = flip(flat[trial.index].clone(), trial.bit, trial.fmt, scale)
            return faulty(images)

        def hook(_module, _inputs, output):
            flat = output.view(len(output), -1)
            flat[:, trial.index] = flip(
                flat[:, trial.index].clone(), trial.bit, trial.fmt, neuron_scale
            )

        module.register_forward_hook(hook)
        return faulty(images)


def _random_trials(model, example, count, seed):
    rng = random.Random(seed)
    space = find_sites(model, example, types="weighted")
    trials = []
    for i in range(count):
        layer = rng.choice(space.layers)
        kind = ("weight", "neuron")[i % 2]
        fmt = list(FORMATS)[(i // 2) % 4]
        size = layer.weight_elements if kind == "weight" else layer.neuron_elements
        trials.append(
            Trial(kind, layer.name, rng.randrange(size), rng.randrange(FORMATS[fmt].width), fmt)
        )
    return trials


def test_reference_matches_hand_injection_on_random_trials():
    model = _tiny_net()
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    trials = _random_trials(model, images[:1], count=96, seed=7)
    assert {(t.kind, t.fmt) for t in trials} == {
        (k, f) for k in ("weight", "neuron") for f in FORMATS
    }
    assert {t.layer for t in trials} == {"conv", "bn", "conv2", "tokens", "fc"}
    peaks = activation_peaks(model, images, ["conv", "bn", "conv2", "tokens", "fc"])
    got = reference_logits(model, images, trials)
    golden = model(images)
    changed = 0
    for trial, logits in zip(trials, got, strict=True):
        scale = peaks[trial.layer] / 127 if trial.kind == "neuron" and trial.fmt == "int8" else None
        expected = _by_hand(model, images, trial, scale)
        torch.testing.assert_close(logits, expected, rtol=0, atol=0, equal_nan=True, msg=str(trial))
        changed += not torch.equal(logits, golden)
    assert changed > len(trials) // 4  # the trials really perturb something


def test_last_layer_faults_touch_exactly_the_intended_logits():
    model = _tiny_net()
    images = torch.randn(4, 3, 8, 8)
    golden = model(images)
    # Output (neuron) 7 of fc is logit 7 itself; weight (3, 5) of fc only feeds logit 3.
    neuron, weight = reference_logits(
        model,
        images,
        [Trial("neuron", "fc", 7, 30, "fp32"), Trial("weight", "fc", 3 * 192 + 5, 30, "fp32")],
    )
    assert (neuron != golden).any(dim=0).nonzero().flatten().tolist() == [7]
    assert torch.equal(neuron[:, 7], flip(golden[:, 7], 30, "fp32"))
    assert (weight != golden).any(dim=0).nonzero().flatten().tolist() == [3]


def test_reference_leaves_the_model_untouched():
    model = _tiny_net()
    state = copy.deepcopy(model.state_dict())
    reference_logits(model, torch.randn(2, 3, 8, 8), [Trial("weight", "conv", 5, 30, "fp32")])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_reference_refuses_what_pytorchfi_would_get_wrong():
    images = torch.randn(2, 4, 16, 16)
    with pytest.raises(ConfigError, match="runs 2 times per forward"):
        reference_logits(SharedConv().eval(), images, [Trial("neuron", "conv", 0, 3, "fp32")])
    # A weight fault in a shared module is well defined: one memory location, every call sees it.
    out = reference_logits(SharedConv().eval(), images, [Trial("weight", "conv", 0, 30, "fp32")])
    assert out.shape == (1, 2, 3)

    attention = nn.MultiheadAttention(8, 2, batch_first=True)

    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = attention, nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].mean(1))

    with pytest.raises(ConfigError, match="functionally"):
        reference_logits(
            Attend().eval(), torch.randn(2, 5, 8), [Trial("neuron", "attn.out_proj", 0, 1, "fp32")]
        )


class TwiceThenOnce(nn.Module):
    """A Linear ``a`` called twice, then a Linear ``b`` of the same type called once."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


def _matches_by_hand(model: nn.Module, images: torch.Tensor, trials: list[Trial]) -> None:
    """Each trial's reference logits are the hand-made fault's, bit for bit, and not golden."""
    got = reference_logits(model, images, trials)
    for trial, logits in zip(trials, got, strict=True):
        expected = _by_hand(model, images, trial)
        torch.testing.assert_close(logits, expected, rtol=0, atol=0, equal_nan=True, msg=str(trial))
        assert not torch.equal(logits, model(images))


def test_neuron_fault_beside_a_module_called_twice():
    torch.manual_seed(0)
    model = TwiceThenOnce().eval()
    images = torch.randn(3, 6)
    # Another module of b's type running twice must not stop faults in b, which runs once.
    trials = [Trial("neuron", "b", 2, 30, "fp32"), Trial("neuron", "b", 1, 3, "fp16")]
    _matches_by_hand(model, images, trials)
    with pytest.raises(ConfigError, match="runs 2 times per forward"):
        reference_logits(model, images, [Trial("neuron", "a", 0, 30, "fp32")])


class Block(nn.Module):
    def __init__(self, position: nn.Module) -> None:
        super().__init__()
        self.position = position  # one module held by every block (CoaT's position encoding)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return torch.relu(self.conv(x + self.position(x)))


class SharedAcrossBlocks(nn.Module):
    """A conv held by the root and by two blocks: pytorchfi hooks it three times, so each call
    counts three times in its neuron layer numbering. ``stem`` is held twice and called once."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.entry = nn.Sequential(self.stem)
        self.position = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.blocks = nn.ModuleList([Block(self.position) for _ in range(2)])
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        x = self.entry(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.flatten(1))


def test_neuron_faults_after_and_in_modules_held_by_several_parents():
    """pytorchfi numbers neuron layers by hook calls, with one hook per holder of a module; the
    reference follows that numbering, so the fault lands where it belongs (the zoo found this
    in timm's CoaT)."""
    torch.manual_seed(0)
    model = SharedAcrossBlocks().eval()
    images = torch.randn(3, 3, 6, 6)
    trials = [
        Trial("neuron", "blocks.1.conv", 40, 30, "fp32"),
        Trial("neuron", "blocks.0.conv", 7, 31, "fp32"),
        Trial("neuron", "stem", 100, 30, "fp32"),
        Trial("neuron", "head", 3, 30, "fp32"),
    ]
    _matches_by_hand(model, images, trials)
    with pytest.raises(ConfigError, match="runs 2 times per forward"):
        reference_logits(model, images, [Trial("neuron", "position", 0, 30, "fp32")])


def test_random_weight_trials_are_valid_reproducible_and_weight_proportional():
    sites = list(find_sites(_tiny_net(), torch.randn(1, 3, 8, 8), types="weighted"))
    trials = random_weight_trials(sites, np.random.default_rng(3), 4000)
    assert trials == random_weight_trials(sites, np.random.default_rng(3), 4000)
    by_name = {s.name: s for s in sites}
    assert all(t.kind == "weight" and t.fmt == "fp32" for t in trials)
    assert all(0 <= t.index < by_name[t.layer].weight_elements and 0 <= t.bit < 32 for t in trials)
    # fc holds 1,920 of the 2,816 weights: about 68% of the draws.
    total = sum(s.weight_elements for s in sites)
    share = sum(t.layer == "fc" for t in trials) / len(trials)
    assert abs(share - by_name["fc"].weight_elements / total) < 0.03


@pytest.mark.parametrize(
    ("trial", "match"),
    [
        (lambda: Trial("bias", "fc", 0, 0, "fp32"), "'weight' or 'neuron'"),
        (lambda: Trial("weight", "fc", 0, 8, "int8"), "0..7"),
        (lambda: Trial("weight", "fc", 0, 0, "fp64"), "fp32, fp16"),
    ],
)
def test_invalid_trials_are_refused(trial, match):
    with pytest.raises(ConfigError, match=match):
        trial()


def test_unknown_layer_and_index_out_of_range():
    model = _tiny_net()
    images = torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="not a module with a weight"):
        reference_logits(model, images, [Trial("weight", "nope", 0, 0, "fp32")])
    with pytest.raises(ConfigError, match="outside the 1,920 elements"):
        reference_logits(model, images, [Trial("weight", "fc", 1920, 0, "fp32")])

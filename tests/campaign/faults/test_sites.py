"""Fault-site counts against numbers computed by hand from each architecture's published layout."""

import math

import pytest
import timm
import torch
import torchvision
from torch import nn

from bitstorm.errors import ConfigError
from campaign.faults.sites import activation_peaks, find_sites, select_layers

FORMAT_WIDTHS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8}


def _assert_totals(space, weights: int, neurons: int) -> None:
    for fmt, width in FORMAT_WIDTHS.items():
        assert space.weight_sites(fmt) == weights * width
        assert space.neuron_sites(fmt) == neurons * width


def test_resnet18_at_224():
    space = find_sites(torchvision.models.resnet18(), (3, 224, 224))
    assert len(space) == 21  # 17 convs in the stem and stages, 3 downsample convs, fc
    # 3x3 conv weights per stage: first conv in_ch->ch, then three ch->ch; 1x1 downsample in_ch->ch.
    stages = [(64, 64, False), (64, 128, True), (128, 256, True), (256, 512, True)]
    weights = 64 * 3 * 7 * 7 + 512 * 1000
    for c_in, c, downsample in stages:
        weights += c * c_in * 9 + 3 * c * c * 9 + (c * c_in if downsample else 0)
    assert weights == 11_678_912  # = 11,689,512 parameters - 9,600 BatchNorm - 1,000 fc bias
    neurons = (
        64 * 112 * 112
        + 4 * 64 * 56 * 56
        + 5 * 128 * 28 * 28
        + 5 * 256 * 14 * 14
        + 5 * 512 * 7 * 7
        + 1000
    )
    _assert_totals(space, weights, neurons)
    assert space["layer3.0.downsample.0"].output_shape == (256, 14, 14)
    assert space["fc"].weight_shape == (1000, 512)


def test_mobilenet_v2_from_the_papers_block_table():
    space = find_sites(torchvision.models.mobilenet_v2(), (3, 224, 224))
    # (expansion t, channels c, repeats n, first stride s), Sandler et al. 2018, Table 2.
    table = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]
    size, c_in = 112, 32
    weights, neurons, layers = 32 * 3 * 9, 32 * size * size, 1
    for t, c, n, s in table:
        for i in range(n):
            hidden = c_in * t
            if t != 1:
                weights += hidden * c_in
                neurons += hidden * size * size
                layers += 1
            size = size // (s if i == 0 else 1)
            weights += hidden * 9 + c * hidden  # depthwise 3x3, projection 1x1
            neurons += hidden * size * size + c * size * size
            layers += 2
            c_in = c
    weights += 1280 * 320 + 1000 * 1280
    neurons += 1280 * 7 * 7 + 1000
    layers += 2
    assert len(space) == layers == 53
    _assert_totals(space, weights, neurons)


def test_vit_b_16_attention_out_proj_has_weight_sites_only():
    space = find_sites(torchvision.models.vit_b_16(), (3, 224, 224))
    tokens, dim, mlp = 197, 768, 3072
    weights = dim * 3 * 16 * 16 + 12 * (dim * dim + 2 * mlp * dim) + 1000 * dim
    neurons = dim * 14 * 14 + 12 * (tokens * mlp + tokens * dim) + 1000
    assert len(space) == 38
    _assert_totals(space, weights, neurons)
    silent = [layer for layer in space if layer.calls == 0]
    assert len(silent) == 12 and all(
        layer.name.endswith("self_attention.out_proj") for layer in silent
    )
    assert all("functionally" in layer.neuron_note for layer in silent)
    with pytest.raises(ConfigError, match="no neuron sites"):
        silent[0].locate_neuron(0)


def test_timm_deit_tiny():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    space = find_sites(model, (3, 224, 224))
    tokens, dim = 197, 192
    block_weights = 3 * dim * dim + dim * dim + 2 * 4 * dim * dim  # qkv, proj, fc1, fc2
    block_neurons = tokens * (3 * dim + dim + 4 * dim + dim)
    _assert_totals(
        space,
        weights=dim * 3 * 16 * 16 + 12 * block_weights + 1000 * dim,
        neurons=dim * 14 * 14 + 12 * block_neurons + 1000,
    )
    assert len(space) == 50
    assert space["blocks.3.attn.qkv"].output_shape == (197, 576)


class SharedConv(nn.Module):
    """One conv applied twice (weight sharing): two calls, two outputs of different sizes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = self.pool(self.conv(x))
        return self.head(self.pool(self.conv(x)).flatten(1))


def test_module_called_twice_is_addressed_per_call():
    space = find_sites(SharedConv(), (4, 16, 16))
    conv = space["conv"]
    assert conv.calls == 2 and conv.output_shapes == ((4, 16, 16), (4, 8, 8))
    assert conv.output_shape is None
    assert conv.neuron_elements == 4 * 16 * 16 + 4 * 8 * 8
    assert conv.weight_elements == 4 * 4 * 9  # the weights exist once, whatever the calls
    assert conv.locate_neuron(0) == (0, (0, 0, 0))
    assert conv.locate_neuron(4 * 16 * 16 - 1) == (0, (3, 15, 15))
    assert conv.locate_neuron(4 * 16 * 16) == (1, (0, 0, 0))
    assert conv.locate_neuron(4 * 16 * 16 + 65) == (1, (1, 0, 1))
    with pytest.raises(ConfigError, match="outside"):
        conv.locate_neuron(conv.neuron_elements)


def test_selection_by_type_and_glob():
    model = torchvision.models.resnet18(num_classes=10)
    assert list(select_layers(model, include=["layer4.*"], exclude=["*downsample*"])) == [
        "layer4.0.conv1",
        "layer4.0.conv2",
        "layer4.1.conv1",
        "layer4.1.conv2",
    ]
    assert list(select_layers(model, types=["Linear"])) == ["fc"]
    weighted = select_layers(model, types="weighted")
    assert "bn1" in weighted and "layer1.0.bn2" in weighted and len(weighted) == 21 + 20
    space = find_sites(model, (3, 32, 32), types=[nn.BatchNorm2d], include=["layer1.*"])
    assert space.names() == [f"layer1.{b}.bn{i}" for b in (0, 1) for i in (1, 2)]
    assert all(layer.weight_shape == (64,) and layer.output_shape == (64, 8, 8) for layer in space)


def test_bad_selection_says_what_exists():
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ConfigError, match="BatchNorm2d, Conv2d, Linear"):
        select_layers(model, types=["Conv3d"])
    with pytest.raises(ConfigError, match="conv_linear"):
        select_layers(model, types="convs")
    with pytest.raises(ConfigError, match=r"no injectable layer named 'layer9\.conv'"):
        find_sites(model, (3, 32, 32))["layer9.conv"]


def test_probe_leaves_training_flags_and_weights_untouched():
    model = torchvision.models.resnet18(num_classes=10).train()
    model.layer1.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    find_sites(model, (3, 32, 32))
    assert model.training and not model.layer1.training and model.layer2.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_activation_peaks_are_max_abs_over_all_images():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)).eval()
    images = torch.randn(16, 5)
    peaks = activation_peaks(model, images, ["0", "2"])
    with torch.no_grad():
        hidden = model[0](images)
        out = model[2](model[1](hidden))
    assert peaks == {"0": float(hidden.abs().max()), "2": float(out.abs().max())}
    assert math.isfinite(peaks["0"])


def test_table_lists_every_layer_and_totals():
    space = find_sites(torchvision.models.resnet18(num_classes=10), (3, 32, 32))
    lines = space.table("int8").splitlines()
    assert len(lines) == 1 + 21 + 1
    assert lines[-1].split()[-2:] == [
        f"{space.weight_sites('int8'):,}",
        f"{space.neuron_sites('int8'):,}",
    ]


class BiasTable(nn.Module):
    """A Linear that maps a fixed table, not the images (as Swin-V2's cpb_mlp does)."""

    def __init__(self) -> None:
        super().__init__()
        self.table_mlp = nn.Linear(2, 4)
        self.head = nn.Linear(12, 4)
        self.register_buffer("coords", torch.randn(5, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.table_mlp(self.coords).mean()
        return self.head(x.flatten(1)) + bias


def test_a_layer_whose_output_has_no_image_dimension_gets_weight_sites_only():
    space = find_sites(BiasTable(), torch.randn(3, 3, 2, 2))
    table, head = space["table_mlp"], space["head"]
    assert table.neuron_elements == 0 and "no image dimension" in table.neuron_note
    assert table.weight_elements == 8
    assert head.neuron_elements == 4

"""build_model: backbones by name, the paper's text head exactly, and head variants."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitstorm.errors import ConfigError
from campaign.faults.sites import find_sites
from trainers.heads import INITIAL_LOGIT_SCALE, TextHead
from trainers.models import build_model


def _embeddings(classes=10, dim=16, seed=0):
    return torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed)) * 3


def test_text_head_is_the_papers_head():
    rows = _embeddings()
    model = build_model("resnet18", "text", 10, rows)
    head = model.fc
    assert isinstance(head, TextHead)
    assert head.projection.in_features == 512 and head.projection.out_features == 16
    assert head.projection.bias is not None and head.classes.bias is None
    torch.testing.assert_close(head.classes.weight, F.normalize(rows, dim=1))
    assert head.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen
    features = torch.randn(4, 512)
    expected = F.normalize(head.projection(features), dim=1) @ F.normalize(rows, dim=1).T
    torch.testing.assert_close(head(features), expected * math.exp(INITIAL_LOGIT_SCALE))


def test_head_variants_share_the_geometry():
    frozen = build_model("resnet18", "text_frozen", 10, _embeddings())
    assert not frozen.fc.classes.weight.requires_grad and frozen.fc.projection.weight.requires_grad
    random = build_model("resnet18", "text_random", 10, embedding_dim=32)
    orthogonal = build_model("resnet18", "text_orthogonal", 10, embedding_dim=32)
    for model in (random, orthogonal):
        torch.testing.assert_close(model.fc.classes.weight.norm(dim=1), torch.ones(10))
    gram = orthogonal.fc.classes.weight @ orthogonal.fc.classes.weight.T
    torch.testing.assert_close(gram, torch.eye(10), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="classes <= dim"):
        build_model("tiny_cnn", "text_orthogonal", 10, embedding_dim=8)


def test_linear_head_keeps_the_backbones_classifier():
    model = build_model("resnet18", "linear", 7)
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 7


@pytest.mark.parametrize(
    ("backbone", "head_path"),
    [
        ("mobilenet_v2", "classifier.1"),
        ("vgg16_bn", "classifier.6"),
        ("resnet34", "fc"),
        ("timm/resnet10t", "fc"),
        ("deit_tiny_patch16_224", "head"),
    ],
)
def test_text_head_replaces_the_classifier_of_any_backbone(backbone, head_path):
    name = backbone.removeprefix("timm/")
    model = build_model(name, "text", 10, _embeddings(dim=24))
    assert isinstance(model.get_submodule(head_path), TextHead)


def test_small_input_stem_keeps_resolution():
    model = build_model("resnet18", "linear", 10, small_input=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    space = find_sites(model, (3, 32, 32))
    assert space["conv1"].output_shape == (64, 32, 32)
    mobile = build_model("mobilenet_v2", "linear", 10, small_input=True)
    assert find_sites(mobile, (3, 32, 32))["features.0.0"].output_shape == (32, 32, 32)
    with pytest.raises(ConfigError, match="small_input"):
        build_model("vgg16_bn", "linear", 10, small_input=True)


def test_text_head_sites_are_injectable():
    space = find_sites(build_model("resnet18", "text", 10, _embeddings()), (3, 32, 32))
    assert space["fc.projection"].output_shape == (16,)
    assert space["fc.classes"].weight_shape == (10, 16)


def test_builds_are_reproducible_and_errors_are_clear():
    a, b = (
        build_model("tiny_cnn", "linear", 3, seed=5),
        build_model("tiny_cnn", "linear", 3, seed=5),
    )
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    with pytest.raises(ConfigError, match="did you mean resnet18"):
        build_model("resnt18", "linear", 10)
    with pytest.raises(ConfigError, match="needs class embeddings"):
        build_model("tiny_cnn", "text", 10)
    with pytest.raises(ConfigError, match="do not fit 10 classes"):
        build_model("tiny_cnn", "text", 10, _embeddings(classes=9))
    with pytest.raises(ConfigError, match="linear, text, text_frozen"):
        build_model("tiny_cnn", "cosine", 10)

"""The batched engine against the pytorchfi reference and against injections made by hand."""

import copy
import math
import random
from dataclasses import dataclass

import pytest
import timm
import torch
import torchvision
from torch import nn

from bitstorm.errors import ConfigError
from campaign.faults.analytic import final_linear_scale
from campaign.faults.bits import BIT_FLIP, FORMATS, fault_model, flip, int8_scale
from campaign.faults.engine import Engine
from campaign.faults.inject import RangeRestriction
from campaign.faults.reference import Trial, reference_logits
from campaign.faults.sites import activation_peaks
from campaign.faults.trials import Outcomes, TrialGroup
from trainers.models import build_model

from .test_sites import SharedConv

# A disagreement with the reference is accepted only as a floating-point near-tie: the
# reference's top-2 logit gap is below this fraction of its largest |logit| (the engine adds a
# delta to golden values where the reference recomputes the sum, so roundings differ).
NEAR_TIE = 1e-4


@dataclass
class Disagreement:
    trial: Trial
    image: int
    engine_top1: int
    reference_top1: int
    reference_gap: float
    scale: float

    @property
    def near_tie(self) -> bool:
        return self.reference_gap <= NEAR_TIE * max(self.scale, 1e-30)


def _models():
    torch.manual_seed(0)
    small = torch.randn(8, 3, 32, 32)
    return {
        "resnet18": (torchvision.models.resnet18(num_classes=10), small),
        "mobilenet_v2": (torchvision.models.mobilenet_v2(num_classes=10), small),
        "vgg11_bn": (torchvision.models.vgg11_bn(num_classes=10), small),
        "deit_tiny": (
            timm.create_model("deit_tiny_patch16_224", num_classes=10),
            torch.randn(3, 3, 224, 224),
        ),
        "resnet18_text": (build_model("resnet18", "text", 10, torch.randn(10, 32)), small),
    }


def _compare(model, images, count, seed, fault=BIT_FLIP):
    """Random trials (both kinds, all formats, Conv2d/Linear layers) of ``fault`` through both
    evaluators."""
    model.eval()
    engine = Engine(model, images[:1], device=images.device)
    rng = random.Random(seed)
    layers = [
        s
        for s in engine.sites.values()
        if s.calls == 1 and isinstance(model.get_submodule(s.name), nn.Conv2d | nn.Linear)
    ]
    cache = engine.golden(images)
    scales = {k: v / 127 for k, v in engine.profile(cache, [s.name for s in layers]).items()}
    trials, groups = [], []
    for i in range(count):
        site = rng.choice(layers)
        kind, fmt = ("weight", "neuron")[i % 2], list(FORMATS)[(i // 2) % 4]
        size = site.weight_elements if kind == "weight" else site.neuron_elements
        bit = rng.choice(fault.bits(fmt))
        trial = Trial(kind, site.name, rng.randrange(size), bit, fmt, fault)
        image = rng.randrange(len(images))
        trials.append((trial, image))
        groups.append(
            TrialGroup(
                kind,
                site.name,
                fmt,
                torch.tensor([trial.index]),
                torch.tensor([trial.bit]),
                torch.tensor([image]),
                fault,
            )
        )
    outcomes = engine.run_many(cache, groups)
    disagreements = []
    for (trial, image), outcome in zip(trials, outcomes, strict=True):
        ref = reference_logits(model, images[image : image + 1], [trial], neuron_scales=scales)[
            0, 0
        ]
        ref_non_finite = not bool(torch.isfinite(ref).all())
        ref_top1 = -1 if ref.isnan().any() else int(ref.nan_to_num(nan=-math.inf).argmax())
        agree = (bool(outcome.non_finite[0]) == ref_non_finite) and (
            ref_non_finite or int(outcome.faulty_top1[0]) == ref_top1
        )
        if not agree:
            finite = ref[torch.isfinite(ref)]
            top2 = finite.topk(2).values if len(finite) > 1 else torch.zeros(2)
            disagreements.append(
                Disagreement(
                    trial,
                    image,
                    int(outcome.faulty_top1[0]),
                    ref_top1,
                    float(top2[0] - top2[1]),
                    float(finite.abs().max()) if len(finite) else math.inf,
                )
            )
    return disagreements


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v2", "vgg11_bn", "deit_tiny", "resnet18_text"]
)
def test_engine_agrees_with_the_pytorchfi_reference(name):
    model, images = _models()[name]
    disagreements = _compare(
        model, images, count=24 if name in ("vgg11_bn", "deit_tiny") else 48, seed=1
    )
    assert all(d.near_tie for d in disagreements), disagreements


@pytest.mark.slow
def test_engine_agrees_on_ten_thousand_trials():
    """>= 1e4 trials over five models: >= 99.9% equal top-1, the rest listed near-ties."""
    counts = {
        "resnet18": 3000,
        "mobilenet_v2": 2500,
        "resnet18_text": 2500,
        "deit_tiny": 1500,
        "vgg11_bn": 500,
    }
    models = _models()
    disagreements, total = [], 0
    for name, count in counts.items():
        found = _compare(*models[name], count=count, seed=7)
        disagreements += [(name, d) for d in found]
        total += count
    for name, d in disagreements:
        print(f"{name}: {d}")  # the list the issue asks for (pytest -s shows it)
    assert total >= 10_000
    assert len(disagreements) <= total * 0.001
    assert all(d.near_tie for _, d in disagreements)


FAULT_MODELS = ["multi_bit", "multi_bit:4", "stuck_at_0", "stuck_at_1"]


@pytest.mark.parametrize("fault", FAULT_MODELS)
def test_engine_agrees_with_the_reference_under_every_fault_model(fault):
    """Both kinds, all formats, through the suffix (ResNet-18) and the text head's class
    Linear: the engine's fault is the reference's (bits.corrupt in pytorchfi's hooks)."""
    models = _models()
    for name in ("resnet18", "resnet18_text"):
        disagreements = _compare(*models[name], count=32, seed=11, fault=fault_model(fault))
        assert all(d.near_tie for d in disagreements), (name, disagreements)


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULT_MODELS)
def test_engine_agrees_on_five_hundred_trials_per_fault_model(fault):
    """>= 500 trials of each fault model over five models, every disagreement a listed
    near-tie."""
    counts = {
        "resnet18": 150,
        "mobilenet_v2": 120,
        "resnet18_text": 120,
        "deit_tiny": 60,
        "vgg11_bn": 50,
    }
    models = _models()
    disagreements = []
    for name, count in counts.items():
        found = _compare(*models[name], count=count, seed=13, fault=fault_model(fault))
        disagreements += [(name, d) for d in found]
    for name, d in disagreements:
        print(f"{fault} {name}: {d}")
    assert sum(counts.values()) >= 500
    assert all(d.near_tie for _, d in disagreements)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v2", "vgg11_bn", "deit_tiny", "resnet18_text"]
)
def test_engine_agrees_with_the_reference_on_cuda(name):
    """Engine and reference both on the GPU (TF32 off: the fault semantics are fp32's)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model, images = _models()[name]
    disagreements = _compare(model.cuda(), images.cuda(), count=400, seed=3)
    for d in disagreements:
        print(f"{name}: {d}")
    assert all(d.near_tie for d in disagreements), disagreements


def test_in_place_ops_after_a_site_do_not_change_the_cached_golden_values():
    """VGG's classifier: Linear -> ReLU(inplace=True). Sign flips of negative outputs must
    see the value before the ReLU zeroed it in place (the engine once cached it after)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))
    model.eval()
    images = torch.randn(6, 3, 2, 2)
    engine = Engine(model, images[:1], device="cpu")
    index = torch.arange(16).repeat(6)
    image = torch.arange(6).repeat_interleave(16)
    group = TrialGroup("neuron", "1", "fp32", index, torch.full_like(index, 31), image)
    outcome = engine.run(engine.golden(images), group)
    expected = [
        int(_manual_neuron(model, images[i : i + 1], "1", j, 31, "fp32")[0].argmax())
        for i, j in zip(image.tolist(), index.tolist(), strict=True)
    ]
    assert outcome.faulty_top1.tolist() == expected
    assert (outcome.faulty_top1 != outcome.golden_top1).any()  # some flips do matter


def _manual_neuron(model, images, layer, index, bit, fmt, call=0):
    """The faulty logits with a plain hook flipping one element of one call's output."""
    faulty = copy.deepcopy(model).eval()
    calls = {"n": 0}

    def hook(_module, _inputs, output):
        if calls["n"] == call:
            flat = output.view(len(output), -1)
            flat[:, index] = flip(flat[:, index].clone(), bit, fmt)
        calls["n"] += 1

    faulty.get_submodule(layer).register_forward_hook(hook)
    with torch.no_grad():
        return faulty(images)


def _manual_weight(model, images, layer, index, bit, fmt):
    faulty = copy.deepcopy(model).eval()
    with torch.no_grad():
        flat = faulty.get_submodule(layer).weight.view(-1)
        flat[index] = flip(flat[index].clone(), bit, fmt)
        return faulty(images)


def _top1(logits: torch.Tensor) -> int:
    """Top-1 with the engine's convention: -1 when a logit is NaN."""
    return -1 if bool(logits.isnan().any()) else int(logits.argmax())


def _single(kind, layer, index, bit, image, fmt="fp32"):
    return TrialGroup(
        kind, layer, fmt, torch.tensor([index]), torch.tensor([bit]), torch.tensor([image])
    )


def test_reused_module_is_addressed_per_call():
    torch.manual_seed(0)
    model = SharedConv().eval()
    images = torch.randn(4, 4, 16, 16)
    engine = Engine(model, images[:1], device="cpu")
    first = 4 * 16 * 16
    for index, call, local in [(37, 0, 37), (first + 21, 1, 21)]:
        out = engine.run(engine.golden(images), _single("neuron", "conv", index, 30, 2))
        expected = _manual_neuron(model, images[2:3], "conv", local, 30, "fp32", call=call)
        assert int(out.faulty_top1[0]) == _top1(expected)
        assert torch.equal(out.value_after, flip(out.value_before, 30, "fp32"))
    # A weight of a reused module is one memory location: every call sees the fault.
    out = engine.run(engine.golden(images), _single("weight", "conv", 5, 30, 1))
    expected = _manual_weight(model, images[1:2], "conv", 5, 30, "fp32")
    assert int(out.faulty_top1[0]) == _top1(expected)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 5)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = x.relu()
        return self.fc(x.flatten(1))


def test_models_fx_cannot_trace_use_hooks_and_say_so(caplog):
    torch.manual_seed(0)
    model = Untraceable().eval()
    images = torch.randn(6, 3, 8, 8)
    engine = Engine(model, images[:1], device="cpu")
    assert engine.mode == "hooks" and "falling back to hooks" in caplog.text
    for kind, layer, index in [
        ("neuron", "conv", 100),
        ("weight", "conv", 17),
        ("weight", "fc", 33),
    ]:
        for image in range(len(images)):
            out = engine.run(engine.golden(images), _single(kind, layer, index, 29, image))
            manual = (_manual_neuron if kind == "neuron" else _manual_weight)(
                model, images[image : image + 1], layer, index, 29, "fp32"
            )
            assert int(out.faulty_top1[0]) == _top1(manual)


def test_attention_projection_weights_use_in_place_edits():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        image_size=32,
        patch_size=16,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=4,
    ).eval()
    images = torch.randn(3, 3, 32, 32)
    engine = Engine(model, images[:1], device="cpu")
    layer = "encoder.layers.encoder_layer_0.self_attention.out_proj"
    with pytest.raises(ConfigError, match="no neuron sites"):
        engine.run(engine.golden(images), _single("neuron", layer, 0, 3, 0))
    group = TrialGroup(
        "weight",
        layer,
        "fp32",
        torch.tensor([5, 5, 200]),
        torch.tensor([30, 30, 31]),
        torch.tensor([0, 2, 1]),
    )
    out = engine.run(engine.golden(images), group)
    for t in range(3):
        image = int(group.image[t])
        manual = _manual_weight(
            model, images[image : image + 1], layer, int(group.index[t]), int(group.bit[t]), "fp32"
        )
        assert int(out.faulty_top1[t]) == _top1(manual)


def test_non_finite_values_give_a_defined_outcome():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight.fill_(0.0)
        model[0].bias.copy_(torch.tensor([1.5, 0.2, 0.1]))
    images = torch.randn(2, 4)
    engine = Engine(model, images[:1], device="cpu")
    # 1.5 is 0x3FC00000; flipping bit 30 sets the exponent to all ones with a mantissa: NaN.
    out = engine.run(engine.golden(images), _single("neuron", "0", 0, 30, 1))
    assert out.value_after.isnan().all() and out.non_finite.all() and out.sdc.all()
    assert int(out.faulty_top1[0]) == -1 and out.top2diff.isnan().all()
    # Weight 0 is 0.0; bit 30 makes it 2.0, a finite change that may or may not flip the class.
    out = engine.run(engine.golden(images), _single("weight", "0", 0, 30, 0))
    assert not out.non_finite.any() and float(out.value_after[0]) == 2.0


def test_range_restriction_follows_goldeneyes_rule():
    """NaN -> +bound (goldeneye takes the sign from ``v < 0``), +-Inf and beyond -> +-bound,
    within the bound unchanged; a weight fault restricts only the outputs it changed."""
    model = nn.Sequential(nn.Linear(2, 3)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
        model[0].bias.copy_(torch.tensor([1.5, -1.5, 0.25]))
    images = torch.zeros(1, 2)
    restriction = RangeRestriction({"0": 4.0})
    engine = Engine(model, images, device="cpu", restriction=restriction, non_finite_sdc=False)
    cache = engine.golden(images)
    # 1.5 = 0x3FC00000: bit 30 gives NaN; -1.5 bit 30 gives NaN too (sign kept, yet +bound);
    # 0.25 bit 30 gives 2^126 * 0.25 -> +bound; bit 31 of 1.5 gives -1.5 (within: unchanged).
    group = TrialGroup(
        "neuron",
        "0",
        "fp32",
        torch.tensor([0, 1, 2, 0]),
        torch.tensor([30, 30, 30, 31]),
        torch.zeros(4, dtype=torch.long),
    )
    out = engine.run(cache, group)
    assert out.value_after.tolist() == [4.0, 4.0, 4.0, -1.5]
    assert not out.non_finite.any()
    assert out.faulty_top1.tolist() == [0, 1, 2, 2]
    plain = Engine(model, images, device="cpu")
    raw = plain.run(plain.golden(images), group)
    assert raw.value_after[:2].isnan().all() and raw.sdc[:3].all()
    # Weight (0, 1) multiplies an input of 0: nothing changes, nothing is restricted. Bias
    # changes are not weight faults; x = 1 makes weight (0, 0) change output 0 only.
    ones = torch.ones(1, 2)
    engine = Engine(model, ones, device="cpu", restriction=restriction)
    cache = engine.golden(ones)
    out = engine.run(cache, _single("weight", "0", 0, 30, 0))  # 1.0 -> Inf: output 0 -> 4.0
    assert out.value_after.isinf().all() and int(out.faulty_top1[0]) == 0
    assert not out.non_finite.any()


def test_nan_logits_are_not_sdcs_under_goldeneyes_rule():
    """goldeneye leaves a trial whose loss is NaN out of the SDC count (non_finite_sdc=False)."""
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight.fill_(0.0)
        model[0].bias.copy_(torch.tensor([1.5, 0.2, 0.1]))
    images = torch.randn(2, 4)
    for rule, sdc in ((True, True), (False, False)):
        engine = Engine(model, images[:1], device="cpu", non_finite_sdc=rule)
        out = engine.run(engine.golden(images), _single("neuron", "0", 0, 30, 1))
        assert out.non_finite.all() and bool(out.sdc[0]) is sdc


def test_range_restricted_weight_faults_need_the_delta_rule():
    model = nn.Sequential(nn.Conv2d(1, 2, 3)).eval()
    images = torch.randn(2, 1, 8, 8)
    restriction = RangeRestriction({"0": 1.0})
    engine = Engine(model, images[:1], device="cpu", restriction=restriction)
    engine.model[0].padding_mode = "reflect"  # a conv the delta rule does not cover
    engine.model[0].padding = (1, 1)
    with pytest.raises(ConfigError, match="range restriction of weight faults"):
        engine.run(engine.golden(images), _single("weight", "0", 0, 30, 0))


def test_small_cache_budget_gives_the_same_outcomes():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    images = torch.randn(16, 3, 32, 32)
    gen = torch.Generator().manual_seed(3)
    groups = [
        TrialGroup(
            kind,
            layer,
            fmt,
            torch.randint(0, 4096, (40,), generator=gen),
            torch.randint(0, 8, (40,), generator=gen),
            torch.randint(0, 16, (40,), generator=gen),
        )
        for kind, layer, fmt in [
            ("neuron", "layer1.0.conv2", "fp16"),
            ("weight", "layer3.1.conv1", "int8"),
            ("neuron", "fc", "bf16"),
        ]
        for _ in [0]
    ]
    groups[2] = TrialGroup(
        "neuron",
        "fc",
        "bf16",
        torch.randint(0, 10, (40,), generator=gen),
        torch.randint(0, 16, (40,), generator=gen),
        torch.randint(0, 16, (40,), generator=gen),
    )
    roomy_engine = Engine(model, images[:1], device="cpu")
    roomy = roomy_engine.run_many(roomy_engine.golden(images), groups)
    tight_engine = Engine(model, images[:1], device="cpu", cache_bytes=50_000, batch_size=7)
    tight = tight_engine.run_many(tight_engine.golden(images), groups)
    for a, b in zip(roomy, tight, strict=True):
        assert torch.equal(a.faulty_top1, b.faulty_top1) and torch.equal(a.sdc, b.sdc)
        torch.testing.assert_close(a.top2diff, b.top2diff, equal_nan=True, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["weight", "neuron"])
@pytest.mark.parametrize(
    ("fault", "restricted"),
    [("bit_flip", False), ("bit_flip", True), ("stuck_at_1", False), ("multi_bit:3", True)],
)
@pytest.mark.parametrize(
    ("head", "layer", "in_features", "scale"),
    [("linear", "fc", 512, 1.0), ("text", "fc.classes", 32, 1 / 0.07)],
)
def test_last_layer_sweep_is_exhaustive_and_matches_the_suffix_path(
    head, layer, in_features, scale, fault, restricted, kind
):
    torch.manual_seed(0)
    model = build_model("resnet18", head, 10, torch.randn(10, 32)).eval()
    images = torch.randn(6, 3, 32, 32)
    # A bound below the largest golden output, so that restriction changes outcomes.
    peak = activation_peaks(model, images, [layer])[layer]
    restriction = RangeRestriction({layer: 0.8 * peak}) if restricted else None
    engine = Engine(model, images[:1], device="cpu", restriction=restriction)
    scale_of = lambda name: final_linear_scale(engine.traced, engine.model, name)  # noqa: E731
    assert scale_of(layer) == pytest.approx(scale)
    assert scale_of("layer4.1.conv2") is None
    if head == "text":  # the projection is followed by a normalisation: not analytic
        assert scale_of("fc.projection") is None
    cache = engine.golden(images)
    model_of = fault_model(fault)
    parts = list(
        engine.sweep_layer(cache, layer, "fp32", kind=kind, sites_per_chunk=1024, fault=model_of)
    )
    sites = 10 * in_features if kind == "weight" else 10
    bits = len(model_of.bits("fp32"))
    assert sum(len(group) for group, _ in parts) == sites * bits * 6
    group, analytic = parts[min(2, len(parts) - 1)]
    assert set(group.bit.tolist()) == set(model_of.bits("fp32"))
    assert set(group.image.tolist()) == set(range(6)) and group.fault == model_of
    generic = engine.run(cache, group)
    assert torch.equal(analytic.faulty_top1, generic.faulty_top1)
    assert torch.equal(analytic.sdc, generic.sdc)
    assert torch.equal(analytic.non_finite, generic.non_finite)
    assert torch.equal(analytic.value_before, generic.value_before)
    finite = ~generic.non_finite
    torch.testing.assert_close(
        analytic.top2diff[finite], generic.top2diff[finite], rtol=0, atol=1e-3
    )
    assert analytic.sdc.any() and not analytic.sdc.all()
    if restricted:  # a restricted logit is always finite
        assert not analytic.non_finite.any()
        torch.testing.assert_close(
            analytic.value_after, generic.value_after, rtol=0, atol=0, equal_nan=True
        )


def test_outcomes_are_consistent():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    images = torch.randn(8, 3, 32, 32)
    engine = Engine(model, images[:1], device="cpu")
    group = TrialGroup(
        "neuron",
        "layer4.0.conv1",
        "fp32",
        torch.arange(64),
        torch.full((64,), 30),
        torch.arange(64) % 8,
    )
    out = engine.run(engine.golden(images), group)
    golden = engine.logits(images).argmax(dim=1)
    assert torch.equal(out.golden_top1, golden[group.image])
    assert torch.equal(out.sdc, out.non_finite | (out.faulty_top1 != out.golden_top1))
    assert isinstance(out, Outcomes) and len(out.sdc) == 64


def test_invalid_trials_are_refused():
    model = torchvision.models.resnet18(num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    engine = Engine(model, images[:1], device="cpu")
    with pytest.raises(ConfigError, match="no injectable layer"):
        engine.run(engine.golden(images), _single("neuron", "layer9", 0, 0, 0))
    with pytest.raises(ConfigError, match="index outside"):
        engine.run(engine.golden(images), _single("weight", "fc", 5120, 0, 0))
    with pytest.raises(ConfigError, match="image indices"):
        engine.run(engine.golden(images), _single("neuron", "fc", 0, 0, 2))
    with pytest.raises(ConfigError, match=r"0\.\.15"):
        _single("neuron", "fc", 0, 16, 0, fmt="bf16")
    with pytest.raises(ConfigError, match="one entry per trial"):
        TrialGroup(
            "neuron", "fc", "fp32", torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0])
        )


def test_a_golden_cache_keeps_the_values_between_runs(monkeypatch):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    images = torch.randn(8, 3, 32, 32)
    groups = [_single("neuron", "layer2.0.conv1", 77, 30, 3), _single("weight", "fc", 99, 30, 5)]
    cold_engine = Engine(model, images[:1], device="cpu")
    cold = cold_engine.run_many(cold_engine.golden(images), groups)
    engine = Engine(model, images[:1], device="cpu")
    cache = engine.golden(images, ["layer2.0.conv1", "fc"], ["weight", "neuron"])
    assert cache.values
    passes = []
    original = engine.traced.golden_module
    monkeypatch.setattr(
        engine.traced, "golden_module", lambda nodes: passes.append(nodes) or original(nodes)
    )
    outcomes = engine.run_many(cache, groups)
    assert passes == []  # no golden pass ran: the resident values served both groups
    for a, b in zip(cold, outcomes, strict=True):
        assert torch.equal(a.faulty_top1, b.faulty_top1) and torch.equal(a.sdc, b.sdc)
    other = engine.golden(images[:4])  # other images, no layers named: a pass per run
    assert len(engine.run_many(other, groups[:1])[0].sdc) == 1
    assert passes
    tight = Engine(model, images[:1], device="cpu", cache_bytes=1000)
    assert not tight.golden(images, ["layer2.0.conv1"], ["neuron"]).values  # too big


def test_each_cache_profiles_its_own_images():
    """int8 neuron scales come from the cache's images, never from another set's."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    quiet, loud = torch.randn(4, 3, 32, 32), 50 * torch.randn(4, 3, 32, 32)
    engine = Engine(model, quiet[:1], device="cpu")
    first = engine.golden(quiet)
    peak_quiet = engine.profile(first, ["layer1.0.conv1"])["layer1.0.conv1"]
    second = engine.golden(loud)
    peak_loud = engine.profile(second, ["layer1.0.conv1"])["layer1.0.conv1"]
    assert peak_loud > 10 * peak_quiet
    # The int8 sign bit of 100 small elements: q - 128, so the largest |value| is 128 scales
    # of the cache's own peak / 127.
    group = TrialGroup(
        "neuron",
        "layer1.0.conv1",
        "int8",
        torch.arange(100),
        torch.full((100,), 7),
        torch.zeros(100, dtype=torch.long),
    )
    for cache, peak in ((first, peak_quiet), (second, peak_loud)):
        after = engine.run(cache, group).value_after.abs()
        assert float(after.max()) == pytest.approx(peak * 128 / 127, rel=1e-5)


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "int8"])
def test_value_before_is_the_value_as_the_format_stores_it_for_weights_and_neurons(fmt):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    images = torch.randn(3, 8)
    engine = Engine(model, images[:1], device="cpu")
    cache = engine.golden(images)
    weight = model[0].weight.detach().reshape(-1)
    stored = flip(flip(weight, 0, fmt, _scale(weight, fmt)), 0, fmt, _scale(weight, fmt))
    out = engine.run(cache, _single("weight", "0", 5, 1, 0, fmt=fmt))
    assert float(out.value_before[0]) == float(stored[5])
    assert fmt == "int8" or float(out.value_before[0]) != float(weight[5])
    logits = model(images).detach()
    peak = engine.profile(cache, ["0"])["0"]
    scale = peak / 127 if fmt == "int8" else None
    element = logits[2, 1:2]
    stored_neuron = flip(flip(element, 0, fmt, scale), 0, fmt, scale)
    out = engine.run(cache, _single("neuron", "0", 1, 1, 2, fmt=fmt))
    assert float(out.value_before[0]) == pytest.approx(float(stored_neuron[0]), rel=0, abs=0)


def _scale(weight: torch.Tensor, fmt: str) -> torch.Tensor | None:
    return int8_scale(weight) if fmt == "int8" else None

"""The zoo: every torchvision classification model and a range of timm families, random weights,
at the smallest input each accepts, with trials of both kinds at every Conv/Linear layer.

    python -m pytest -m slow tests/campaign/faults/test_zoo.py

Each model: the engine runs one fp32 weight and one fp32 neuron fault per layer on two images,
plus int8, fp16 and bf16 faults at a few layers; the pytorchfi reference checks the trials it
can address (campaign.faults.reference): all those in int8, fp16 and bf16, and fp32 trials
spread evenly over the layers, ``BITSTORM_ZOO_REFERENCE`` in all (default 64 per model; ``all``
for every one, ``0`` for a crash-only pass). The reference copies the whole model per trial, so
checking all of them takes several times as long. Every other trial must run without error.
Nothing is downloaded. Set ``BITSTORM_ZOO_REPORT=FILE`` to append one JSON line per model: input
size, engine mode (with the warning where the engine fell back to hooks), which evaluator each
layer takes, why weights are edited in place, trial counts, disagreements and timings.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import time
import zlib

import pytest
import timm
import torch
import torchvision
from torch import nn

from campaign.faults.engine import Engine
from campaign.faults.graph import computes_as
from campaign.faults.reference import Trial
from campaign.faults.sites import LayerSite, find_sites
from campaign.faults.trials import KINDS

from .checks import check

TORCHVISION = torchvision.models.list_models(module=torchvision.models)
TIMM = [
    "resnet18",
    "resnetv2_50x1_bit",  # weight-standardised convolutions (StdConv2d)
    "efficientnet_b0",
    "tf_efficientnet_b0",  # TensorFlow "same" padding (Conv2dSame)
    "mobilenetv3_small_100",
    "ghostnet_100",
    "regnetx_002",
    "densenet121",
    "convnext_atto",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "mixer_s16_224",
    "levit_128s",
    "coat_lite_tiny",
    "maxvit_pico_rw_256",
    "edgenext_xx_small",
    "mobilevit_xxs",
    "efficientformer_l1",
    "xcit_nano_12_p16_224",
    "pvt_v2_b0",
]
MODELS = [("torchvision", name) for name in TORCHVISION] + [("timm", name) for name in TIMM]

# Tried in order; the first a model accepts (built for it where its constructor takes a size).
SIZES = (32, 48, 56, 64, 75, 96, 112, 128, 160, 192, 224, 256, 299)
SIZE_ARGUMENTS = ("image_size", "img_size", "input_size")
FP32_BITS = (31, 30, 30, 29, 28, 27, 26, 25, 23, 20, 12, 3)  # most flips that matter are high
IMAGES = 2
_LIMIT = os.environ.get("BITSTORM_ZOO_REFERENCE", "64")
REFERENCE_LIMIT = None if _LIMIT == "all" else int(_LIMIT)


def build(source: str, name: str, size: int) -> tuple[nn.Module, bool]:
    """The model with random weights and ten classes, built for ``size`` where its constructor
    takes an input size (the flag says whether it did). Weights that start at zero (classifier
    heads, last norms of residual blocks) are drawn at random, else no fault upstream of them
    could show."""
    for argument in (*SIZE_ARGUMENTS, None):
        value = (size, size) if argument == "input_size" else size
        options = {argument: value} if argument else {}
        try:
            if source == "torchvision":
                model = torchvision.models.get_model(name, weights=None, num_classes=10, **options)
            else:
                model = timm.create_model(name, pretrained=False, num_classes=10, **options)
        except TypeError:  # no such constructor argument
            if argument is None:
                raise
            continue
        break
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("weight") and not parameter.any():
                if parameter.dim() == 1:
                    parameter.fill_(1.0)
                else:
                    parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval(), argument is not None


def smallest(source: str, name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model at the smallest of ``SIZES`` it accepts, and ``IMAGES`` random images."""
    model, sized, errors = None, True, []
    for size in SIZES:
        images = torch.randn(IMAGES, 3, size, size, generator=torch.Generator().manual_seed(size))
        try:
            if model is None or sized:
                model = None  # free the last size's build first
                model, sized = build(source, name, size)
            with torch.no_grad():
                model(images)
            return model, images
        except Exception as error:  # a size the model refuses: try the next
            errors.append(f"{size}: {type(error).__name__}: {error}")
    raise AssertionError(f"{name} accepts none of {SIZES}:\n" + "\n".join(errors[-3:]))


def weight_edit_reason(module: nn.Module, site: LayerSite) -> str:
    """Why a weight fault of ``module`` is a weight edit instead of a delta on its output."""
    if site.calls == 0:  # "its forward never runs: ...", "its output has no image dimension"
        return site.neuron_note.split(" (")[0]
    if site.calls > 1:
        return f"called {site.calls} times per forward"
    if not isinstance(module, nn.Linear | nn.Conv2d):
        return f"{type(module).__name__}: no delta rule"
    if not computes_as(module, nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d):
        return f"{type(module).__name__}: computes otherwise than the layer it subclasses"
    return f"{type(module).__name__}: padding beyond the delta rule"


def trials_for(engine: Engine, layers: list[str], name: str) -> list[Trial]:
    """One fp32 weight and one fp32 neuron fault per layer, and a weight and a neuron fault in
    each other format at a few layers."""
    rng = random.Random(zlib.crc32(name.encode()))
    trials = []
    for layer in layers:
        site = engine.sites[layer]
        trials.append(
            Trial(
                "weight", layer, rng.randrange(site.weight_elements), rng.choice(FP32_BITS), "fp32"
            )
        )
        if site.output_shapes:
            trials.append(
                Trial(
                    "neuron",
                    layer,
                    rng.randrange(site.neuron_elements),
                    rng.choice(FP32_BITS),
                    "fp32",
                )
            )
    with_neurons = [layer for layer in layers if engine.sites[layer].output_shapes]
    for fmt, width in (("int8", 8), ("fp16", 16), ("bf16", 16)):
        for kind, choices in (("weight", layers), ("neuron", with_neurons)):
            for layer in rng.sample(choices, min(2, len(choices))):
                site = engine.sites[layer]
                size = site.weight_elements if kind == "weight" else site.neuron_elements
                bit = rng.choice([width - 2, width - 1, width - 3, rng.randrange(width)])
                trials.append(Trial(kind, layer, rng.randrange(size), bit, fmt))
    return list(dict.fromkeys(trials))  # each once


@pytest.fixture(autouse=True)
def _release_models():
    """Free each model before the next is built: an engine refers to itself through its
    evaluators' settings, so only the cycle collector frees it, and the zoo's largest models
    take gigabytes each (the reference copies them too)."""
    yield
    gc.collect()


@pytest.mark.slow
@pytest.mark.parametrize(("source", "name"), MODELS, ids=[f"{s}:{n}" for s, n in MODELS])
def test_zoo(source, name, caplog):
    torch.manual_seed(0)
    start = time.perf_counter()
    model, images = smallest(source, name)
    built = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="bitstorm.campaign.faults.engine"):
        engine = Engine(model, images[:1], device="cpu")
    fallback = [r.getMessage() for r in caplog.records if "falling back to hooks" in r.getMessage()]
    space = find_sites(model, images)
    layers = space.names()
    trials = trials_for(engine, layers, name)
    cache = engine.golden(images, layers, KINDS)
    checked = check(engine, model, cache, trials, limit=REFERENCE_LIMIT)
    done = time.perf_counter()

    weight_edits = {
        layer: weight_edit_reason(model.get_submodule(layer), engine.sites[layer])
        for layer in layers
        if engine.evaluator("weight", layer) == "weight edit"
    }
    paths: dict[str, int] = {}
    for layer in layers:
        for kind in KINDS if engine.sites[layer].output_shapes else ("weight",):
            key = f"{kind}:{engine.evaluator(kind, layer)}"
            paths[key] = paths.get(key, 0) + 1
    reasons: dict[str, int] = {}
    for reason in weight_edits.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    sdc = torch.cat([o.sdc for o in checked.outcomes.values()])
    report = {
        "model": f"{source}:{name}",
        "size": images.shape[-1],
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": len(layers),
        "mode": engine.mode,
        "hooks_warning": fallback[0] if fallback else None,
        "evaluators": paths,
        "weight_edit_layers": len(weight_edits),
        "weight_edit_reasons": reasons,
        "weight_edit_examples": list(weight_edits)[:4],
        "no_neuron_sites": sum(1 for layer in layers if not engine.sites[layer].output_shapes),
        "trials": len(trials) * IMAGES,
        "compared": len(checked.compared) * IMAGES,
        "unchecked": len(checked.unchecked) * IMAGES,
        "sdc_rate": round(float(sdc.float().mean()), 3),
        "disagreements": [
            {**vars(d), "trial": vars(d.trial), "near_tie": d.near_tie}
            for d in checked.disagreements
        ],
        "build_s": round(built - start, 1),
        "run_s": round(done - built, 1),
    }
    line = json.dumps(report)
    print(line)
    if os.environ.get("BITSTORM_ZOO_REPORT"):
        with open(os.environ["BITSTORM_ZOO_REPORT"], "a", encoding="utf-8") as out:
            out.write(line + "\n")
    assert len(sdc) == len(trials) * IMAGES
    assert all(d.near_tie for d in checked.disagreements), checked.disagreements

"""The correctness oracle: trials run one at a time through pytorchfi 0.6.0, with
``bits.corrupt`` (the trial's fault model) as its error function. Slow on purpose, and
obviously right: every other evaluator in bitstorm must agree with it.

pytorchfi numbers layers in two different ways: weight layers by ``model.modules()`` order, neuron
layers by hook *call* order. We translate qualified names into both numberings for the target
module's own type, and refuse (with a clear message) the sites pytorchfi cannot address
faithfully: modules whose forward never runs, modules called more than once per forward, and
tensors of more than four dimensions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pytorchfi import core
from torch import nn

from bitstorm.errors import ConfigError
from campaign.faults.bits import BIT_FLIP, FaultModel, corrupt, format_width, int8_scale
from campaign.faults.sites import LayerSite, activation_peaks, eval_mode, find_sites
from campaign.faults.trials import KINDS

Kind = Literal["weight", "neuron"]  # campaign.faults.trials.KINDS


@dataclass(frozen=True)
class Trial:
    """One fault: ``fault`` at bit ``bit`` (in format ``fmt``) of element ``index`` of a layer's
    weight tensor (``kind="weight"``) or of one image's output of that layer
    (``kind="neuron"``)."""

    kind: Kind
    layer: str
    index: int
    bit: int
    fmt: str
    fault: FaultModel = BIT_FLIP

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(
                f"trial kind {self.kind!r} is unknown; pass {' or '.join(map(repr, KINDS))}"
            )
        if self.bit not in self.fault.bits(self.fmt):
            raise ConfigError(
                f"bit {self.bit} is outside {self.fmt}'s {format_width(self.fmt)} bits for "
                f"{self.fault.name} (0..{self.fault.bits(self.fmt).stop - 1})"
            )


def random_weight_trials(
    sites: Sequence[LayerSite], rng: np.random.Generator, count: int
) -> list[Trial]:
    """``count`` fp32 weight faults uniform over every weight bit of ``sites``: a layer with
    probability proportional to its weight elements, then an element and a bit uniformly."""
    weights = np.array([site.weight_elements for site in sites], dtype=float)
    trials = []
    for layer in rng.choice(len(sites), size=count, p=weights / weights.sum()):
        site = sites[layer]
        index = int(rng.integers(site.weight_elements))
        bit = int(rng.integers(format_width("fp32")))
        trials.append(Trial("weight", site.name, index, bit, "fp32"))
    return trials


def reference_logits(
    model: nn.Module,
    images: torch.Tensor,
    trials: Sequence[Trial],
    *,
    neuron_scales: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """Faulty logits ``[len(trials), len(images), classes]``: each trial applied to every image.

    A neuron trial corrupts the same element of every image's own output of the layer. int8 weight
    faults use the per-tensor scale ``max|w| / 127``; int8 neuron faults use
    ``neuron_scales[layer]`` or, where absent, ``max|output| / 127`` profiled on ``images``.
    """
    sites = {layer.name: layer for layer in find_sites(model, images[:1], types="weighted")}
    scales = dict(neuron_scales or {})
    injectors: dict[type[nn.Module], _BitFlipInjector] = {}
    outputs = []
    with eval_mode(model), torch.no_grad():
        for trial in trials:
            site = _site(sites, trial)
            module = model.get_submodule(trial.layer)
            if type(module) not in injectors:
                injectors[type(module)] = _BitFlipInjector(model, images, [type(module)])
            injector = injectors[type(module)]
            if trial.kind == "weight":
                corrupted = injector.corrupt_weight(module, site, trial)
            else:
                scale = None
                if trial.fmt == "int8":
                    if trial.layer not in scales:
                        peak = activation_peaks(model, images, [trial.layer])[trial.layer]
                        scales[trial.layer] = peak / 127
                    scale = scales[trial.layer]
                corrupted = injector.corrupt_neurons(
                    [(b, module, site, trial, scale) for b in range(len(images))]
                )
            outputs.append(corrupted(images))
    return torch.stack(outputs)


def _site(sites: dict[str, LayerSite], trial: Trial) -> LayerSite:
    if trial.layer not in sites:
        raise ConfigError(
            f"{trial.layer!r} is not a module with a weight; list injectable layers with "
            "campaign.faults.sites.find_sites(model, example)"
        )
    site = sites[trial.layer]
    if trial.kind == "weight":
        site.locate_weight(trial.index)
        return site
    if site.calls != 1:
        why = site.neuron_note or (
            f"it runs {site.calls} times per forward and pytorchfi numbers neuron layers by call, "
            "so it would inject into the wrong call"
        )
        raise ConfigError(f"the reference cannot inject neuron faults into {trial.layer}: {why}")
    site.locate_neuron(trial.index)
    return site


class _BitFlipInjector(core.fault_injection):
    """pytorchfi's injector with exact faults (``bits.corrupt``) as its custom error function.

    One instance serves every trial on modules of one type; ``declare_*_fi`` resets its state and
    deep-copies the model per trial, as pytorchfi intends.
    """

    def __init__(
        self, model: nn.Module, images: torch.Tensor, layer_types: Sequence[type[nn.Module]]
    ):
        self._model = model
        self._images = images
        # Per batch element: (layer number, location, trial, int8 scale).
        self._faults: dict[int, tuple[int, tuple[int, ...], Trial, float | None]] = {}
        self._call_order: list[nn.Module] | None = None
        super().__init__(
            model,
            batch_size=len(images),
            input_shape=list(images.shape[1:]),
            layer_types=list(layer_types),
            use_cuda=images.is_cuda,
        )

    def corrupt_weight(self, module: nn.Module, site: LayerSite, trial: Trial) -> nn.Module:
        location = site.locate_weight(trial.index)
        if len(location) > 4:
            raise ConfigError(
                f"pytorchfi addresses weights with at most 4 indices; {trial.layer} has "
                f"{len(location)}-d weights, which the reference cannot inject into"
            )
        padded = (*location, *([None] * (4 - len(location))))
        number = [
            m for m in self._model.modules() if isinstance(m, tuple(self.get_inj_layer_types()))
        ]
        scale = int8_scale(module.weight.detach()) if trial.fmt == "int8" else None

        def corrupt_weight(weight: torch.Tensor, loc: tuple) -> torch.Tensor:
            return corrupt(weight[loc], trial.bit, trial.fmt, scale, trial.fault)

        return self.declare_weight_fi(
            function=corrupt_weight,
            layer_num=[_position(number, module)],
            k=[padded[0]],
            dim1=[padded[1]],
            dim2=[padded[2]],
            dim3=[padded[3]],
        )

    def corrupt_neurons(
        self, faults: Sequence[tuple[int, nn.Module, LayerSite, Trial, float | None]]
    ) -> nn.Module:
        """A model copy where batch element ``b`` gets ``trial`` for each ``(b, module, site,
        trial, int8 scale)``: pytorchfi's one-fault-per-element mode."""
        self._faults = {}
        for batch_index, module, site, trial, scale in faults:
            _, location = site.locate_neuron(trial.index)
            if len(location) > 3:
                raise ConfigError(
                    f"pytorchfi addresses outputs of at most 4 dimensions; {trial.layer}'s "
                    f"outputs have {len(location) + 1}, which the reference cannot inject into"
                )
            self._faults[batch_index] = (self._neuron_layer_number(module), location, trial, scale)
        padded = {b: (*f[1], *([None] * (3 - len(f[1])))) for b, f in self._faults.items()}
        batches = list(self._faults)
        return self.declare_neuron_fi(
            function=self._corrupt_output,
            batch=batches,
            layer_num=[self._faults[b][0] for b in batches],
            dim1=[padded[b][0] for b in batches],
            dim2=[padded[b][1] for b in batches],
            dim3=[padded[b][2] for b in batches],
        )

    def _neuron_layer_number(self, module: nn.Module) -> int:
        """pytorchfi's neuron layer number of ``module``: its place in hook call order.

        pytorchfi hooks every leaf of the layer types once per *parent that holds it*, walking
        ``children()``: a module shared between blocks (CoaT's convolutional position
        encodings) is hooked, and counted, once per holder at every call. The order is recorded
        with hooks placed the same way, so the numbering is pytorchfi's own.
        """
        if self._call_order is None:
            order: list[nn.Module] = []
            handles = [
                leaf.register_forward_hook(lambda m, _inputs, _output: order.append(m))
                for leaf in _pytorchfi_leaves(self._model, tuple(self.get_inj_layer_types()))
            ]
            try:
                self._model(self._images[:1])
            finally:
                for handle in handles:
                    handle.remove()
            assert len(order) == self.get_total_layers(), "pytorchfi saw other layers than we did"
            self._call_order = order
        # Only the target must be called once; other modules of its type may be called
        # repeatedly. A shared target is hooked once per holder: pytorchfi's counter is at its
        # first hook when it injects, and the later hooks of the same call leave it be.
        return self._call_order.index(module)

    def _corrupt_output(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        """pytorchfi neuron hook: each batch element's declared fault in this layer."""
        layer = self.get_current_layer()
        for batch_index, (number, location, trial, scale) in self._faults.items():
            if number == layer:
                element = (batch_index, *location)
                output[element] = corrupt(output[element], trial.bit, trial.fmt, scale, trial.fault)
        self.updateLayer()
        if self.get_current_layer() >= self.get_total_layers():
            self.reset_current_layer()


class PytorchfiBatched:
    """pytorchfi 0.6.0 in its fastest use, the baseline of the benchmarks: one neuron fault per
    batch element in one forward, or one weight fault applied to a whole batch of images."""

    def __init__(self, model: nn.Module, images: torch.Tensor) -> None:
        self.model = model.eval()
        self.sites = {s.name: s for s in find_sites(model, images[:1], types="weighted")}
        with torch.no_grad():
            self.injector = _BitFlipInjector(model, images, (nn.Conv2d, nn.Linear))

    def neuron_batch(self, images: torch.Tensor, trials: Sequence[Trial]) -> torch.Tensor:
        """Logits ``[len(images), classes]``: trial ``i`` on image ``i``."""
        faults = [
            (i, self.model.get_submodule(t.layer), _site(self.sites, t), t, None)
            for i, t in enumerate(trials)
        ]
        with torch.no_grad():
            return self.injector.corrupt_neurons(faults)(images)

    def weight_fault(self, images: torch.Tensor, trial: Trial) -> torch.Tensor:
        """Logits ``[len(images), classes]`` of every image under one weight fault."""
        module = self.model.get_submodule(trial.layer)
        with torch.no_grad():
            return self.injector.corrupt_weight(module, _site(self.sites, trial), trial)(images)


def _pytorchfi_leaves(model: nn.Module, types: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    """The modules pytorchfi hooks, in its order, once per holder: leaves of ``types`` reached
    through ``children()`` (pytorchfi's ``_traverse_model_set_hooks``)."""
    found = []
    for child in model.children():
        if list(child.children()):
            found += _pytorchfi_leaves(child, types)
        elif isinstance(child, types):
            found.append(child)
    return found


def _position(modules: list[nn.Module], module: nn.Module) -> int:
    matches = [i for i, m in enumerate(modules) if m is module]
    assert len(matches) == 1, "module must occur exactly once in pytorchfi's numbering"
    return matches[0]

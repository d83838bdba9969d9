"""The correctness oracle: trials run one at a time through pytorchfi 0.6.0, with ``bits.flip``
as its error function. Slow on purpose, and obviously right: every other evaluator in bitstorm
must agree with it.

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

import torch
from pytorchfi import core
from torch import nn

from bitstorm.errors import ConfigError
from campaign.bits import flip, format_width, int8_scale
from campaign.sites import LayerSite, activation_peaks, eval_mode, find_sites, hooked_outputs

Kind = Literal["weight", "neuron"]
KINDS: tuple[Kind, ...] = ("weight", "neuron")


@dataclass(frozen=True)
class Trial:
    """One fault: bit ``bit`` (in format ``fmt``) of element ``index`` of a layer's weight tensor
    (``kind="weight"``) or of one image's output of that layer (``kind="neuron"``)."""

    kind: Kind
    layer: str
    index: int
    bit: int
    fmt: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"trial kind {self.kind!r} is unknown; pass 'weight' or 'neuron'")
        if not 0 <= self.bit < format_width(self.fmt):
            raise ConfigError(
                f"bit {self.bit} is outside {self.fmt}'s {format_width(self.fmt)} bits "
                f"(0..{format_width(self.fmt) - 1})"
            )


def reference_logits(
    model: nn.Module,
    images: torch.Tensor,
    trials: Sequence[Trial],
    *,
    neuron_scales: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """Faulty logits ``[len(trials), len(images), classes]``: each trial applied to every image.

    A neuron trial flips the same element of every image's own output of the layer. int8 weight
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
                injectors[type(module)] = _BitFlipInjector(model, images, type(module))
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
                corrupted = injector.corrupt_neuron(module, site, trial, scale)
            outputs.append(corrupted(images))
    return torch.stack(outputs)


def _site(sites: dict[str, LayerSite], trial: Trial) -> LayerSite:
    if trial.layer not in sites:
        raise ConfigError(
            f"{trial.layer!r} is not a module with a weight; list injectable layers with "
            "campaign.sites.find_sites(model, example)"
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
    """pytorchfi's injector with exact bit flips as its custom error function.

    One instance serves every trial on modules of one type; ``declare_*_fi`` resets its state and
    deep-copies the model per trial, as pytorchfi intends.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, layer_type: type[nn.Module]):
        self._model = model
        self._images = images
        self._trial: Trial | None = None
        self._location: tuple[int, ...] = ()
        self._scale: float | None = None
        super().__init__(
            model,
            batch_size=len(images),
            input_shape=list(images.shape[1:]),
            layer_types=[layer_type],
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

        def flip_weight(weight: torch.Tensor, loc: tuple) -> torch.Tensor:
            return flip(weight[loc], trial.bit, trial.fmt, scale)

        return self.declare_weight_fi(
            function=flip_weight,
            layer_num=[_position(number, module)],
            k=[padded[0]],
            dim1=[padded[1]],
            dim2=[padded[2]],
            dim3=[padded[3]],
        )

    def corrupt_neuron(
        self, module: nn.Module, site: LayerSite, trial: Trial, scale: float | None
    ) -> nn.Module:
        _, location = site.locate_neuron(trial.index)
        if len(location) > 3:
            raise ConfigError(
                f"pytorchfi addresses outputs of at most 4 dimensions; {trial.layer}'s outputs "
                f"have {len(location) + 1}, which the reference cannot inject into"
            )
        self._trial, self._location, self._scale = trial, location, scale
        padded = (*location, *([None] * (3 - len(location))))
        batch = len(self._images)
        layer = self._neuron_layer_number(module)
        return self.declare_neuron_fi(
            function=self._flip_output,
            batch=list(range(batch)),
            layer_num=[layer] * batch,
            dim1=[padded[0]] * batch,
            dim2=[padded[1]] * batch,
            dim3=[padded[2]] * batch,
        )

    def _neuron_layer_number(self, module: nn.Module) -> int:
        """pytorchfi's neuron layer number of ``module``: its place in hook call order."""
        leaves = {
            name: m
            for name, m in self._model.named_modules()
            if not list(m.children()) and isinstance(m, tuple(self.get_inj_layer_types()))
        }
        order: list[nn.Module] = []
        with hooked_outputs(leaves, lambda name, _out: order.append(leaves[name])):
            self._model(self._images[:1])
        assert len(order) == self.get_total_layers(), "pytorchfi saw other layers than we did"
        return _position(order, module)

    def _flip_output(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        """pytorchfi neuron hook: flip the declared element of each batch element's output."""
        assert self._trial is not None
        if self.get_current_layer() in self.corrupt_layer:
            for batch_index in self.corrupt_batch:
                element = (batch_index, *self._location)
                output[element] = flip(
                    output[element], self._trial.bit, self._trial.fmt, self._scale
                )
        self.updateLayer()
        if self.get_current_layer() >= self.get_total_layers():
            self.reset_current_layer()


def _position(modules: list[nn.Module], module: nn.Module) -> int:
    matches = [i for i, m in enumerate(modules) if m is module]
    assert len(matches) == 1, "module must occur exactly once in pytorchfi's numbering"
    return matches[0]

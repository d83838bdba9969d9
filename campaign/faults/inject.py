"""How one trial's fault changes a value: the flipped weight or neuron, and a weight fault as a
delta on the layer's cached output.

Why a delta: one changed weight ``w -> w'`` changes a Linear's output in one unit and a Conv2d's
in one channel, by ``(w' - w) * input slice``. Adding that to the golden output is exact up to
rounding and far cheaper than running the layer again for every trial.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bitstorm.errors import ConfigError
from campaign.faults.bits import corrupt, int8_scale, quantize, same_bits
from campaign.faults.graph import computes_as
from campaign.faults.trials import TrialGroup


@dataclass(frozen=True)
class RangeRestriction:
    """goldeneye's range restriction (docs/protocols.md): a faulty layer output that is NaN,
    Inf or beyond the layer's bound becomes ``+-bound``, the sign from ``value < 0``, which is
    false for NaN, so NaN becomes ``+bound``. ``bounds``: max |output| per layer, profiled on
    the training split by the caller (the engine never profiles them itself: bounds from the
    campaign's own images would leak the test set into the protection)."""

    bounds: Mapping[str, float] = field(default_factory=dict)

    def bound(self, layer: str) -> float:
        if layer not in self.bounds:
            raise ConfigError(f"range restriction: no profiled bound for layer {layer!r}")
        return float(self.bounds[layer])

    def restrict(self, layer: str, values: torch.Tensor) -> torch.Tensor:
        bound = self.bound(layer)
        return torch.where(values.isnan(), bound, values.clamp(-bound, bound))

    def restrict_changed(self, layer: str, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``new`` restricted where it differs from ``old`` (a weight fault's changed outputs):
        the golden values around the fault stay as the model computed them."""
        changed = (new != old) | new.isnan()
        return torch.where(changed, self.restrict(layer, new), new)


@dataclass(frozen=True)
class Injector:
    """Flips bits of one model's weights and activations; with a ``restriction``, the faulty
    layer output is range-restricted (the flipped neuron, or the outputs a faulty weight
    changed)."""

    model: nn.Module
    restriction: RangeRestriction | None = None

    def needs_peak(self, group: TrialGroup) -> bool:
        """Whether ``group``'s faults need the layer's profiled max |output| (int8 scales)."""
        return group.kind == "neuron" and group.fmt == "int8"

    def weight_values(self, group: TrialGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight as the format stores it, faulty weight) per trial; int8 uses the per-tensor
        scale."""
        _, stored, after = self._weights(group)
        return stored, after

    def _weights(self, group: TrialGroup) -> tuple[torch.Tensor, ...]:
        """(weight as the model computes with it, as the format stores it, faulty) per trial."""
        weight = self.model.get_submodule(group.layer).weight.detach()
        scale = int8_scale(weight) if group.fmt == "int8" else None
        original = weight.reshape(-1)[group.index.to(weight.device)]
        after = corrupt(original, group.bit.to(weight.device), group.fmt, scale, group.fault)
        return original, quantize(original, group.fmt, scale), after

    def neuron_values(
        self, group: TrialGroup, golden: torch.Tensor, peak: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(value as the format stores it, faulty value) of the selected elements ``golden``;
        int8 uses the per-layer scale ``peak / 127``; the faulty value is range-restricted
        when the injector restricts."""
        bits = group.bit.to(golden.device)
        scale = peak / 127 if group.fmt == "int8" else None
        after = corrupt(golden, bits, group.fmt, scale, group.fault)
        if self.restriction is not None:
            after = self.restriction.restrict(group.layer, after)
        return quantize(golden, group.fmt, scale), after

    def leaves_output(self, group: TrialGroup, layer_input: torch.Tensor) -> torch.Tensor:
        """Per weight fault: whether it leaves the layer's output exactly as it was, because
        every input value the weight multiplies is zero (a window in the padding, a channel a
        ReLU zeroed) and the faulty weight is finite (Inf x 0 is NaN). ``layer_input``: the
        layer's golden input for every image (only each trial's slice is read)."""
        original, _, after = self._weights(group)
        module = self.model.get_submodule(group.layer)
        device = layer_input.device
        _, x = weight_operand(module, layer_input, group.index.to(device), group.image.to(device))
        return (x == 0).flatten(1).all(dim=1) & torch.isfinite(after - original)

    def leaves_weight(self, group: TrialGroup) -> torch.Tensor:
        """Per weight fault: whether the faulty weight is the one the model computes with, bit
        for bit (a stuck-at bit that already held its value, in the model's own format)."""
        original, _, after = self._weights(group)
        return same_bits(original, after)

    def changed_outputs(self, layer: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """How a weight fault's changed outputs (old, new) become the layer's output."""
        if self.restriction is None:
            return lambda _old, new: new
        restriction = self.restriction
        return lambda old, new: restriction.restrict_changed(layer, old, new)

    def apply(
        self,
        group: TrialGroup,
        output: torch.Tensor,
        layer_input: torch.Tensor | None,
        peak: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Change ``output`` (one row per trial) in place by each trial's fault; return the
        values before and after the flip. Weight faults need the layer's ``layer_input``."""
        if group.kind == "neuron":
            flat = output.view(len(group), -1)
            rows = torch.arange(len(group), device=output.device)
            index = group.index.to(output.device)
            before, after = self.neuron_values(group, flat[rows, index], peak)
            flat[rows, index] = after.to(flat.dtype)
            return before, after
        original, before, after = self._weights(group)
        add_weight_delta(
            self.model.get_submodule(group.layer),
            output,
            layer_input,
            group.index.to(output.device),
            after - original,
            self.changed_outputs(group.layer),
        )
        return before, after


def weight_delta_applies(module: nn.Module, calls: int) -> bool:
    """Whether a weight fault of ``module`` (run ``calls`` times per forward) can be a delta on
    its cached output; else the weight is edited in place for a forward.

    The delta rule is the arithmetic of ``nn.Linear`` and ``nn.Conv2d`` themselves, so a subclass
    that computes its output otherwise (timm's ``StdConv2d`` standardises the whole weight first,
    ``Conv2dSame`` pads its input inside the forward) takes the edit as well.
    """
    supported = computes_as(module, nn.Linear) or (
        computes_as(module, nn.Conv2d)
        and module.padding_mode == "zeros"
        and isinstance(module.padding, tuple)
    )
    return supported and calls == 1


def add_weight_delta(
    module: nn.Module,
    output: torch.Tensor,
    layer_input: torch.Tensor,
    index: torch.Tensor,
    delta: torch.Tensor,
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda _old, new: new,
) -> None:
    """``output`` (one row per trial) += the change of one weight per trial, in place;
    ``combine(old, new)`` gives the values the changed outputs take (a range restriction)."""
    rows = torch.arange(len(index), device=output.device)
    unit, x = weight_operand(module, layer_input, index)
    if isinstance(module, nn.Linear):
        view = output.view(len(index), -1, module.out_features)
        old = view[rows, :, unit]
        view[rows, :, unit] = combine(old, old + (delta[:, None] * x).to(output.dtype))
        return
    old = output[rows, unit]
    output[rows, unit] = combine(old, old + (delta[:, None, None] * x).to(output.dtype))


def weight_operand(
    module: nn.Module,
    layer_input: torch.Tensor,
    index: torch.Tensor,
    image: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per trial, the output unit (Linear) or channel (Conv2d) that weight ``index`` feeds, and
    the input values it multiplies there: ``[T, positions]`` for a Linear, ``[T, H_out,
    W_out]`` for a Conv2d (zero where its window lies in the padding). ``layer_input`` holds
    one row per trial, or with ``image`` one per image (only the slices needed are gathered)."""
    rows = torch.arange(len(index), device=layer_input.device) if image is None else image
    if isinstance(module, nn.Linear):
        out_unit, in_unit = index // module.in_features, index % module.in_features
        per_row = layer_input.reshape(len(layer_input), -1, module.in_features)
        return out_unit, per_row[rows, :, in_unit]
    assert isinstance(module, nn.Conv2d)
    out_c, in_per_group, kh, kw = module.weight.shape
    o = index // (in_per_group * kh * kw)
    rest = index % (in_per_group * kh * kw)
    i, r = rest // (kh * kw), rest % (kh * kw)
    ky, kx = r // kw, r % kw
    channel = (o // (out_c // module.groups)) * in_per_group + i
    ph, pw = module.padding
    x = F.pad(layer_input[rows, channel], (pw, pw, ph, ph))  # [T, H + 2ph, W + 2pw]
    h_out = (x.shape[-2] - module.dilation[0] * (kh - 1) - 1) // module.stride[0] + 1
    w_out = (x.shape[-1] - module.dilation[1] * (kw - 1) - 1) // module.stride[1] + 1
    sh, sw = module.stride
    dh, dw = module.dilation
    ys = (ky * dh)[:, None] + sh * torch.arange(h_out, device=x.device)[None, :]
    xs = (kx * dw)[:, None] + sw * torch.arange(w_out, device=x.device)[None, :]
    trials = torch.arange(len(index), device=x.device)
    return o, x[trials[:, None, None], ys[:, :, None], xs[:, None, :]]

"""How one trial's fault changes a value: the flipped weight or neuron, and a weight fault as a
delta on the layer's cached output.

Why a delta: one changed weight ``w -> w'`` changes a Linear's output in one unit and a Conv2d's
in one channel, by ``(w' - w) * input slice``. Adding that to the golden output is exact up to
rounding and far cheaper than running the layer again for every trial.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from campaign.faults.bits import flip, int8_scale, quantize
from campaign.faults.graph import computes_as
from campaign.faults.trials import TrialGroup


@dataclass(frozen=True)
class Injector:
    """Flips bits of one model's weights and activations. ``clamp`` replaces a flipped
    activation by its value clamped to the layer's profiled max |activation| (NaN becomes 0)."""

    model: nn.Module
    clamp: bool = False

    def needs_peak(self, group: TrialGroup) -> bool:
        """Whether ``group``'s faults need the layer's profiled max |output|."""
        return group.kind == "neuron" and (group.fmt == "int8" or self.clamp)

    def weight_values(self, group: TrialGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored weight, flipped weight) per trial; int8 uses the per-tensor scale."""
        weight = self.model.get_submodule(group.layer).weight.detach()
        scale = int8_scale(weight) if group.fmt == "int8" else None
        original = weight.reshape(-1)[group.index.to(weight.device)]
        return original, flip(original, group.bit.to(weight.device), group.fmt, scale)

    def neuron_values(
        self, group: TrialGroup, golden: torch.Tensor, peak: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(value before, flipped value) of the selected elements ``golden``; int8 uses the
        per-layer scale ``peak / 127``, and the flipped value is clamped to ``peak`` when the
        injector clamps."""
        bits = group.bit.to(golden.device)
        scale = peak / 127 if group.fmt == "int8" else None
        after = flip(golden, bits, group.fmt, scale)
        if self.clamp:
            after = torch.nan_to_num(after, nan=0.0, posinf=peak, neginf=-peak).clamp(-peak, peak)
        return quantize(golden, group.fmt, scale), after

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
        before, after = self.weight_values(group)
        add_weight_delta(
            self.model.get_submodule(group.layer),
            output,
            layer_input,
            group.index.to(output.device),
            after - before,
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
) -> None:
    """``output`` (one row per trial) += the change of one weight per trial, in place."""
    rows = torch.arange(len(index), device=output.device)
    if isinstance(module, nn.Linear):
        out_unit, in_unit = index // module.in_features, index % module.in_features
        x = layer_input.reshape(len(index), -1, module.in_features)[rows, :, in_unit]
        view = output.view(len(index), -1, module.out_features)
        view[rows, :, out_unit] += (delta[:, None] * x).to(output.dtype)
        return
    assert isinstance(module, nn.Conv2d)
    out_c, in_per_group, kh, kw = module.weight.shape
    o = index // (in_per_group * kh * kw)
    rest = index % (in_per_group * kh * kw)
    i, r = rest // (kh * kw), rest % (kh * kw)
    ky, kx = r // kw, r % kw
    channel = (o // (out_c // module.groups)) * in_per_group + i
    ph, pw = module.padding
    x = F.pad(layer_input[rows, channel], (pw, pw, ph, ph))  # [T, H + 2ph, W + 2pw]
    h_out, w_out = output.shape[-2:]
    sh, sw = module.stride
    dh, dw = module.dilation
    ys = (ky * dh)[:, None] + sh * torch.arange(h_out, device=output.device)[None, :]
    xs = (kx * dw)[:, None] + sw * torch.arange(w_out, device=output.device)[None, :]
    patch = x[rows[:, None, None], ys[:, :, None], xs[:, None, :]]
    output[rows, o] += (delta[:, None, None] * patch).to(output.dtype)

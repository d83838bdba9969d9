"""Faults that change nothing the logits see, settled without running a suffix.

A fault that leaves its value as the model computes with it, bit for bit (a stuck-at bit that
already holds its value), leaves everything as it was: the golden logits, exactly. Such a trial
is a trial like any other, masked, and counts in every rate's denominator.

A weight fault whose weight multiplies only zeros (a kernel tap in the padding of a small
feature map, an input channel a ReLU zeroed for this image) leaves its layer's output as it
was (campaign.faults.inject.Injector.leaves_output): the golden logits, exactly.

A neuron fault changes one element of a layer's output. Where that output's only reader is a
chain of at most a per-channel affine map (eval BatchNorm2d), at most an add of a golden value
(a residual branch from before the cut), and a clamp (ReLU, ReLU6, Hardtanh), and the golden
element and the faulty one both end beyond the same side of the clamp (both negative into a
ReLU, say), the clamp's output is the golden one, and so is everything after it: the trial's
logits are the golden logits, known without a forward.

Exact, not statistical: the affine map is evaluated in float64, and an element counts as clamped
only when it lies beyond the bound by more than the rounding of the layer's dtype could move it
(the kernel computes in that dtype); the near-ties run their suffix as every other trial does.
NaN is never clamped (it passes a ReLU), so a NaN fault always runs.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from campaign.faults.graph import Cut, computes_as

# The names the engine counts settled trials under.
NEURON_TECHNIQUE = "neuron masked by the next clamp"
WEIGHT_TECHNIQUE = "weight meets only zeros"  # campaign.faults.inject.Injector.leaves_output
UNCHANGED_TECHNIQUE = "fault leaves the value as it was"  # a stuck-at bit that already held

# Rounding allowance in units of the dtype's epsilon times the magnitudes the affine map sums:
# far above what one multiply and one add (fused or not) can round by.
ALLOWANCE_EPS = 64

_RELU_FUNCTIONS = {F.relu: (0.0, math.inf), torch.relu: (0.0, math.inf), F.relu6: (0.0, 6.0)}
_RELU_METHODS = {"relu": (0.0, math.inf), "relu_": (0.0, math.inf)}


@dataclass(frozen=True)
class ClampRule:
    """What the chain after a layer does to one of its elements: ``x * scale + shift`` per
    channel (None: no affine map), plus the same element of the cut's external ``addend`` (a
    golden residual; None: none), then a clamp to ``[low, high]``."""

    low: float
    high: float
    addend: int | None = None  # position in the cut's externals
    scale: torch.Tensor | None = None  # float64 per channel
    shift: torch.Tensor | None = None  # float64 per channel
    magnitude: torch.Tensor | None = None  # |mean * scale| + |bias| per channel: what rounds
    eps: float = torch.finfo(torch.float32).eps

    def settles(
        self,
        channel: torch.Tensor,
        golden: torch.Tensor,
        faulty: torch.Tensor,
        added: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per trial: whether the golden and the faulty element (of ``channel``; ``added``: the
        addend's element) both leave the clamp at the same bound, beyond rounding."""
        golden_y, golden_slack = self._through(channel, golden, added)
        faulty_y, faulty_slack = self._through(channel, faulty, added)
        below = (golden_y <= self.low - golden_slack) & (faulty_y <= self.low - faulty_slack)
        above = (golden_y >= self.high + golden_slack) & (faulty_y >= self.high + faulty_slack)
        return below | above

    def _through(
        self, channel: torch.Tensor, value: torch.Tensor, added: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The element as the clamp receives it (float64), and how far rounding in the layer's
        dtype could have moved it."""
        y = value.double()
        terms = torch.zeros_like(y)
        if self.scale is not None:
            scale, shift, magnitude = (
                t.to(y.device)[channel] for t in (self.scale, self.shift, self.magnitude)
            )
            y = y * scale
            terms = y.abs() + magnitude
            y = y + shift
        if added is not None:
            y = y + added.double()
            terms = terms + added.double().abs() + y.abs()
        return y, self.eps * ALLOWANCE_EPS * terms


def clamp_rule(cut: Cut) -> ClampRule | None:
    """The rule for ``cut``'s value, or None where what reads it is not a single chain of at
    most an eval BatchNorm2d, then at most an add of a golden value of the same shape (a
    residual branch from before the cut), then a clamp."""
    suffix = cut.suffix
    placeholders = [n for n in suffix.graph.nodes if n.op == "placeholder"]
    node, affine, addend = placeholders[0], None, None
    while len(node.users) == 1:
        user = next(iter(node.users))
        args = list(user.args)
        if node not in args or any(isinstance(v, fx.Node) for v in user.kwargs.values()):
            return None
        others = [a for a in args if a is not node]
        if _is_add(user) and addend is None and len(others) == 1 and others[0] in placeholders:
            addend = placeholders.index(others[0]) - 1  # placeholder 0 is the cut value
            shape = cut.externals[addend].meta["tensor_meta"].shape
            if shape != cut.node.meta["tensor_meta"].shape:
                return None
            node = user
            continue
        if args[0] is not node or any(isinstance(a, fx.Node) for a in others):
            return None
        bounds = _clamp_bounds(suffix, user)
        if bounds is not None:
            return _rule(bounds, affine, addend, cut.node.meta["tensor_meta"].dtype)
        module = suffix.get_submodule(user.target) if user.op == "call_module" else None
        if affine is not None or addend is not None or not _is_eval_batchnorm(module):
            return None
        affine, node = module, user
    return None


def _is_add(node: fx.Node) -> bool:
    if node.kwargs or len(node.args) != 2:
        return False
    if node.op == "call_function":
        return node.target in (operator.add, operator.iadd, torch.add)
    return node.op == "call_method" and node.target in ("add", "add_")


def _clamp_bounds(suffix: fx.GraphModule, node: fx.Node) -> tuple[float, float] | None:
    if node.op == "call_module":
        module = suffix.get_submodule(node.target)
        if type(module) is nn.ReLU:
            return 0.0, math.inf
        if type(module) in (nn.ReLU6, nn.Hardtanh):
            return float(module.min_val), float(module.max_val)
        return None
    if node.op == "call_function" and len(node.args) == 1:
        return _RELU_FUNCTIONS.get(node.target)
    if node.op == "call_method" and len(node.args) == 1:
        return _RELU_METHODS.get(node.target)
    return None


def _is_eval_batchnorm(module: nn.Module | None) -> bool:
    return (
        computes_as(module, nn.BatchNorm2d)
        and not module.training
        and module.track_running_stats
        and module.running_mean is not None
    )


def _rule(
    bounds: tuple[float, float],
    affine: nn.BatchNorm2d | None,
    addend: int | None,
    dtype: torch.dtype,
) -> ClampRule:
    eps = torch.finfo(dtype).eps
    if affine is None:
        return ClampRule(*bounds, addend=addend, eps=eps)
    mean = affine.running_mean.double().cpu()
    scale = 1 / torch.sqrt(affine.running_var.double().cpu() + affine.eps)
    bias = torch.zeros_like(mean)
    if affine.affine:
        scale = scale * affine.weight.double().cpu()
        bias = affine.bias.double().cpu()
    return ClampRule(
        *bounds,
        addend=addend,
        scale=scale,
        shift=bias - mean * scale,
        magnitude=(mean * scale).abs() + bias.abs(),
        eps=eps,
    )

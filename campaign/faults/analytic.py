"""The last layer without a forward: a weight fault in a final Linear changes one output unit by
``(w' - w) * x_i``, and a neuron fault one output unit by its flip, so with the logits the
output times ``scale`` the outcome follows from the golden logits alone.

This is what makes an exhaustive last-layer sweep (every weight x bit x image) cheap: the layer
the paper's headline figure is about carries no sampling error at all.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import nn

from campaign.faults.bits import corrupt, int8_scale, quantize
from campaign.faults.graph import TracedModel
from campaign.faults.inject import RangeRestriction
from campaign.faults.trials import Outcomes, TrialGroup, is_sdc


class GoldenLogits:
    """The final Linear's golden output and inputs, its logits (output times ``scale``), and
    per-column summaries of the *other* logits: what a change to one logit is compared against."""

    def __init__(self, outputs: torch.Tensor, inputs: torch.Tensor, scale: float) -> None:
        self.outputs, self.inputs, self.scale = outputs.float(), inputs, scale
        logits = self.outputs * scale if scale != 1 else self.outputs
        self.logits = logits
        self.top1 = logits.argmax(dim=1)
        g = logits.double()
        k = min(3, g.shape[1])
        values, indices = g.topk(k, dim=1)
        pad = values.new_full((g.shape[0], 3 - k), -math.inf)
        self._values = torch.cat([values, pad], dim=1)
        self._indices = torch.cat([indices, indices.new_full((g.shape[0], 3 - k), -1)], dim=1)
        self.row_max = self._values[:, 0]
        exp = torch.exp(g - self.row_max[:, None])
        self._exp, self._exp_sum = exp, exp.sum(dim=1, keepdim=True)

    def others(self, columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """For each column ``o`` (shape [K]) and image: the best other logit, its index, the
        second best other, and sum_{c != o} exp(logit_c - row_max). Each [K, N]."""
        v, i = self._values.T[:, None, :], self._indices.T[:, None, :]  # [3, 1, N]
        o = columns[:, None]
        is_first, is_second = (i[0] == o), (i[1] == o)
        best = torch.where(is_first, v[1], v[0])
        best_index = torch.where(is_first, i[1], i[0])
        second = torch.where(is_first | is_second, v[2], v[1])
        rest = (self._exp_sum - self._exp)[:, columns].T
        return best, best_index, second, rest


def final_linear_scale(traced: TracedModel, model: nn.Module, layer: str) -> float | None:
    """For a Linear, run once, whose output becomes the logits unchanged or times a constant
    scalar (the text head's ``* exp(logit_scale)``): that scalar. Otherwise None."""
    module = model.get_submodule(layer)
    if not isinstance(module, nn.Linear) or len(traced.calls.get(layer, ())) != 1:
        return None
    cut = traced.cut(layer, 0)
    if cut.externals:
        return None
    graph = cut.suffix.graph
    placeholder = next(iter(graph.nodes))
    value = placeholder  # follows the cut's value through the suffix
    for node in graph.nodes:
        if node is placeholder or node.op == "output" or value not in node.all_input_nodes:
            continue  # constants (the logit scale) need no check: they do not see the cut
        others = [a for a in node.args if a is not value]
        if node.target not in (operator.mul, torch.mul, "mul") or len(others) != 1 or node.kwargs:
            return None
        value = node
    output = next(n for n in graph.nodes if n.op == "output")
    if output.args[0] is not value:
        return None
    with torch.no_grad():  # the scalar: the suffix applied to a one
        probe = torch.ones(1, module.out_features, device=module.weight.device)
        scale = cut.suffix(probe)
    if not torch.allclose(scale, scale.flatten()[0].expand_as(scale)):
        return None
    return float(scale.flatten()[0])


@dataclass(frozen=True)
class LastLayerRules:
    """How the sweep's faulty logit is formed and judged, as the engine's other paths do it."""

    restriction: RangeRestriction | None = None
    non_finite_sdc: bool = True


def final_linear_outcomes(
    weight: torch.Tensor,
    group: TrialGroup,
    golden: GoldenLogits,
    n_bits: int,
    rules: LastLayerRules = LastLayerRules(),
) -> Outcomes:
    """Weight faults of a sweep chunk: ``group`` holds every image for each of ``n_bits`` bits
    of each of its weights, in that nesting (weight, bit, image). One weight changes one output
    unit by ``(w' - w) * x_i``."""
    device = weight.device
    in_features = weight.shape[1]
    n_images = golden.logits.shape[0]
    index = group.index.view(-1, n_bits, n_images)[:, 0, 0].to(device)  # [K]
    bits = group.bit.view(-1, n_bits, n_images)[0, :, 0].to(device)  # [B]
    scale = int8_scale(weight) if group.fmt == "int8" else None
    original = weight.reshape(-1)[index][:, None].expand(-1, n_bits)  # [K, B]
    after = corrupt(
        original.contiguous(), bits[None, :].expand_as(original), group.fmt, scale, group.fault
    )
    out_unit, in_unit = index // in_features, index % in_features
    old = golden.outputs[:, out_unit].T[:, None, :]  # [K, 1, N]
    # In the model's float32, so that overflow to Inf happens where the forward's would.
    new = old + (after - original)[:, :, None] * golden.inputs.float()[:, in_unit].T[:, None, :]
    if rules.restriction is not None:
        new = rules.restriction.restrict_changed(group.layer, old.expand_as(new), new)
    before = quantize(original, group.fmt, scale)[:, :, None]
    return _changed_logit(new, out_unit, golden, before, after[:, :, None], rules)


def final_logit_outcomes(
    group: TrialGroup,
    golden: GoldenLogits,
    n_bits: int,
    peak: float | None,
    rules: LastLayerRules = LastLayerRules(),
) -> Outcomes:
    """Neuron faults of a sweep chunk: ``group`` holds every image for each of ``n_bits`` bits
    of each of its output units (logits), in that nesting; ``peak`` is the int8 scale's."""
    n_images = golden.logits.shape[0]
    units = group.index.view(-1, n_bits, n_images)[:, 0, 0].to(golden.outputs.device)  # [K]
    bits = group.bit.view(-1, n_bits, n_images)[0, :, 0].to(golden.outputs.device)  # [B]
    scale = peak / 127 if group.fmt == "int8" else None
    old = golden.outputs[:, units].T[:, None, :].expand(-1, n_bits, -1).contiguous()  # [K,B,N]
    after = corrupt(old, bits[None, :, None].expand_as(old), group.fmt, scale, group.fault)
    new = after if rules.restriction is None else rules.restriction.restrict(group.layer, after)
    return _changed_logit(new, units, golden, quantize(old, group.fmt, scale), new, rules)


def _changed_logit(
    output: torch.Tensor,
    unit: torch.Tensor,
    golden: GoldenLogits,
    before: torch.Tensor,
    after: torch.Tensor,
    rules: LastLayerRules,
) -> Outcomes:
    """Outcomes when the final Linear's output unit ``unit[k]`` takes ``output[k, b, n]`` and
    every other logit keeps its golden value: top-1, Top2Diff and the SDC rule, per trial."""
    value = (output * golden.scale if golden.scale != 1 else output).double()
    # Best other logit, its index, second best other, sum of exp over the others: [K, 1, N].
    m1, i1, m2, rest = (t[:, None, :] for t in golden.others(unit))
    column = unit[:, None, None]
    top1 = torch.where(value > m1, column, torch.where(value == m1, torch.minimum(column, i1), i1))
    finite = torch.isfinite(value)
    top1 = torch.where(value.isnan(), -1, top1)
    t1 = torch.maximum(value, m1)
    t2 = torch.where(value >= m1, m1, torch.maximum(value, m2))
    shift = golden.row_max[None, None, :] - t1
    denominator = torch.exp(value - t1) + rest * torch.exp(shift)
    margin = (1 - torch.exp(t2 - t1)) / denominator * 100
    golden_top1 = golden.top1[None, None, :].expand_as(top1)
    non_finite = ~finite
    return Outcomes(
        faulty_top1=top1.reshape(-1).cpu(),
        golden_top1=golden_top1.reshape(-1).cpu(),
        sdc=is_sdc(top1, golden_top1, non_finite, rules.non_finite_sdc).reshape(-1).cpu(),
        non_finite=non_finite.reshape(-1).cpu(),
        top2diff=torch.where(finite, margin, torch.nan).float().reshape(-1).cpu(),
        value_before=before.expand_as(value).float().reshape(-1).cpu(),
        value_after=after.expand_as(value).float().reshape(-1).cpu(),
    )

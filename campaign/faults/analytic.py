"""The last layer without a forward: a weight fault in a final Linear changes one logit by
``scale * (w' - w) * x_i``, so its outcome follows from the golden logits alone.

This is what makes an exhaustive last-layer sweep (every weight x bit x image) cheap: the layer
the paper's headline figure is about carries no sampling error at all.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import nn

from campaign.faults.bits import flip, int8_scale
from campaign.faults.graph import TracedModel
from campaign.faults.trials import Outcomes, TrialGroup


class GoldenLogits:
    """Golden logits and final-layer inputs, with per-column summaries of the *other* columns:
    what a change to one logit is compared against."""

    def __init__(self, logits: torch.Tensor, inputs: torch.Tensor, scale: float) -> None:
        self.logits, self.inputs, self.scale = logits, inputs, scale
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


def final_linear_outcomes(
    weight: torch.Tensor, group: TrialGroup, golden: GoldenLogits, n_bits: int
) -> Outcomes:
    """Outcomes of a sweep chunk: ``group`` holds every image for each of ``n_bits`` bits of
    each of its weights, in that nesting (weight, bit, image)."""
    device = weight.device
    in_features = weight.shape[1]
    n_images = golden.logits.shape[0]
    index = group.index.view(-1, n_bits, n_images)[:, 0, 0].to(device)  # [K]
    bits = group.bit.view(-1, n_bits, n_images)[0, :, 0].to(device)  # [B]
    scale = int8_scale(weight) if group.fmt == "int8" else None
    before = weight.reshape(-1)[index][:, None].expand(-1, n_bits)  # [K, B]
    after = flip(before.contiguous(), bits[None, :].expand_as(before), group.fmt, scale)
    delta = after - before
    out_unit, in_unit = index // in_features, index % in_features
    g, x = golden.logits, golden.inputs.float()
    # In the model's float32, so that overflow to Inf happens where the forward's would.
    change = golden.scale * (delta[:, :, None] * x[:, in_unit].T[:, None, :])
    value = (g[:, out_unit].T[:, None, :] + change).double()
    # Best other logit, its index, second best other, sum of exp over the others: [K, 1, N].
    m1, i1, m2, rest = (t[:, None, :] for t in golden.others(out_unit))
    column = out_unit[:, None, None]
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
        sdc=(non_finite | (top1 != golden_top1)).reshape(-1).cpu(),
        non_finite=non_finite.reshape(-1).cpu(),
        top2diff=torch.where(finite, margin, torch.nan).float().reshape(-1).cpu(),
        value_before=before[:, :, None].expand_as(value).float().reshape(-1).cpu(),
        value_after=after[:, :, None].expand_as(value).float().reshape(-1).cpu(),
    )

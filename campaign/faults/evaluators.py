"""The three ways the engine evaluates a group of trials, fastest first; all exact.

- suffix: the fault changes the cached output of its layer (a flipped element, or a weight's
  delta), then only the suffix after the layer runs, many trials per forward;
- weight edits: a weight the delta rule does not cover (other layer types, subclasses that
  compute otherwise, modules run several times or never) is edited in place for one run, over
  its trials' images, of the graph from where the values it changes meet the images (an edit
  cut; the full forward where the model has no traced graph);
- hooks: for a model torch.fx cannot trace (or a layer with no node of its own in the traced
  graph), a forward hook changes the layer's output, one full forward per trial batch.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from bitstorm.errors import ConfigError
from campaign.faults.bits import same_bits
from campaign.faults.golden import GoldenCache
from campaign.faults.graph import Cut, TracedModel, cached_nodes
from campaign.faults.inject import Injector, weight_delta_applies
from campaign.faults.masking import (
    NEURON_TECHNIQUE,
    UNCHANGED_TECHNIQUE,
    WEIGHT_TECHNIQUE,
    ClampRule,
    clamp_rule,
)
from campaign.faults.sites import LayerSite
from campaign.faults.trials import Outcomes, TrialGroup, outcomes_of

# The layer's profiled max |output| over a cache's images, where a group's faults need it.
PeakOf = Callable[[GoldenCache, TrialGroup], float | None]


@dataclass(frozen=True)
class Setting:
    """What every evaluator needs of its engine."""

    model: nn.Module
    injector: Injector
    sites: dict[str, LayerSite]
    peak: PeakOf
    device: torch.device
    batch_size: int
    cache_bytes: int
    non_finite_sdc: bool = True  # the SDC rule (campaign.faults.trials.is_sdc)
    settle_masked: bool = True  # faults that change nothing downstream need no suffix
    settled: Counter[str] = field(default_factory=Counter)  # trials settled, per technique
    clamps: dict[fx.Node, ClampRule | None] = field(default_factory=dict)  # per cut node

    def outcomes(
        self,
        logits: torch.Tensor,
        golden_top1: torch.Tensor,
        before: torch.Tensor,
        after: torch.Tensor,
    ) -> Outcomes:
        return outcomes_of(logits, golden_top1, before, after, self.non_finite_sdc)


def run_suffixes(
    setting: Setting,
    traced: TracedModel,
    cache: GoldenCache,
    work: list[tuple[int, TrialGroup]],
) -> list[tuple[int, Outcomes]]:
    """All suffix-path groups (position, group): image chunk by image chunk (the golden values
    from the cache where resident, else one golden pass per chunk within ``cache_bytes``), then
    trial batch by trial batch. Groups at the same cut (a layer's weight and neuron faults, or
    several formats) share their batches: one suffix forward serves them all."""
    plans = []  # (position, trial positions in group, sub-group, cut)
    for position, group in work:
        module = setting.model.get_submodule(group.layer)
        if group.kind == "weight" and not weight_delta_applies(
            module, setting.sites[group.layer].calls
        ):  # the engine sends such a weight here only where it has an edit cut
            edit = traced.edit_cut(group.layer, module.weight)
            assert edit is not None
            plans.append((position, torch.arange(len(group)), group, edit))
            continue
        calls, offsets = _neuron_calls(setting.sites[group.layer], group)
        for call in calls.unique().tolist():
            chosen = (calls == call).nonzero().flatten()
            sub = group.subset(chosen, index_offset=offsets[chosen])
            plans.append((position, chosen, sub, traced.cut(group.layer, call)))
    wanted = cached_nodes((cut, sub.kind == "weight") for _, _, sub, cut in plans)
    images = cache.images
    if cache.holds(wanted):
        chunk = len(images)
    else:
        per_image = traced.bytes_per_image(images[:1].to(setting.device), wanted)
        chunk = max(1, min(len(images), setting.cache_bytes // per_image))
    peaks = {position: setting.peak(cache, group) for position, group in work}
    parts: dict[int, list[tuple[torch.Tensor, Outcomes]]] = defaultdict(list)
    for start in range(0, len(images), chunk):
        if cache.holds(wanted):
            values = cache.values
        else:
            _, *computed = traced.golden_module(wanted)(
                images[start : start + chunk].to(setting.device)
            )
            values = dict(zip(wanted, computed, strict=True))
        top1 = cache.top1[start : start + chunk]
        at_cut: dict[int, list[tuple[tuple, torch.Tensor]]] = defaultdict(list)
        for plan in plans:
            image = plan[2].image
            in_chunk = ((image >= start) & (image < start + chunk)).nonzero().flatten()
            if len(in_chunk):
                at_cut[id(plan[3])].append((plan, in_chunk))
        for key, members in list(at_cut.items()):
            if members[0][0][3].node is not None and setting.settle_masked:
                at_cut[key], settled = _settle_masked(setting, members, values, cache, start, peaks)
                for position, trials, outcome in settled:
                    parts[position].append((trials, outcome))
        for members in at_cut.values():
            if not members:
                continue
            cut = members[0][0][3]
            if cut.node is None:  # an edit: one forward per distinct fault in any case
                for (position, chosen, sub, _), in_chunk in members:
                    for part in in_chunk.split(setting.batch_size):
                        batch = sub.subset(part, image_offset=start)
                        outcome = _evaluate_edit(setting, batch, cut, values, top1)
                        parts[position].append((chosen[part], outcome))
                continue
            for batch in _packed(members, setting.batch_size):
                pieces = [
                    (sub.subset(part, image_offset=start), peaks[position])
                    for (position, _, sub, _), part in batch
                ]
                outcomes = _evaluate(setting, pieces, cut, values, top1)
                for ((position, chosen, _, _), part), outcome in zip(batch, outcomes, strict=True):
                    parts[position].append((chosen[part], outcome))
    results = []
    for position, pieces in parts.items():
        order = torch.cat([p[0] for p in pieces])
        results.append(
            (position, Outcomes.cat([p[1] for p in pieces]).select(torch.argsort(order)))
        )
    return results


def _settle_masked(
    setting: Setting,
    members: list[tuple[tuple, torch.Tensor]],
    values: dict[fx.Node, torch.Tensor],
    cache: GoldenCache,
    start: int,
    peaks: dict[int, float | None],
) -> tuple[list[tuple[tuple, torch.Tensor]], list[tuple[int, torch.Tensor, Outcomes]]]:
    """Split one cut's (plan, positions) into those still to run and the trials whose fault
    changes nothing the logits see (campaign.faults.masking): (position in the group's plan,
    trial positions, outcome), the golden logits' outcome."""
    cut = members[0][0][3]
    if cut.node not in setting.clamps:
        setting.clamps[cut.node] = clamp_rule(cut)
    rule = setting.clamps[cut.node]
    left, settled = [], []
    for plan, positions in members:
        position, chosen, sub, _ = plan
        may_stay = sub.fault.may_keep_word
        if sub.kind == "neuron" and rule is None and not may_stay:
            left.append((plan, positions))
            continue
        group = sub.subset(positions, image_offset=start)
        image = group.image.to(setting.device)
        if sub.kind == "weight":
            before, after = setting.injector.weight_values(group)
            unchanged = setting.injector.leaves_weight(group) if may_stay else None
            masked = setting.injector.leaves_output(group, values[cut.node.args[0]])
            technique = WEIGHT_TECHNIQUE
        else:
            before, after, unchanged, masked = _neuron_masking(
                setting, rule, cut, group, values, peaks[position]
            )
            technique = NEURON_TECHNIQUE
        done = torch.zeros(len(group), dtype=torch.bool, device=image.device)
        for name, found in ((UNCHANGED_TECHNIQUE, unchanged), (technique, masked)):
            if found is not None:
                setting.settled[name] += int((found & ~done).sum())
                done |= found
        if bool(done.any()):
            rows = image[done] + start
            outcome = setting.outcomes(
                cache.logits[rows], cache.top1[rows], before[done], after[done]
            )
            settled.append((position, chosen[positions[done.cpu()]], outcome))
        if not bool(done.all()):
            left.append((plan, positions[~done.cpu()]))
    return left, settled


def _neuron_masking(
    setting: Setting,
    rule: ClampRule | None,
    cut: Cut,
    group: TrialGroup,
    values: dict[fx.Node, torch.Tensor],
    peak: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per neuron trial: the value before and after, whether the faulty value is the golden
    one bit for bit (None for a flip, which never is), and whether the clamp after the layer
    removes the fault (None without a clamp rule)."""
    output = values[cut.node]
    image, index = group.image.to(setting.device), group.index.to(setting.device)
    golden = output.reshape(len(output), -1)[image, index]
    before, after = setting.injector.neuron_values(group, golden, peak)
    faulty = after.to(output.dtype)
    unchanged = same_bits(golden, faulty) if group.fault.may_keep_word else None
    if rule is None:
        return before, after, unchanged, None
    # BatchNorm2d's channels (a rule without an affine map ignores them)
    channel = index // math.prod(output.shape[2:]) if output.dim() == 4 else torch.zeros_like(index)
    added = None
    if rule.addend is not None:
        residual = values[cut.externals[rule.addend]]
        added = residual.reshape(len(residual), -1)[image, index]
    return before, after, unchanged, rule.settles(channel, golden, faulty, added)


def _packed(members: list[tuple[tuple, torch.Tensor]], size: int) -> Iterator[list]:
    """Batches of at most ``size`` trials over the plans of one cut: (plan, positions) each."""
    batch: list[tuple[tuple, torch.Tensor]] = []
    room = size
    for plan, positions in members:
        while len(positions):
            batch.append((plan, positions[:room]))
            positions = positions[room:]
            room -= len(batch[-1][1])
            if room == 0:
                yield batch
                batch, room = [], size
    if batch:
        yield batch


def _evaluate(
    setting: Setting,
    pieces: list[tuple[TrialGroup, float | None]],
    cut: Cut,
    values: dict[fx.Node, torch.Tensor],
    golden_top1: torch.Tensor,
) -> list[Outcomes]:
    """One suffix forward for the trials of ``pieces`` (groups at ``cut``, each with its
    profiled peak): each piece's faults change its own rows of the cached layer output."""
    image = torch.cat([group.image for group, _ in pieces]).to(setting.device)
    layer_out = values[cut.node].index_select(0, image)
    weight = any(group.kind == "weight" for group, _ in pieces)
    layer_input = values[cut.node.args[0]].index_select(0, image) if weight else None
    changes, offset = [], 0
    for group, peak in pieces:
        rows = slice(offset, offset + len(group))
        inputs = layer_input[rows] if group.kind == "weight" else None
        changes.append(setting.injector.apply(group, layer_out[rows], inputs, peak))
        offset += len(group)
    externals = [values[node].index_select(0, image) for node in cut.externals]
    logits = cut.suffix(layer_out, *externals).float()
    outcomes, offset = [], 0
    for (group, _), (before, after) in zip(pieces, changes, strict=True):
        rows = slice(offset, offset + len(group))
        outcomes.append(setting.outcomes(logits[rows], golden_top1[image[rows]], before, after))
        offset += len(group)
    return outcomes


def _evaluate_edit(
    setting: Setting,
    group: TrialGroup,
    cut: Cut,
    values: dict[fx.Node, torch.Tensor],
    golden_top1: torch.Tensor,
) -> Outcomes:
    """The weight edited in place for one run of the edit cut's suffix per distinct fault."""

    def logits_of(images: torch.Tensor) -> torch.Tensor:
        rows = images.to(setting.device)
        return cut.suffix(*[values[node].index_select(0, rows) for node in cut.externals])

    return _each_fault(setting, group, golden_top1, logits_of)


def _neuron_calls(site: LayerSite, group: TrialGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Which call of the module each trial hits, and that call's first flat index."""
    if group.kind == "weight" or site.calls == 1:
        return torch.zeros_like(group.index), torch.zeros_like(group.index)
    sizes = torch.tensor([math.prod(s) for s in site.output_shapes])
    starts = torch.cumsum(sizes, 0) - sizes
    calls = torch.bucketize(group.index, torch.cumsum(sizes, 0), right=True)
    return calls, starts[calls]


def run_with_hooks(setting: Setting, cache: GoldenCache, group: TrialGroup) -> Outcomes:
    """Full forward per trial batch; a hook changes the layer's output per batch element."""
    site = setting.sites[group.layer]
    module = setting.model.get_submodule(site.name)
    if site.calls != 1:
        raise ConfigError(
            f"{site.name} runs {site.calls} times per forward; a model that "
            "torch.fx cannot trace supports faults only in layers run once"
        )
    peak = setting.peak(cache, group)
    results = []
    for part in torch.arange(len(group)).split(setting.batch_size):
        sub = group.subset(part)
        captured: dict[str, torch.Tensor] = {}

        def modify(_module, inputs, output, sub=sub, captured=captured):
            captured["before"], captured["after"] = setting.injector.apply(
                sub, output, inputs[0], peak
            )
            return output

        handle = module.register_forward_hook(modify)
        try:
            logits = setting.model(cache.images[sub.image].to(setting.device)).float()
        finally:
            handle.remove()
        image = sub.image.to(setting.device)
        results.append(
            setting.outcomes(logits, cache.top1[image], captured["before"], captured["after"])
        )
    return Outcomes.cat(results)


def run_weight_edits(setting: Setting, cache: GoldenCache, group: TrialGroup) -> Outcomes:
    """The weight edited in place for one full forward over the images of each distinct fault
    (where no edit cut applies: a model fx cannot trace, a weight no graph node reads)."""

    def logits_of(images: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                setting.model(cache.images[part].to(setting.device))
                for part in images.split(setting.batch_size)
            ]
        )

    return _each_fault(setting, group, cache.top1, logits_of)


def _each_fault(
    setting: Setting,
    group: TrialGroup,
    golden_top1: torch.Tensor,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
) -> Outcomes:
    """Outcomes of ``group``'s weight faults: per distinct (weight, bit), the weight edited in
    place, ``logits_of(image indices)`` for that fault's trials, the weight restored."""
    weight = setting.model.get_submodule(group.layer).weight
    before, after = setting.injector.weight_values(group)
    faults = torch.stack([group.index, group.bit], dim=1)
    distinct, which = torch.unique(faults, dim=0, return_inverse=True)
    results, order = [], []
    flat = weight.data.view(-1)
    for fault in range(len(distinct)):
        chosen = (which == fault).nonzero().flatten()
        element = int(distinct[fault, 0])
        original = flat[element].clone()
        flat[element] = after[chosen[0]]
        try:
            logits = logits_of(group.image[chosen]).float()
        finally:
            flat[element] = original
        image = group.image[chosen].to(setting.device)
        results.append(setting.outcomes(logits, golden_top1[image], before[chosen], after[chosen]))
        order.append(chosen)
    return Outcomes.cat(results).select(torch.argsort(torch.cat(order)))

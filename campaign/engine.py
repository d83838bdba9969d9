"""The batched trial engine: exact outcomes of single bit flips, many trials per forward pass.

A trial needs the network's output with one changed number, and almost all of a full forward is
wasted on it. The engine (see docs/design.md, "Engine"):

- runs the golden pass once per image chunk and caches what the suffixes need, within a memory
  budget (``cache_bytes``: the chunk of images is sized so the cache fits);
- cuts the network after each faulty layer with torch.fx: the *suffix* is every node that depends
  on the layer's output; values it needs from before the cut (residual branches) come from the
  cache;
- neuron fault: flips one element of the layer's cached output per trial and runs the suffix on
  a batch of trials (each with its own image);
- weight fault: turns ``w -> w'`` into a delta on the layer's output, ``(w' - w) * input slice``,
  in one output channel (Conv2d) or one output unit (Linear), then runs the suffix as for neurons;
- everything else is still exact, only slower: a weight that the delta rule does not cover (other
  layer types, modules called several times or never) is edited in place for one forward over its
  trials' images; a model fx cannot trace gets hooks and a full forward (``Engine.mode`` says so).

Outcomes follow docs/design.md section 3: faulty top-1, ``sdc`` (top-1 changed, or any non-finite
logit), ``non_finite``, faulty Top2Diff, and the value before and after the flip.
"""

from __future__ import annotations

import logging
import math
import operator
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.utils.fusion import fuse_conv_bn_eval

from bitstorm.errors import ConfigError
from bitstorm.metrics import top2diff
from campaign.bits import flip, format_width, int8_scale, quantize
from campaign.sites import LayerSite, activation_peaks, eval_mode, find_sites

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 2 * 2**30
DEFAULT_BATCH = 256


@dataclass(frozen=True)
class TrialGroup:
    """Trials that share kind, layer and number format; one entry per trial in each tensor.

    ``index`` is the flat index into the weight tensor (weight) or into one image's layer output
    (neuron; over all calls of a reused module, in call order); ``image`` indexes the images.
    """

    kind: str
    layer: str
    fmt: str
    index: torch.Tensor
    bit: torch.Tensor
    image: torch.Tensor

    def __post_init__(self) -> None:
        if self.kind not in ("weight", "neuron"):
            raise ConfigError(f"trial kind {self.kind!r}: pass 'weight' or 'neuron'")
        sizes = {len(self.index), len(self.bit), len(self.image)}
        if len(sizes) != 1:
            raise ConfigError(f"index, bit and image need one entry per trial; got {sizes}")
        width = format_width(self.fmt)
        if len(self.bit) and (int(self.bit.min()) < 0 or int(self.bit.max()) >= width):
            raise ConfigError(f"bits must lie in 0..{width - 1} for {self.fmt}")

    def __len__(self) -> int:
        return len(self.index)

    def subset(
        self,
        positions: torch.Tensor,
        *,
        index_offset: torch.Tensor | int = 0,
        image_offset: int = 0,
    ) -> TrialGroup:
        """The trials at ``positions``, with indices and images shifted down by the offsets."""
        return TrialGroup(
            self.kind,
            self.layer,
            self.fmt,
            self.index[positions] - index_offset,
            self.bit[positions],
            self.image[positions] - image_offset,
        )


@dataclass(frozen=True)
class Outcomes:
    """Per trial, in the order of the trials given."""

    faulty_top1: torch.Tensor  # int64; -1 where a logit is NaN
    golden_top1: torch.Tensor
    sdc: torch.Tensor
    non_finite: torch.Tensor
    top2diff: torch.Tensor  # percent; NaN where non_finite
    value_before: torch.Tensor
    value_after: torch.Tensor

    @staticmethod
    def cat(parts: Sequence[Outcomes]) -> Outcomes:
        return Outcomes(
            **{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Outcomes)}
        )

    def select(self, order: torch.Tensor) -> Outcomes:
        return Outcomes(**{f.name: getattr(self, f.name)[order] for f in fields(Outcomes)})


class _GoldenLogits:
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


@dataclass(frozen=True)
class _Cut:
    """A faulty layer's place in the graph: the call node, its suffix and what it needs."""

    node: fx.Node
    suffix: fx.GraphModule
    externals: tuple[fx.Node, ...]  # batch-valued values from before the cut, in suffix order


class Engine:
    """An evaluator bound to one model (eval mode, on ``device``).

    ``cache_bytes`` bounds the golden cache; ``batch_size`` is the number of trials per suffix
    forward; ``clamp`` replaces a flipped activation by its value clamped to the layer's profiled
    max |activation| (the paper preset's option; NaN becomes 0).
    """

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        *,
        device: str | torch.device | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        batch_size: int = DEFAULT_BATCH,
        clamp: bool = False,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.cache_bytes = cache_bytes
        self.batch_size = batch_size
        self.clamp = clamp
        self.sites = {
            s.name: s for s in find_sites(self.model, example[:1].to(self.device), types="weighted")
        }
        self._cuts: dict[tuple[str, int], _Cut] = {}
        self._folded: dict[tuple[str, str], nn.Conv2d] = {}  # shared by every suffix
        self._golden_modules: dict[tuple[fx.Node, ...], fx.GraphModule] = {}
        self._bytes_per_image: dict[tuple[fx.Node, ...], int] = {}
        self._peaks: dict[str, float] = {}
        self._golden_top1: tuple[tuple, torch.Tensor] | None = None
        # Golden values kept between calls (see warm): (images key, node -> value, top-1).
        self._resident: tuple[tuple, dict[fx.Node, torch.Tensor], torch.Tensor] | None = None
        try:
            self.graph = fx.symbolic_trace(self.model)
            self.mode = "suffix"
        except Exception as error:
            log.warning(
                "torch.fx cannot trace %s (%s): falling back to hooks and a full forward "
                "per trial batch, exact but slower",
                type(model).__name__,
                error,
            )
            self.graph = None
            self.mode = "hooks"
        if self.graph is not None:
            self._calls: dict[str, list[fx.Node]] = defaultdict(list)
            for node in self.graph.graph.nodes:
                if node.op == "call_module":
                    self._calls[node.target].append(node)
            # Only the image input carries a batch; other inputs (timm's attn_mask=None...) are
            # constants at their defaults.
            self._input_dependent = _reachable_from(
                [next(n for n in self.graph.graph.nodes if n.op == "placeholder")]
            )
            with torch.no_grad():  # records which nodes produce tensors
                ShapeProp(self.graph).propagate(example[:2].to(self.device))

    # ----------------------------------------------------------------------------- public API

    def profile(self, images: torch.Tensor, layers: Sequence[str]) -> dict[str, float]:
        """max |output| per layer over ``images`` (all calls): int8 neuron scales and clamps."""
        if any(name not in self._peaks for name in layers):
            # One forward profiles every layer: campaigns ask one layer per shard, and a
            # forward per layer would repeat the whole golden pass for each.
            todo = [n for n in dict.fromkeys([*layers, *self.sites]) if n not in self._peaks]
            self._peaks.update(activation_peaks(self.model, images, todo, self.batch_size))
        return {name: self._peaks[name] for name in layers}

    def golden(self, images: torch.Tensor) -> torch.Tensor:
        """Fault-free logits of ``images``."""
        with torch.no_grad():
            return torch.cat(
                [
                    self.model(chunk.to(self.device)).float()
                    for chunk in images.split(self.batch_size)
                ]
            )

    def golden_top1(self, images: torch.Tensor) -> torch.Tensor:
        """Fault-free top-1 of ``images``, remembered for the last image set seen."""
        key = _images_key(images)
        if self._golden_top1 is None or self._golden_top1[0] != key:
            self._golden_top1 = (key, self.golden(images).argmax(dim=1))
        return self._golden_top1[1]

    def warm(self, images: torch.Tensor, layers: Sequence[str], kinds: Sequence[str]) -> bool:
        """Run the golden pass once for every cut of ``layers`` and keep the values between
        calls, if they fit in ``cache_bytes`` for all of ``images``; later calls on the same
        images then skip the golden pass. Returns whether the values are resident."""
        if self.mode != "suffix":
            return False
        cuts = [
            self._cut(layer, call)
            for layer in layers
            for call in range(max(1, self.sites[layer].calls))
            if layer in self._calls and call < len(self._calls[layer])
        ]
        wanted = _cached_nodes((cut, "weight" in kinds) for cut in cuts)
        if self._cache_cost(images, wanted) * len(images) > self.cache_bytes:
            return False
        with torch.no_grad(), eval_mode(self.model):
            output, *values = self._golden_module(wanted)(images.to(self.device))
        self._resident = (
            _images_key(images),
            dict(zip(wanted, values, strict=True)),
            output.float().argmax(dim=1),
        )
        return True

    def run(self, images: torch.Tensor, group: TrialGroup) -> Outcomes:
        """Outcomes of every trial in ``group`` (each on its own image of ``images``)."""
        return self.run_many(images, [group])[0]

    def run_many(self, images: torch.Tensor, groups: Sequence[TrialGroup]) -> list[Outcomes]:
        """Outcomes per group. One golden pass per image chunk serves every group."""
        for group in groups:
            self._validate(images, group)
        results: list[Outcomes | None] = [None] * len(groups)
        suffix_work = []
        with torch.no_grad(), eval_mode(self.model):
            for position, group in enumerate(groups):
                site = self.sites[group.layer]
                if len(group) == 0:
                    results[position] = _empty_outcomes()
                elif group.kind == "weight" and not self._weight_delta_applies(site):
                    results[position] = self._run_weight_edits(images, group)
                elif self.mode == "hooks":
                    results[position] = self._run_with_hooks(images, group)
                else:
                    suffix_work.append((position, group))
            if suffix_work:
                for position, outcome in self._run_suffixes(images, suffix_work):
                    results[position] = outcome
        return results  # type: ignore[return-value]

    def sweep_layer(
        self,
        images: torch.Tensor,
        layer: str,
        fmt: str,
        bits: Sequence[int] | None = None,
        weights_per_chunk: int = 64,
    ) -> Iterator[tuple[TrialGroup, Outcomes]]:
        """Every weight x bit x image of ``layer``, exhaustively, in chunks of weights.

        Where the layer is a Linear whose output is the model's output, as is or times a constant
        (a plain final classifier, or a text head's class Linear and its logit scale), no forward
        runs at all: one weight changes one logit by ``scale * (w' - w) * x_i``, and the outcome
        follows from the golden logits. Other layers go through
        the suffix path with large batches.
        """
        site = self.sites[layer]
        bit_list = torch.tensor(list(range(format_width(fmt)) if bits is None else bits))
        images_n = len(images)
        logit_scale = self._final_linear(layer)
        analytic = logit_scale is not None
        if analytic:
            with torch.no_grad(), eval_mode(self.model):
                node = self._calls[layer][0]
                output, layer_input = self._golden_module((node.args[0],))(images.to(self.device))
            golden = _GoldenLogits(output.float(), layer_input.reshape(images_n, -1), logit_scale)
        for start in range(0, site.weight_elements, weights_per_chunk):
            weights = torch.arange(start, min(start + weights_per_chunk, site.weight_elements))
            per_weight = len(bit_list) * images_n
            group = TrialGroup(
                "weight",
                layer,
                fmt,
                weights.repeat_interleave(per_weight),
                bit_list.repeat_interleave(images_n).repeat(len(weights)),
                torch.arange(images_n).repeat(len(weights) * len(bit_list)),
            )
            if analytic:
                yield group, self._analytic_final_linear(group, golden, len(bit_list))
            else:
                yield group, self.run(images, group)

    # ------------------------------------------------------------------------------ internals

    def _final_linear(self, layer: str) -> float | None:
        """For a Linear, run once, whose output becomes the logits unchanged or times a constant
        scalar (the text head's ``* exp(logit_scale)``): that scalar. Otherwise None."""
        if self.mode != "suffix" or not isinstance(self.model.get_submodule(layer), nn.Linear):
            return None
        if self.sites[layer].calls != 1:
            return None
        cut = self._cut(layer, 0)
        if cut.externals:
            return None
        graph = cut.suffix.graph
        placeholder = next(iter(graph.nodes))
        value = placeholder  # follows the cut's value through the suffix
        for node in graph.nodes:
            if node is placeholder or node.op == "output" or value not in node.all_input_nodes:
                continue  # constants (the logit scale) need no check: they do not see the cut
            others = [a for a in node.args if a is not value]
            if (
                node.target not in (operator.mul, torch.mul, "mul")
                or len(others) != 1
                or node.kwargs
            ):
                return None
            value = node
        output = next(n for n in graph.nodes if n.op == "output")
        if output.args[0] is not value:
            return None
        with torch.no_grad():  # the scalar: the suffix applied to a one
            probe = torch.ones(1, self.model.get_submodule(layer).out_features, device=self.device)
            scale = cut.suffix(probe)
        if not torch.allclose(scale, scale.flatten()[0].expand_as(scale)):
            return None
        return float(scale.flatten()[0])

    def _analytic_final_linear(
        self, group: TrialGroup, golden: _GoldenLogits, n_bits: int
    ) -> Outcomes:
        weight = self.model.get_submodule(group.layer).weight.detach()
        in_features = weight.shape[1]
        n_images = golden.logits.shape[0]
        index = group.index.view(-1, n_bits, n_images)[:, 0, 0].to(self.device)  # [K]
        bits = group.bit.view(-1, n_bits, n_images)[0, :, 0].to(self.device)  # [B]
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
        top1 = torch.where(
            value > m1, column, torch.where(value == m1, torch.minimum(column, i1), i1)
        )
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

    def _validate(self, images: torch.Tensor, group: TrialGroup) -> None:
        if group.layer not in self.sites:
            raise ConfigError(f"no injectable layer {group.layer!r}; see campaign.sites")
        site = self.sites[group.layer]
        if group.kind == "neuron" and not site.output_shapes:
            raise ConfigError(f"{group.layer} has no neuron sites: {site.neuron_note}")
        if len(group) == 0:
            return
        if group.image.min() < 0 or group.image.max() >= len(images):
            raise ConfigError(f"trial image indices must lie in 0..{len(images) - 1}")
        limit = site.weight_elements if group.kind == "weight" else site.neuron_elements
        if group.index.min() < 0 or group.index.max() >= limit:
            raise ConfigError(f"{group.kind} index outside the {limit:,} sites of {site.name}")

    def _weight_delta_applies(self, site: LayerSite) -> bool:
        module = self.model.get_submodule(site.name)
        supported = isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d)
            and module.padding_mode == "zeros"
            and isinstance(module.padding, tuple)
        )
        return supported and site.calls == 1

    def _weight_values(self, group: TrialGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored weight, flipped weight) per trial; int8 uses the per-tensor scale."""
        weight = self.model.get_submodule(group.layer).weight.detach()
        scale = int8_scale(weight) if group.fmt == "int8" else None
        original = weight.reshape(-1)[group.index.to(self.device)]
        return original, flip(original, group.bit.to(self.device), group.fmt, scale)

    def _neuron_scale(self, images: torch.Tensor, group: TrialGroup) -> float | None:
        if group.fmt != "int8":
            return None
        return self.profile(images, [group.layer])[group.layer] / 127

    def _faulty_neurons(
        self, images: torch.Tensor, group: TrialGroup, golden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(value before, flipped value) of the selected elements ``golden``; the flipped value
        is clamped to the layer's profiled range when the engine clamps."""
        bits = group.bit.to(golden.device)
        scale = self._neuron_scale(images, group)
        after = flip(golden, bits, group.fmt, scale)
        if self.clamp:
            peak = self.profile(images, [group.layer])[group.layer]
            after = torch.nan_to_num(after, nan=0.0, posinf=peak, neginf=-peak).clamp(-peak, peak)
        return quantize(golden, group.fmt, scale), after

    def _apply_faults(
        self,
        images: torch.Tensor,
        group: TrialGroup,
        output: torch.Tensor,
        layer_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Change ``output`` (one row per trial) in place by each trial's fault; return the
        values before and after the flip."""
        if group.kind == "neuron":
            flat = output.view(len(group), -1)
            rows = torch.arange(len(group), device=output.device)
            index = group.index.to(output.device)
            before, after = self._faulty_neurons(images, group, flat[rows, index])
            flat[rows, index] = after.to(flat.dtype)
            return before, after
        before, after = self._weight_values(group)
        _add_weight_delta(
            self.model.get_submodule(group.layer),
            output,
            layer_input,
            group.index.to(output.device),
            after - before,
        )
        return before, after

    # -- fx suffix path -------------------------------------------------------------------

    def _cut(self, layer: str, call: int) -> _Cut:
        key = (layer, call)
        if key not in self._cuts:
            node = self._calls[layer][call]
            suffix, externals = _suffix_module(self.graph, node, self._input_dependent)
            self._cuts[key] = _Cut(node, _fold_batchnorm(suffix, self._folded), externals)
        return self._cuts[key]

    def _run_suffixes(
        self, images: torch.Tensor, work: list[tuple[int, TrialGroup]]
    ) -> list[tuple[int, Outcomes]]:
        """All suffix-path groups: image chunk by image chunk (one golden pass each, the cache
        bounded by ``cache_bytes``), then trial batch by trial batch."""
        plans = []  # (position, trial positions in group, sub-group, cut)
        for position, group in work:
            calls, offsets = self._neuron_calls(self.sites[group.layer], group)
            for call in calls.unique().tolist():
                chosen = (calls == call).nonzero().flatten()
                sub = group.subset(chosen, index_offset=offsets[chosen])
                plans.append((position, chosen, sub, self._cut(group.layer, call)))
        wanted = _cached_nodes((cut, sub.kind == "weight") for _, _, sub, cut in plans)
        resident = self._resident
        if (
            resident is not None
            and resident[0] == _images_key(images)
            and all(node in resident[1] for node in wanted)
        ):
            chunk = len(images)
        else:
            resident = None
            chunk = max(1, min(len(images), self.cache_bytes // self._cache_cost(images, wanted)))
        parts: dict[int, list[tuple[torch.Tensor, Outcomes]]] = defaultdict(list)
        for start in range(0, len(images), chunk):
            if resident is not None:
                cache, top1 = resident[1], resident[2]
            else:
                output, *values = self._golden_module(wanted)(
                    images[start : start + chunk].to(self.device)
                )
                cache = dict(zip(wanted, values, strict=True))
                top1 = output.float().argmax(dim=1)
            for position, chosen, sub, cut in plans:
                in_chunk = ((sub.image >= start) & (sub.image < start + chunk)).nonzero().flatten()
                if len(in_chunk) == 0:
                    continue
                for part in in_chunk.split(self.batch_size):
                    batch = sub.subset(part, image_offset=start)
                    parts[position].append(
                        (chosen[part], self._evaluate(images, batch, cut, cache, top1))
                    )
        results = []
        for position, pieces in parts.items():
            order = torch.cat([p[0] for p in pieces])
            results.append(
                (position, Outcomes.cat([p[1] for p in pieces]).select(torch.argsort(order)))
            )
        return results

    def _neuron_calls(
        self, site: LayerSite, group: TrialGroup
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Which call of the module each trial hits, and that call's first flat index."""
        if group.kind == "weight" or site.calls == 1:
            return torch.zeros_like(group.index), torch.zeros_like(group.index)
        sizes = torch.tensor([math.prod(s) for s in site.output_shapes])
        starts = torch.cumsum(sizes, 0) - sizes
        calls = torch.bucketize(group.index, torch.cumsum(sizes, 0), right=True)
        return calls, starts[calls]

    def _golden_module(self, nodes: tuple[fx.Node, ...]) -> fx.GraphModule:
        if nodes not in self._golden_modules:
            self._golden_modules[nodes] = _golden_module(self.graph, nodes)
        return self._golden_modules[nodes]

    def _cache_cost(self, images: torch.Tensor, nodes: tuple[fx.Node, ...]) -> int:
        """Bytes the golden cache holds per image for ``nodes`` (measured on one image)."""
        if nodes not in self._bytes_per_image:
            _, *values = self._golden_module(nodes)(images[:1].to(self.device))
            self._bytes_per_image[nodes] = max(1, sum(v.element_size() * v.numel() for v in values))
        return self._bytes_per_image[nodes]

    def _evaluate(
        self,
        images: torch.Tensor,
        group: TrialGroup,
        cut: _Cut,
        cache: dict[fx.Node, torch.Tensor],
        golden_top1: torch.Tensor,
    ) -> Outcomes:
        image = group.image.to(self.device)
        layer_out = cache[cut.node].index_select(0, image)
        layer_input = (
            cache[cut.node.args[0]].index_select(0, image) if group.kind == "weight" else None
        )
        before, after = self._apply_faults(images, group, layer_out, layer_input)
        externals = [cache[node].index_select(0, image) for node in cut.externals]
        logits = cut.suffix(layer_out, *externals).float()
        return _outcomes(logits, golden_top1[image], before, after)

    # -- exact fallbacks ----------------------------------------------------------------

    def _run_with_hooks(self, images: torch.Tensor, group: TrialGroup) -> Outcomes:
        """Full forward per trial batch; a hook changes the layer's output per batch element."""
        site = self.sites[group.layer]
        module = self.model.get_submodule(site.name)
        golden_top1 = self.golden_top1(images)
        if site.calls != 1:
            raise ConfigError(
                f"{site.name} runs {site.calls} times per forward; a model that "
                "torch.fx cannot trace supports faults only in layers run once"
            )
        results = []
        for part in torch.arange(len(group)).split(self.batch_size):
            sub = group.subset(part)
            captured: dict[str, torch.Tensor] = {}

            def modify(_module, inputs, output, sub=sub, captured=captured):
                captured["before"], captured["after"] = self._apply_faults(
                    images, sub, output, inputs[0]
                )
                return output

            handle = module.register_forward_hook(modify)
            try:
                logits = self.model(images[sub.image].to(self.device)).float()
            finally:
                handle.remove()
            results.append(
                _outcomes(
                    logits,
                    golden_top1[sub.image.to(self.device)],
                    captured["before"],
                    captured["after"],
                )
            )
        return Outcomes.cat(results)

    def _run_weight_edits(self, images: torch.Tensor, group: TrialGroup) -> Outcomes:
        """The weight edited in place for one forward over the images of each distinct fault."""
        site = self.sites[group.layer]
        weight = self.model.get_submodule(site.name).weight
        before, after = self._weight_values(group)
        golden_top1 = self.golden_top1(images)
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
                logits = torch.cat(
                    [
                        self.model(images[part].to(self.device)).float()
                        for part in group.image[chosen].split(self.batch_size)
                    ]
                )
            finally:
                flat[element] = original
            img = group.image[chosen].to(self.device)
            results.append(_outcomes(logits, golden_top1[img], before[chosen], after[chosen]))
            order.append(chosen)
        return Outcomes.cat(results).select(torch.argsort(torch.cat(order)))


def _images_key(images: torch.Tensor) -> tuple:
    """Identity of an image tensor for caches: its storage, shape, dtype and version."""
    return (images.data_ptr(), tuple(images.shape), images.dtype, images._version)


def _add_weight_delta(
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


def _outcomes(
    logits: torch.Tensor, golden_top1: torch.Tensor, before: torch.Tensor, after: torch.Tensor
) -> Outcomes:
    non_finite = ~torch.isfinite(logits).all(dim=1)
    has_nan = logits.isnan().any(dim=1)
    faulty = torch.where(has_nan, -1, logits.nan_to_num(nan=-math.inf).argmax(dim=1))
    return Outcomes(
        faulty_top1=faulty.cpu(),
        golden_top1=golden_top1.cpu(),
        sdc=(non_finite | (faulty != golden_top1)).cpu(),
        non_finite=non_finite.cpu(),
        top2diff=top2diff(logits).cpu(),
        value_before=before.float().cpu(),
        value_after=after.float().cpu(),
    )


def _empty_outcomes() -> Outcomes:
    empty_i, empty_b, empty_f = (
        torch.empty(0, dtype=t) for t in (torch.long, torch.bool, torch.float32)
    )
    return Outcomes(empty_i, empty_i, empty_b, empty_b, empty_f, empty_f, empty_f)


def _reachable_from(starts: Sequence[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.users)
    return seen


def _suffix_module(
    gm: fx.GraphModule, cut: fx.Node, input_dependent: set[fx.Node]
) -> tuple[fx.GraphModule, tuple[fx.Node, ...]]:
    """A GraphModule computing the logits from ``cut``'s value and the *externals*: tensors from
    before the cut, with a batch dimension, that the nodes depending on ``cut`` use (cached per
    image). Constants (parameters, expressions of them) and non-tensor values from before the
    cut (``x.shape[0]`` and friends, which must follow the trial batch) are recomputed inside."""
    dependent = _reachable_from([cut])
    copied: set[fx.Node] = {n for n in dependent if n is not cut}
    externals: set[fx.Node] = set()
    stack = [arg for n in copied for arg in n.all_input_nodes]
    while stack:
        node = stack.pop()
        if node is cut or node in copied or node in externals or node.op == "placeholder":
            continue
        if node in input_dependent and _is_tensor(node):
            externals.add(node)
        else:
            copied.add(node)
            stack.extend(node.all_input_nodes)
    ordered_externals = tuple(n for n in gm.graph.nodes if n in externals)
    graph = fx.Graph()
    env: dict[fx.Node, object] = {cut: graph.placeholder("cut")}
    for i, node in enumerate(ordered_externals):
        env[node] = graph.placeholder(f"external_{i}")
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node not in env:  # optional inputs: their defaults
            env[node] = node.args[0] if node.args else None
        elif node in copied:
            if node.op == "output":
                graph.output(fx.map_arg(node.args[0], env.__getitem__))
            else:
                env[node] = graph.node_copy(node, env.__getitem__)
    graph.lint()
    return fx.GraphModule(gm, graph), ordered_externals


def _fold_batchnorm(
    suffix: fx.GraphModule, folded: dict[tuple[str, str], nn.Conv2d]
) -> fx.GraphModule:
    """Fold each eval-mode BatchNorm2d into the Conv2d before it, inside the suffix only.

    The cut value itself (a placeholder) is never folded into, so fault sites stay where they
    are; folded weights change results only by rounding. New modules are added to the suffix;
    the model's own modules are not touched. ``folded`` shares each folded conv between suffixes.
    """
    modules = dict(suffix.named_modules())
    for node in list(suffix.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        conv_node = node.args[0]
        if (
            not isinstance(conv_node, fx.Node)
            or conv_node.op != "call_module"
            or not isinstance(modules.get(conv_node.target), nn.Conv2d)
            or len(conv_node.users) != 1
            or len(node.args) != 1
            or node.kwargs
        ):
            continue
        batchnorm = modules[node.target]
        if not batchnorm.track_running_stats or batchnorm.training:
            continue
        key = (conv_node.target, node.target)
        if key not in folded:
            folded[key] = fuse_conv_bn_eval(modules[conv_node.target], batchnorm)
        name = "folded_" + conv_node.target.replace(".", "_")
        suffix.add_submodule(name, folded[key])
        conv_node.target = name
        node.replace_all_uses_with(conv_node)
        suffix.graph.erase_node(node)
    suffix.recompile()
    return suffix


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def _cached_nodes(cuts: Iterable[tuple[_Cut, bool]]) -> tuple[fx.Node, ...]:
    """The golden values the suffixes of ``cuts`` need, each once: the cut layer's output, the
    values crossing the cut, and for weight faults (the flag) the layer's input."""
    return tuple(
        dict.fromkeys(
            node
            for cut, weight in cuts
            for node in (cut.node, *cut.externals, *((cut.node.args[0],) if weight else ()))
        )
    )


def _golden_module(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> fx.GraphModule:
    """``gm`` returning ``(logits, *values of nodes)``. Each value is copied the moment it is
    computed: a later in-place op (VGG's ``ReLU(inplace=True)`` right after a Linear) would
    otherwise change the cached value behind the cache's back."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    captured: dict[fx.Node, fx.Node] = {}
    wanted = set(nodes)
    for node in gm.graph.nodes:
        if node.op == "output":
            outputs = [captured[n] for n in nodes]
            graph.output((fx.map_arg(node.args[0], env.__getitem__), *outputs))
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
            if node in wanted:
                captured[node] = graph.call_method("clone", (env[node],))
    return fx.GraphModule(gm, graph)

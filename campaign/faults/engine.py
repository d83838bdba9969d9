"""The batched trial engine: exact outcomes of single bit flips, many trials per forward pass.

    engine = Engine(model, images[:2])
    cache = engine.golden(images, layers, kinds)  # the fault-free pass, held by the caller
    outcomes = engine.run(cache, group)

The engine owns its own copy of the model (in eval mode, on its device), traced once with
torch.fx; the caller's model is never moved, switched to eval or edited. It picks, per group,
the fastest exact evaluator (campaign.faults.evaluators): the suffix after the faulty layer,
a weight edited in place (and only the graph from where it meets the images run again), or
hooks for models fx cannot trace (``Engine.mode``) and layers with no node of their own
(``Engine.evaluator`` says which, per kind and layer). A final Linear needs no forward at all
(campaign.faults.analytic, ``sweep_layer``).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from bitstorm.errors import ConfigError
from bitstorm.logs import get_logger
from campaign.faults.analytic import (
    GoldenLogits,
    LastLayerRules,
    final_linear_outcomes,
    final_linear_scale,
    final_logit_outcomes,
)
from campaign.faults.bits import BIT_FLIP, FaultModel
from campaign.faults.evaluators import Setting, run_suffixes, run_weight_edits, run_with_hooks
from campaign.faults.golden import GoldenCache
from campaign.faults.graph import Cut, TracedModel, cached_nodes
from campaign.faults.inject import Injector, RangeRestriction, weight_delta_applies
from campaign.faults.sites import activation_peaks, find_sites
from campaign.faults.trials import KINDS, Outcomes, TrialGroup

log = get_logger(__name__)

DEFAULT_CACHE_BYTES = 2 * 2**30
DEFAULT_BATCH = 256


class Engine:
    """An evaluator bound to one model.

    ``example``: one or more input images (their shape is what matters). ``cache_bytes`` bounds
    the golden values a cache keeps and a run holds at once; ``batch_size`` is the number of
    trials per forward. ``restriction``: goldeneye's range restriction of the faulty layer
    output, with bounds the caller profiled (campaign.faults.inject.RangeRestriction);
    ``non_finite_sdc``: the SDC rule for non-finite logits (campaign.faults.trials.is_sdc).
    ``settle_masked``: neuron faults the clamp after their layer removes take the golden
    outcome without a forward (campaign.faults.masking; exact, so off only to measure it);
    ``settled`` counts them.
    """

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        *,
        device: str | torch.device | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        batch_size: int = DEFAULT_BATCH,
        restriction: RangeRestriction | None = None,
        non_finite_sdc: bool = True,
        settle_masked: bool = True,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = copy.deepcopy(model).to(self.device).eval()
        self.model.requires_grad_(False)
        self.cache_bytes = cache_bytes
        self.batch_size = batch_size
        space = find_sites(self.model, example[:2].to(self.device), types="weighted")
        self.sites = {site.name: site for site in space}
        self._setting = Setting(
            self.model,
            Injector(self.model, restriction),
            self.sites,
            self._peak,
            self.device,
            batch_size,
            cache_bytes,
            non_finite_sdc,
            settle_masked,
        )
        self.traced: TracedModel | None
        layers = [self.model.get_submodule(name) for name in self.sites]
        try:
            self.traced = TracedModel(self.model, example[:2].to(self.device), layers)
            self.mode = "suffix"
        except Exception as error:
            log.warning(
                "torch.fx cannot trace %s (%s): falling back to hooks and a full forward "
                "per trial batch, exact but slower",
                type(model).__name__,
                error,
            )
            self.traced = None
            self.mode = "hooks"

    @property
    def restriction(self) -> RangeRestriction | None:
        return self._setting.injector.restriction

    @property
    def settled(self) -> Counter[str]:
        """Trials settled without a forward so far, per technique (campaign.faults.masking)."""
        return self._setting.settled

    # ----------------------------------------------------------------------------- public API

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Fault-free logits of ``images``, ``batch_size`` images per forward."""
        with torch.no_grad():
            return torch.cat(
                [
                    self.model(chunk.to(self.device)).float()
                    for chunk in images.split(self.batch_size)
                ]
            )

    def golden(
        self,
        images: torch.Tensor,
        layers: Sequence[str] = (),
        kinds: Sequence[str] = KINDS,
    ) -> GoldenCache:
        """The golden cache of ``images``: their fault-free top-1, and the values the suffixes
        of ``layers`` need for trials of ``kinds``, kept for every image when they fit in
        ``cache_bytes`` (otherwise each run recomputes them chunk by chunk)."""
        unknown = [layer for layer in layers if layer not in self.sites]
        if unknown:
            raise ConfigError(f"no injectable layer {unknown[0]!r}; see campaign.faults.sites")
        cache = GoldenCache(images, self.logits(images))
        cuts = [
            self.traced.cut(layer, call)
            for layer in layers
            if self._has_cuts(layer)
            for call in range(self.sites[layer].calls)
        ]
        if "weight" in kinds:
            cuts += [cut for cut in map(self._edit_cut, layers) if cut is not None]
        if not cuts:
            return cache
        wanted = cached_nodes((cut, "weight" in kinds) for cut in cuts)
        per_image = self.traced.bytes_per_image(images[:1].to(self.device), wanted)
        if per_image * len(images) <= self.cache_bytes:
            with torch.no_grad():
                _, *values = self.traced.golden_module(wanted)(images.to(self.device))
            cache.values.update(zip(wanted, values, strict=True))
        return cache

    def profile(self, cache: GoldenCache, layers: Sequence[str]) -> dict[str, float]:
        """max |output| per layer over the cache's images (all calls): int8 neuron scales.
        One forward profiles every layer, and the cache keeps the result."""
        if any(name not in cache.peaks for name in layers):
            todo = [n for n in dict.fromkeys([*layers, *self.sites]) if n not in cache.peaks]
            cache.peaks.update(activation_peaks(self.model, cache.images, todo, self.batch_size))
        return {name: cache.peaks[name] for name in layers}

    def run(self, cache: GoldenCache, group: TrialGroup) -> Outcomes:
        """Outcomes of every trial in ``group`` (each on its own image of the cache)."""
        return self.run_many(cache, [group])[0]

    def run_many(self, cache: GoldenCache, groups: Sequence[TrialGroup]) -> list[Outcomes]:
        """Outcomes per group. One golden pass per image chunk serves every suffix group."""
        for group in groups:
            self._validate(cache, group)
        results: list[Outcomes | None] = [None] * len(groups)
        suffix_work = []
        with torch.no_grad():
            for position, group in enumerate(groups):
                evaluator = self.evaluator(group.kind, group.layer)
                if len(group) == 0:
                    results[position] = Outcomes.empty()
                elif evaluator == "weight edit" and self._edit_cut(group.layer) is None:
                    results[position] = run_weight_edits(self._setting, cache, group)
                elif evaluator == "hooks":
                    results[position] = run_with_hooks(self._setting, cache, group)
                else:
                    suffix_work.append((position, group))
            if suffix_work:
                for position, outcome in run_suffixes(
                    self._setting, self.traced, cache, suffix_work
                ):
                    results[position] = outcome
        return results  # type: ignore[return-value]

    def evaluator(self, kind: str, layer: str) -> str:
        """How ``run`` evaluates faults of ``kind`` in ``layer`` (campaign.faults.evaluators):
        ``"suffix"``, ``"weight edit"`` (a weight the delta rule does not cover: other layer
        types, subclasses with their own forward, modules run several times or never) or
        ``"hooks"`` (a model fx cannot trace, or a layer without a node of its own in the
        traced graph, such as one inside a torch.nn module torch.fx keeps whole)."""
        site = self.sites[layer]
        if kind == "weight" and not weight_delta_applies(
            self.model.get_submodule(layer), site.calls
        ):
            return "weight edit"
        return "suffix" if self._has_cuts(layer) else "hooks"

    def sweep_layer(
        self,
        cache: GoldenCache,
        layer: str,
        fmt: str,
        bits: Sequence[int] | None = None,
        kind: str = "weight",
        sites_per_chunk: int = 64,
        sites: range | None = None,
        fault: FaultModel = BIT_FLIP,
    ) -> Iterator[tuple[TrialGroup, Outcomes]]:
        """Every site (of ``sites``; default all) x bit (default: every bit ``fault`` can start
        at) x image of ``layer`` for faults of ``kind``, exhaustively, in chunks of sites
        (weights, or output elements per image), nested (site, bit, image).

        Where the layer is a Linear whose output is the model's output, as is or times a constant
        (a plain final classifier, or a text head's class Linear and its logit scale), no forward
        runs at all (campaign.faults.analytic). Other layers go through ``run``.
        """
        site = self.sites[layer]
        empty = torch.zeros(0, dtype=torch.long)
        self._validate(cache, TrialGroup(kind, layer, fmt, empty, empty, empty, fault))
        count = site.weight_elements if kind == "weight" else site.neuron_elements
        sites = range(count) if sites is None else sites
        bit_list = torch.tensor(list(fault.bits(fmt) if bits is None else bits))
        n_images = len(cache)
        golden = self._golden_logits(cache, layer)
        rules = LastLayerRules(self.restriction, self._setting.non_finite_sdc)
        for start in range(sites.start, sites.stop, sites_per_chunk):
            chosen = torch.arange(start, min(start + sites_per_chunk, sites.stop))
            per_site = len(bit_list) * n_images
            group = TrialGroup(
                kind,
                layer,
                fmt,
                chosen.repeat_interleave(per_site),
                bit_list.repeat_interleave(n_images).repeat(len(chosen)),
                torch.arange(n_images).repeat(len(chosen) * len(bit_list)),
                fault,
            )
            if golden is None:
                yield group, self.run(cache, group)
            elif kind == "weight":
                weight = self.model.get_submodule(layer).weight.detach()
                yield group, final_linear_outcomes(weight, group, golden, len(bit_list), rules)
            else:
                peak = self._peak(cache, group)
                yield group, final_logit_outcomes(group, golden, len(bit_list), peak, rules)

    def analytic(self, layer: str) -> bool:
        """Whether ``sweep_layer`` covers ``layer`` without a forward (a final Linear)."""
        return self._final_scale(layer) is not None

    # ------------------------------------------------------------------------------ internals

    def _final_scale(self, layer: str) -> float | None:
        if self.traced is None:
            return None
        return final_linear_scale(self.traced, self.model, layer)

    def _golden_logits(self, cache: GoldenCache, layer: str) -> GoldenLogits | None:
        """The final Linear's golden output and input over the cache's images, where the
        analytic path covers ``layer``."""
        scale = self._final_scale(layer)
        if scale is None:
            return None
        node = self.traced.calls[layer][0]
        with torch.no_grad():
            outputs = [
                self.traced.golden_module((node, node.args[0]))(chunk.to(self.device))[1:]
                for chunk in cache.images.split(self.batch_size)
            ]
        output = torch.cat([o for o, _ in outputs])
        layer_input = torch.cat([i for _, i in outputs]).reshape(len(cache), -1)
        return GoldenLogits(output, layer_input, scale)

    def _has_cuts(self, layer: str) -> bool:
        """Whether every call of ``layer`` is a node of the traced graph (so has a suffix)."""
        calls = self.sites[layer].calls
        return (
            self.traced is not None and calls > 0 and len(self.traced.calls.get(layer, ())) == calls
        )

    def _edit_cut(self, layer: str) -> Cut | None:
        """For a weight the engine edits in place: the part of the graph from its first reader
        on (None without a traced graph, or where no node reads it)."""
        if self.traced is None or self.evaluator("weight", layer) != "weight edit":
            return None
        return self.traced.edit_cut(layer, self.model.get_submodule(layer).weight)

    def _peak(self, cache: GoldenCache, group: TrialGroup) -> float | None:
        if not self._setting.injector.needs_peak(group):
            return None
        return self.profile(cache, [group.layer])[group.layer]

    def _validate(self, cache: GoldenCache, group: TrialGroup) -> None:
        if group.layer not in self.sites:
            raise ConfigError(f"no injectable layer {group.layer!r}; see campaign.faults.sites")
        site = self.sites[group.layer]
        if group.kind == "neuron" and not site.output_shapes:
            raise ConfigError(f"{group.layer} has no neuron sites: {site.neuron_note}")
        if (
            group.kind == "weight"
            and self.restriction is not None
            and self.evaluator("weight", group.layer) == "weight edit"
        ):
            raise ConfigError(
                f"{group.layer}: range restriction of weight faults restricts the outputs a "
                "faulty weight changes, which needs a Conv2d or Linear run once per forward; "
                "exclude this layer, or run its weight faults without range restriction"
            )
        if len(group) == 0:
            return
        if group.image.min() < 0 or group.image.max() >= len(cache):
            raise ConfigError(f"trial image indices must lie in 0..{len(cache) - 1}")
        limit = site.weight_elements if group.kind == "weight" else site.neuron_elements
        if group.index.min() < 0 or group.index.max() >= limit:
            raise ConfigError(f"{group.kind} index outside the {limit:,} sites of {site.name}")

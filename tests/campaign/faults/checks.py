"""Trials through the engine and, wherever it can address them, through the pytorchfi reference:
the comparison the model tests (test_models.py) and the zoo (test_zoo.py) share.

Every trial is applied to every image of the cache (one engine trial per image), so that one
reference forward per trial covers all its images.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from campaign.faults.engine import Engine
from campaign.faults.golden import GoldenCache
from campaign.faults.reference import Trial, reference_logits
from campaign.faults.sites import LayerSite
from campaign.faults.trials import Outcomes, TrialGroup

from .test_engine import Disagreement


def reference_applies(site: LayerSite, trial: Trial) -> bool:
    """Whether pytorchfi can address ``trial`` faithfully (campaign.faults.reference): weights of
    at most four dimensions; outputs of at most four dimensions of a layer run exactly once."""
    if trial.kind == "weight":
        return len(site.weight_shape) <= 4
    return site.calls == 1 and len(site.output_shapes[0]) <= 3


@dataclass
class Checked:
    """What a set of trials gave: outcomes per trial (one entry per image), the trials the
    reference checked and those it cannot address, and every disagreement."""

    outcomes: dict[Trial, Outcomes] = field(default_factory=dict)
    compared: list[Trial] = field(default_factory=list)
    unchecked: list[Trial] = field(default_factory=list)
    disagreements: list[Disagreement] = field(default_factory=list)


def run_trials(engine: Engine, cache: GoldenCache, trials: Sequence[Trial]) -> dict:
    """Engine outcomes per trial, every trial on every image of ``cache``; one group per
    (kind, layer, format), all through one ``run_many``."""
    n_images = len(cache)
    grouped: dict[tuple[str, str, str], list[Trial]] = defaultdict(list)
    for trial in trials:
        grouped[(trial.kind, trial.layer, trial.fmt)].append(trial)
    groups = [
        TrialGroup(
            kind,
            layer,
            fmt,
            torch.tensor([t.index for t in members]).repeat_interleave(n_images),
            torch.tensor([t.bit for t in members]).repeat_interleave(n_images),
            torch.arange(n_images).repeat(len(members)),
        )
        for (kind, layer, fmt), members in grouped.items()
    ]
    results = {}
    for members, outcome in zip(grouped.values(), engine.run_many(cache, groups), strict=True):
        for position, trial in enumerate(members):
            rows = torch.arange(position * n_images, (position + 1) * n_images)
            results[trial] = outcome.select(rows)
    return results


def check(
    engine: Engine,
    model: nn.Module,
    cache: GoldenCache,
    trials: Sequence[Trial],
    *,
    limit: int | None = None,
) -> Checked:
    """Run ``trials`` through ``engine``; compare with the reference those it can address, or
    at most ``limit`` of them (every trial in a format other than fp32, and fp32 trials evenly
    spread over the rest; 0: none). int8 neuron scales are the engine's profile of the cache."""
    result = Checked(outcomes=run_trials(engine, cache, trials))
    applicable = [t for t in trials if reference_applies(engine.sites[t.layer], t)]
    if limit is not None and len(applicable) > limit:
        other = [t for t in applicable if t.fmt != "fp32"][:limit]
        fp32 = [t for t in applicable if t.fmt == "fp32"]
        room = limit - len(other)
        spread = {fp32[i * len(fp32) // room] for i in range(room)} if room > 0 else set()
        applicable = [t for t in applicable if t in spread or t in other]
    chosen = set(applicable)
    result.compared = applicable
    result.unchecked = [t for t in trials if t not in chosen]
    if not result.compared:
        return result
    int8_layers = sorted(
        {t.layer for t in result.compared if t.kind == "neuron" and t.fmt == "int8"}
    )
    scales = {k: v / 127 for k, v in engine.profile(cache, int8_layers).items()}
    logits = reference_logits(model, cache.images, result.compared, neuron_scales=scales)
    for trial, per_image in zip(result.compared, logits, strict=True):
        outcome = result.outcomes[trial]
        for image, ref in enumerate(per_image):
            found = _disagreement(trial, image, outcome, ref)
            if found is not None:
                result.disagreements.append(found)
    return result


def _disagreement(
    trial: Trial, image: int, outcome: Outcomes, ref: torch.Tensor
) -> Disagreement | None:
    ref_non_finite = not bool(torch.isfinite(ref).all())
    ref_top1 = -1 if ref.isnan().any() else int(ref.nan_to_num(nan=-math.inf).argmax())
    engine_top1 = int(outcome.faulty_top1[image])
    if bool(outcome.non_finite[image]) == ref_non_finite and (
        ref_non_finite or engine_top1 == ref_top1
    ):
        return None
    finite = ref[torch.isfinite(ref)]
    top2 = finite.topk(2).values if len(finite) > 1 else torch.zeros(2)
    return Disagreement(
        trial,
        image,
        engine_top1,
        ref_top1,
        float(top2[0] - top2[1]),
        float(finite.abs().max()) if len(finite) else math.inf,
    )

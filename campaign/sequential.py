"""Sequential stratified sampling: after each round, decide how many more trials each stratum
gets so that every reported SDC rate (one per model x kind) reaches a target margin.

Why sequential: the strata differ by orders of magnitude in variance (a flip of fp32 bit 30
corrupts nearly always, a low mantissa bit almost never), so a fixed per-stratum size wastes most
trials on strata that are already certain. Each round estimates the stratum deviations from the
counts so far, asks how many trials a Neyman allocation needs for the margin, and hands the
difference to the strata where the variance is. Pure functions of the counts, so a resumed
campaign replays the same rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bitstorm.logs import get_logger
from campaign.analysis.results import (
    StratumCounts,
    bit_pools,
    by_estimate,
    counts,
    estimate,
    weights,
)
from campaign.analysis.stats import Rate, neyman_allocation, neyman_total
from campaign.plan import Shard, make_round
from campaign.spec import CampaignSpec

log = get_logger(__name__)
StratumKey = tuple[str, str, str, str, int]  # model, kind, layer, format, bit
# One round grows a model x kind by at most this factor: the deviations estimated from a small
# pilot are rough, and a round that overshoots cannot be taken back.
MAX_GROWTH = 4.0


@dataclass(frozen=True)
class Target:
    margin: float
    confidence: float
    max_trials: int | None = None  # per model x kind
    overall: str = "fault_space"  # how the reported rate weights its strata
    allocation: str = "neyman"  # neyman, or equal trials per sampled stratum
    relative: float | None = None  # margin as a share of the estimate, instead of ``margin``

    def margin_for(self, rate: Rate) -> float:
        """The half-width ``rate`` must reach: ``relative`` x its estimate, while it has one
        (no SDC yet: the absolute ``margin``)."""
        if self.relative is not None and rate.rate > 0:
            return self.relative * rate.rate
        return self.margin


@dataclass(frozen=True)
class GroupStatus:
    """Where one reported estimate (model x kind) stands after a round; the manifest's
    ``targets`` are these records as dicts."""

    model: str
    kind: str
    rate: Rate
    needed: int  # total trials the Neyman allocation needs, estimated from the counts so far
    met: bool
    budget_left: int | None


def group_status(strata: Iterable[StratumCounts], target: Target) -> list[GroupStatus]:
    statuses = []
    for (model, kind), members in by_estimate(strata).items():
        rate = estimate(members, target.confidence, overall=target.overall)
        margin = target.margin_for(rate)
        sampled, share = _sampled(members, target.overall)
        # Census strata (the exhaustive last layer) add no variance: the sampled ones must
        # reach the margin on their share of the weight alone.
        needed = (
            neyman_total(
                *counts(sampled, target.overall),
                margin / share,
                target.confidence,
                bit_pools(sampled),
            )
            if sampled
            else 0
        )
        statuses.append(
            GroupStatus(
                model,
                kind,
                rate,
                needed + sum(s.trials for s in members if s.census),
                rate.margin <= margin and (target.relative is None or rate.sdc > 0),
                None
                if target.max_trials is None
                else max(0, target.max_trials - sum(s.trials for s in sampled)),
            )
        )
    return statuses


def next_round(
    strata: Iterable[StratumCounts],
    target: Target,
    statuses: list[GroupStatus] | None = None,
) -> dict[StratumKey, int]:
    """Extra trials per stratum for the next round; empty when every estimate meets the margin
    (or has spent its budget). ``statuses``: ``group_status`` of these strata, if already
    computed."""
    strata = list(strata)
    extra: dict[StratumKey, int] = {}
    groups = by_estimate(strata)
    for status in statuses if statuses is not None else group_status(strata, target):
        if status.met or status.budget_left == 0:
            continue
        members, _ = _sampled(groups[status.model, status.kind], target.overall)
        if not members:
            continue
        trials = sum(s.trials for s in members)
        needed = status.needed - (status.rate.trials - trials)
        wanted = min(needed - trials, math.ceil(trials * (MAX_GROWTH - 1)))
        wanted = max(wanted, math.ceil(0.05 * trials), len(members))
        if status.budget_left is not None:
            wanted = min(wanted, status.budget_left)
        if target.allocation == "equal":
            per_stratum = math.ceil(wanted / len(members))
            allocation = [per_stratum] * len(members)
        else:
            allocation = neyman_allocation(
                *counts(members, target.overall), wanted, bit_pools(members)
            ).tolist()
        for member, count in zip(members, allocation, strict=True):
            if count > 0:
                extra[member.model, member.kind, member.layer, member.fmt, member.bit] = count
    return extra


def _sampled(members: list[StratumCounts], overall: str) -> tuple[list[StratumCounts], float]:
    """The strata of a group that sampling can still improve (not a census), and their share
    of the group's weight."""
    weight = dict(zip(members, weights(members, overall), strict=True))
    sampled = [s for s in members if not s.census]
    total = sum(weight.values())
    return sampled, (sum(weight[s] for s in sampled) / total if total else 1.0)


def run_rounds(
    spec: CampaignSpec,
    plan: list[Shard],
    strata_before: Callable[[int], list[StratumCounts]],
    run: Callable[[list[Shard], int], None],
) -> list[GroupStatus]:
    """Rounds 1, 2, ... after the pilot shards in ``plan`` (already run), until every estimate
    meets the margin, spends ``max_trials`` or ``max_rounds`` have run. ``strata_before(limit)``
    counts the trials of the shards with ids below ``limit``; ``run(shards, round)`` evaluates
    a round's new shards. ``plan`` grows in place. Returns where each estimate ended."""
    target = Target(
        spec.margin,
        spec.confidence,
        spec.max_trials,
        str(spec.overall),
        str(spec.allocation),
        spec.relative_margin,
    )
    sites = {(s.model, s.kind, s.layer, s.fmt): s.sites for s in plan}
    round = 1
    while True:
        strata = strata_before(len(plan))
        statuses = group_status(strata, target)
        _log(statuses, round - 1)
        extra = next_round(strata, target, statuses) if round <= spec.max_rounds else {}
        if not extra:
            return _finish(statuses, spec)
        shards = make_round(spec, extra, sites, round, first_id=len(plan))
        plan.extend(shards)
        run(shards, round)
        round += 1


def _finish(statuses: list[GroupStatus], spec: CampaignSpec) -> list[GroupStatus]:
    for s in statuses:
        if not s.met:
            log.warning(
                "%s %s: margin %s NOT met (+-%.3g after %d trials): %s",
                s.model,
                s.kind,
                f"{spec.margin:.3g}"
                if spec.relative_margin is None
                else f"{spec.relative_margin:.0%} of the estimate",
                s.rate.margin,
                s.rate.trials,
                "max_trials spent"
                if s.budget_left == 0
                else f"max_rounds={spec.max_rounds} reached; rerun with more to go on",
            )
    return statuses


def _log(statuses: list[GroupStatus], round: int) -> None:
    for s in statuses:
        log.info(
            "after round %d: %s %s SDC %.4f%% +- %.4f%% from %d trials (%s)",
            round,
            s.model,
            s.kind,
            100 * s.rate.rate,
            100 * s.rate.margin,
            s.rate.trials,
            "met" if s.met else f"needs about {s.needed:,} trials",
        )

"""The records of a campaign report: what it says about each campaign, model and fault kind,
and the baseline-vs-text comparisons. Plain data, so that building a report (build.py) and
writing it out (render.py, output.py) share one shape and neither imports the other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bitstorm.errors import ConfigError
from campaign.analysis.results import OVERALLS, StratumCounts
from campaign.analysis.stats import Rate, clopper_pearson_interval, wilson_interval
from campaign.store import Store

# What a report calls each definition of an overall rate.
OVERALL_NAMES = {
    "fault_space": "fault-space weighted",
    "layer_mean": "mean of per-layer rates",
}

# The binomial interval of a rate that rests on one stratum, by its --interval name.
INTERVALS: dict[str, Callable[[int, int, float], tuple[float, float]]] = {
    "wilson": wilson_interval,
    "cp": clopper_pearson_interval,
}
BASELINE_HEAD = "linear"


@dataclass(frozen=True)
class Options:
    confidence: float | None = 0.95  # None: the campaign spec's
    interval: str = "wilson"  # for a rate that rests on one stratum
    bootstrap: int = 0  # resamples for a bootstrap ratio interval; 0: none

    def __post_init__(self) -> None:
        if self.confidence is not None and not 0 < self.confidence < 1:
            raise ConfigError(
                f"--confidence {self.confidence}: pass a level strictly between 0 and 1, e.g. 0.95"
            )
        if self.bootstrap < 0:
            raise ConfigError(f"--bootstrap {self.bootstrap}: pass a number of resamples >= 0")


@dataclass(frozen=True)
class KindReport:
    """One model's results for one fault kind; ``overall`` carries the effective trials."""

    kind: str
    overall: Rate  # by the campaign's definition, ``overall_rule``
    last_layer: str
    layers: dict[str, Rate]  # in module order
    bits: dict[tuple[str, int], Rate]  # (format, bit), ascending
    strata: tuple[StratumCounts, ...]
    overall_rule: str = "fault_space"  # campaign.spec.OVERALLS
    # The other definition of "overall", where the kind has more than one layer (so the two
    # can differ): every rate a user sees says which one it is.
    alternative: Rate | None = None

    @property
    def alternative_rule(self) -> str:
        return next(rule for rule in OVERALLS if rule != self.overall_rule)

    @property
    def formats(self) -> list[str]:
        return sorted({fmt for fmt, _ in self.bits})


@dataclass(frozen=True)
class ModelFacts:
    """What the model is (from the manifest); None where unknown."""

    backbone: str | None = None
    head: str | None = None
    dataset: str | None = None
    val_top1: float | None = None
    val_top2diff: float | None = None  # mean golden Top2Diff over the validation split
    source: str | None = None  # where the model came from (campaign.sources)


@dataclass(frozen=True)
class ModelReport:
    label: str  # unique among all models of one report
    name: str  # the model's name in its campaign
    campaign: str
    facts: ModelFacts
    images: int
    golden_top2diff: float | None  # percent, over the images ``top2diff_images`` names
    kinds: dict[str, KindReport]
    top2diff_images: str = "campaign"


@dataclass(frozen=True)
class CampaignReport:
    name: str
    location: str
    store: Store
    manifest: dict[str, Any]
    trials: int
    models: tuple[ModelReport, ...]

    @property
    def protocol(self) -> str:
        return self.manifest.get("spec", {}).get("protocol") or "bitstorm (before protocols)"


@dataclass(frozen=True)
class Improvement:
    """Baseline SDC rate / text SDC rate with its interval; ``missing`` says why there is none."""

    ratio: float | None = None
    low: float | None = None
    high: float | None = None
    bootstrap: tuple[float, float] | None = None
    missing: str | None = None


@dataclass(frozen=True)
class Comparison:
    baseline: ModelReport
    text: ModelReport
    kind: str
    last_layer: Improvement
    overall: Improvement  # by the campaigns' definition of overall
    alternative: Improvement | None = None  # by the other definition, where one exists

    @property
    def model(self) -> str:
        return f"{self.text.facts.backbone}/{self.text.facts.dataset}"

    @property
    def delta_top2diff(self) -> float | None:
        """Text minus baseline mean golden Top2Diff, in percentage points."""
        if self.text.golden_top2diff is None or self.baseline.golden_top2diff is None:
            return None
        return self.text.golden_top2diff - self.baseline.golden_top2diff


@dataclass(frozen=True)
class Report:
    campaigns: tuple[CampaignReport, ...]
    models: tuple[ModelReport, ...]  # of all campaigns, labelled apart
    comparisons: tuple[Comparison, ...]
    notes: tuple[str, ...]  # why a model is in no comparison
    options: Options

    @property
    def title(self) -> str:
        return f"bitstorm report: {' vs '.join(c.name for c in self.campaigns)}"

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(kind for m in self.models for kind in m.kinds))

    @property
    def formats(self) -> list[str]:
        return sorted({f for m in self.models for k in m.kinds.values() for f in k.formats})

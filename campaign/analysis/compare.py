"""Baseline vs text head across the models of one or more campaigns: label the models apart,
pair each text-head model with the linear-head one of the same backbone and data set, and give
the paper's "improvement in reliability" (baseline SDC rate / text SDC rate) per fault kind,
overall and at each model's last layer."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from bitstorm.errors import ConfigError
from campaign.analysis.results import StratumCounts, counts
from campaign.analysis.stats import Rate, bootstrap_ratio_interval, ratio_interval
from campaign.analysis.summary import (
    BASELINE_HEAD,
    CampaignReport,
    Comparison,
    Improvement,
    ModelReport,
    Options,
)


@dataclass(frozen=True)
class Sample:
    """A rate with the strata behind it and a label that says whose it is."""

    label: str
    rate: Rate
    strata: tuple[StratumCounts, ...]


@dataclass(frozen=True)
class Pair:
    baseline: ModelReport
    text: ModelReport


def label_models(campaigns: Sequence[CampaignReport]) -> list[ModelReport]:
    """All models of all campaigns; a name found in more than one campaign is prefixed with
    its campaign's name."""
    names = Counter(model.name for campaign in campaigns for model in campaign.models)
    models = [
        dataclasses.replace(model, label=f"{campaign.name}/{model.name}")
        if names[model.name] > 1
        else model
        for campaign in campaigns
        for model in campaign.models
    ]
    clashes = [label for label, n in Counter(m.label for m in models).items() if n > 1]
    if clashes:
        raise ConfigError(
            f"model {clashes[0]} appears twice: both campaigns have the same name and models; "
            "compare campaigns with different names"
        )
    return models


def pair_models(models: Sequence[ModelReport]) -> tuple[list[Pair], list[str]]:
    """(baseline, text) pairs: every model whose head is not linear with the linear-head model
    of the same backbone and data set (one from its own campaign first); and notes on the
    models left out."""
    baselines = [m for m in models if m.facts.head == BASELINE_HEAD]
    pairs, notes = [], []
    for model in models:
        if model.facts.head == BASELINE_HEAD:
            continue
        if model.facts.head is None:
            notes.append(f"{model.label}: head unknown (not in the manifest), so not compared")
            continue
        same = [
            b
            for b in baselines
            if (b.facts.backbone, b.facts.dataset) == (model.facts.backbone, model.facts.dataset)
        ]
        if not same:
            notes.append(
                f"{model.label}: no {BASELINE_HEAD}-head {model.facts.backbone} on "
                f"{model.facts.dataset} to compare with"
            )
            continue
        same.sort(key=lambda b: b.campaign != model.campaign)
        pairs.append(Pair(same[0], model))
    return pairs, notes


def compare(pairs: Sequence[Pair], options: Options) -> list[Comparison]:
    """Improvement in reliability per pair and fault kind both models were tested with."""
    comparisons = []
    for pair in pairs:
        for kind in pair.baseline.kinds:
            if kind not in pair.text.kinds:
                continue
            baseline, text = pair.baseline.kinds[kind], pair.text.kinds[kind]
            last_layer, overall = (
                improvement(part(pair.baseline, kind), part(pair.text, kind), options, rule)
                for part, rule in ((_last_layer, "fault_space"), (_overall, text.overall_rule))
            )
            alternative = None
            if baseline.alternative is not None and text.alternative is not None:
                alternative = improvement(
                    _overall(pair.baseline, kind, alternative=True),
                    _overall(pair.text, kind, alternative=True),
                    options,
                    text.alternative_rule,
                )
            comparisons.append(
                Comparison(pair.baseline, pair.text, kind, last_layer, overall, alternative)
            )
    return comparisons


def _overall(model: ModelReport, kind: str, alternative: bool = False) -> Sample:
    report = model.kinds[kind]
    rate = report.alternative if alternative else report.overall
    assert rate is not None
    return Sample(model.label, rate, report.strata)


def _last_layer(model: ModelReport, kind: str) -> Sample:
    report = model.kinds[kind]
    strata = tuple(s for s in report.strata if s.layer == report.last_layer)
    return Sample(f"{model.label} {report.last_layer}", report.layers[report.last_layer], strata)


def improvement(
    baseline: Sample, text: Sample, options: Options, overall: str = "fault_space"
) -> Improvement:
    """baseline / text SDC rate with a log-method interval (and a bootstrap one on request,
    its strata weighted as ``overall`` says); undefined, and said so, when either side saw no
    SDC."""
    empty = [sample.label for sample in (baseline, text) if sample.rate.sdc == 0]
    if empty:
        return Improvement(missing=f"no SDC in {' or '.join(empty)}")
    a, b = baseline.rate, text.rate
    ratio, low, high = ratio_interval(a.rate, a.variance, b.rate, b.variance, options.confidence)
    bootstrap = None
    if options.bootstrap:
        _, boot_low, boot_high = bootstrap_ratio_interval(
            counts(baseline.strata, overall),
            counts(text.strata, overall),
            options.confidence,
            resamples=options.bootstrap,
        )
        bootstrap = (boot_low, boot_high)
    return Improvement(ratio, low, high, bootstrap)

"""Campaign reports: SDC rates with intervals per model, layer and bit, the baseline-vs-text
comparison (the paper's "improvement in reliability") and plots, as Markdown, HTML and JSON.

    python -m campaign.report CAMPAIGN_DIR [--compare OTHER_CAMPAIGN_DIR] [--out DIR]
        [--confidence 0.95] [--interval wilson|cp] [--bootstrap N]

Every number comes from DuckDB aggregates over the Parquet files (stratum counts, cluster sums,
golden means): no query hands trial rows to Python, so a report on billions of trials needs no
more memory than one on thousands.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from bitstorm import __version__
from bitstorm.atomic import write_bytes_atomic, write_json_atomic
from bitstorm.errors import BitstormError, ConfigError, DataError
from campaign.document import Block, Bullets, Heading, Image, Paragraph, Table, to_html, to_markdown
from campaign.plots import Series, sdc_by_bit, sdc_by_layer
from campaign.results import (
    Results,
    StratumCounts,
    counts,
    group_by,
    open_results,
    variance_rates,
)
from campaign.results import estimate as results_estimate
from campaign.stats import (
    ClusterSums,
    bootstrap_ratio_interval,
    clopper_pearson_interval,
    effective_sample_size_from_sums,
    ratio_interval,
    wilson_interval,
)
from campaign.store import Store

INTERVALS: dict[str, Callable[[int, int, float], tuple[float, float]]] = {
    "wilson": wilson_interval,
    "cp": clopper_pearson_interval,
}
INTERVAL_NAMES = {"wilson": "Wilson", "cp": "Clopper-Pearson"}
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
class Rate:
    """An SDC rate with its interval; ``variance`` (of the stratified estimate) feeds ratios."""

    rate: float
    low: float
    high: float
    variance: float
    trials: int
    sdc: int


@dataclass(frozen=True)
class KindReport:
    """One model's results for one fault kind."""

    kind: str
    overall: Rate
    effective_trials: float
    last_layer: str
    layers: dict[str, Rate]  # in module order
    bits: dict[tuple[str, int], Rate]  # (format, bit), ascending
    strata: tuple[StratumCounts, ...]

    @property
    def formats(self) -> list[str]:
        return sorted({fmt for fmt, _ in self.bits})


@dataclass(frozen=True)
class ModelFacts:
    """What the model is (from the manifest or its checkpoint); None where unknown."""

    backbone: str | None = None
    head: str | None = None
    dataset: str | None = None
    val_top1: float | None = None


@dataclass(frozen=True)
class ModelReport:
    label: str  # unique among all models of one report
    name: str  # the model's name in its campaign
    campaign: str
    facts: ModelFacts
    images: int
    golden_top2diff: float | None
    kinds: dict[str, KindReport]


@dataclass(frozen=True)
class CampaignReport:
    name: str
    location: str
    store: Store
    manifest: dict[str, Any]
    trials: int
    models: tuple[ModelReport, ...]


@dataclass(frozen=True)
class Sample:
    """A rate with the strata behind it and a label that says whose it is."""

    label: str
    rate: Rate
    strata: tuple[StratumCounts, ...]


@dataclass(frozen=True)
class Improvement:
    """Baseline SDC rate / text SDC rate with its interval; ``missing`` says why there is none."""

    ratio: float | None = None
    low: float | None = None
    high: float | None = None
    bootstrap: tuple[float, float] | None = None
    missing: str | None = None


@dataclass(frozen=True)
class Pair:
    baseline: ModelReport
    text: ModelReport


@dataclass(frozen=True)
class Comparison:
    baseline: ModelReport
    text: ModelReport
    kind: str
    last_layer: Improvement
    overall: Improvement

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


def build_report(locations: Sequence[str], options: Options) -> Report:
    """The report of the campaigns at ``locations``; intervals at ``options.confidence``, or
    at the first campaign's spec confidence when that is None."""
    opened = [(location, open_results(location)) for location in locations]
    if options.confidence is None:
        spec = opened[0][1].manifest.get("spec", {})
        options = dataclasses.replace(options, confidence=spec.get("confidence") or 0.95)
    campaigns = tuple(load_campaign(location, results, options) for location, results in opened)
    models = label_models(campaigns)
    pairs, notes = pair_models(models)
    return Report(campaigns, tuple(models), tuple(compare(pairs, options)), tuple(notes), options)


# --- reading a campaign -------------------------------------------------------------------


def load_campaign(location: str, results: Results, options: Options) -> CampaignReport:
    """Everything the report says about one campaign folder, from a handful of aggregates."""
    spec = results.manifest.get("spec", {})
    name = spec.get("name") or results.store.root.rpartition("/")[2]
    rank = {kind: i for i, kind in enumerate(spec.get("kinds", []))}
    strata = sorted(results.strata(), key=lambda s: (rank.get(s.kind, len(rank)), s.kind))
    if not strata:
        raise DataError(f"{results.store.root}: the campaign has no trials yet (run it first)")
    trials = sum(s.trials for s in strata)  # strata() refuses trials outside the plan
    by_model = group_by(strata, lambda s: s.model)
    golden = golden_summary(results)
    sizes = effective_sizes(results)
    facts = read_model_facts(results.manifest)
    models = []
    order = layer_order(results.manifest)
    for model in dict.fromkeys(model for model, _ in order):
        if model not in by_model:
            continue
        kinds = {
            kind: kind_report(kind, counts, order[model, kind], sizes[model, kind], options)
            for kind, counts in group_by(by_model[model], lambda s: s.kind).items()
        }
        images, top2diff = golden.get(model, (0, None))
        facts_of = facts.get(model, ModelFacts())
        models.append(ModelReport(model, model, name, facts_of, images, top2diff, kinds))
    return CampaignReport(name, location, results.store, results.manifest, trials, tuple(models))


def layer_order(manifest: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    """Each model's layers per kind in module order: the order they first appear in the plan
    for that kind (a layer without neuron sites is missing from the neuron kind's list rather
    than appended after the last layer)."""
    order: dict[tuple[str, str], list[str]] = {}
    for shard in manifest.get("plan", {}).get("shard_list", []):
        layers = order.setdefault((shard["model"], shard["kind"]), [])
        if shard["layer"] not in layers:
            layers.append(shard["layer"])
    return order


def read_model_facts(manifest: dict[str, Any]) -> dict[str, ModelFacts]:
    """From the manifest's ``models``; a manifest older than that field sends us to each
    model's checkpoint where it still exists, else the model's facts stay unknown."""
    if "models" in manifest:
        return {name: _facts(entry) for name, entry in manifest["models"].items()}
    facts = {}
    for entry in manifest.get("spec", {}).get("models", []):
        checkpoint = entry.get("checkpoint")
        if checkpoint and Path(checkpoint).is_dir():
            from campaign.runner import model_facts  # torch and Ray: only on this rare path

            try:
                facts[entry["name"]] = _facts(model_facts(checkpoint))
            except BitstormError:
                continue
    return facts


def _facts(entry: dict[str, Any]) -> ModelFacts:
    return ModelFacts(
        entry.get("backbone"), entry.get("head"), entry.get("dataset"), entry.get("val_top1")
    )


def golden_summary(results: Results) -> dict[str, tuple[int, float]]:
    """Images and mean golden Top2Diff (percent) per model."""
    rows = results.sql("select model, count(*), avg(top2diff) from golden group by model")
    return {model: (int(images), float(mean)) for model, images, mean in rows.fetchall()}


def effective_sizes(results: Results) -> dict[tuple[str, str], float]:
    """Effective sample size per model and kind: the sum over strata of each stratum's, with
    clusters = trials that share one fault (model, kind, layer, format, bit, index; for neuron
    faults the same index on another image is another fault, so those are single trials). Per
    stratum, so that rates differing between strata do not count as clustering. The cluster
    sums are taken in SQL."""
    rows = results.sql(
        "select model, kind, count(*), sum(m), sum(k), sum(k * k / m), sum(m * m) from ("
        "select model, kind, layer, format, bit, count(*)::double as m, "
        "sum(sdc::int)::double as k from trials "
        "group by model, kind, layer, format, bit, index, "
        "case when kind = 'neuron' then image end) "
        "group by model, kind, layer, format, bit"
    ).fetchall()
    sizes: Counter[tuple[str, str]] = Counter()
    for model, kind, clusters, *sums in rows:
        sizes[model, kind] += effective_sample_size_from_sums(ClusterSums(int(clusters), *sums))
    return dict(sizes)


def kind_report(
    kind: str,
    strata: list[StratumCounts],
    layers: list[str],
    effective_trials: float,
    options: Options,
) -> KindReport:
    by_layer = group_by(strata, lambda s: s.layer)
    ordered = [layer for layer in layers if layer in by_layer]
    by_bit = group_by(strata, lambda s: (s.fmt, s.bit))
    rates = variance_rates(strata)  # the kind's strata are every layer's and bit's pool context
    return KindReport(
        kind=kind,
        overall=estimate(strata, options, rates),
        effective_trials=effective_trials,
        last_layer=ordered[-1],
        layers={layer: estimate(by_layer[layer], options, rates) for layer in ordered},
        bits={bit: estimate(by_bit[bit], options, rates) for bit in sorted(by_bit)},
        strata=tuple(strata),
    )


def estimate(
    strata: Sequence[StratumCounts], options: Options, rates: Mapping[StratumCounts, float]
) -> Rate:
    """The stratified estimate (campaign.results.estimate: strata weighted by fault-space
    share, variance rates shrunk over the model and kind's bit pools); a rate that rests on one
    stratum gets the binomial interval asked for (Wilson or Clopper-Pearson) instead of the
    normal approximation."""
    successes, trials, _ = counts(strata)
    combined = results_estimate(strata, options.confidence, rates)
    low, high = combined.low, combined.high
    if len(strata) == 1:
        low, high = INTERVALS[options.interval](successes[0], trials[0], options.confidence)
    return Rate(combined.rate, low, high, combined.variance, sum(trials), sum(successes))


# --- baseline vs text ---------------------------------------------------------------------


def label_models(campaigns: Sequence[CampaignReport]) -> list[ModelReport]:
    """All models of all campaigns; a name found in more than one campaign is prefixed with
    its campaign's name."""
    counts = Counter(model.name for campaign in campaigns for model in campaign.models)
    models = [
        dataclasses.replace(model, label=f"{campaign.name}/{model.name}")
        if counts[model.name] > 1
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
            last_layer, overall = (
                improvement(part(pair.baseline, kind), part(pair.text, kind), options)
                for part in (_last_layer, _overall)
            )
            comparisons.append(Comparison(pair.baseline, pair.text, kind, last_layer, overall))
    return comparisons


def _overall(model: ModelReport, kind: str) -> Sample:
    report = model.kinds[kind]
    return Sample(model.label, report.overall, report.strata)


def _last_layer(model: ModelReport, kind: str) -> Sample:
    report = model.kinds[kind]
    strata = tuple(s for s in report.strata if s.layer == report.last_layer)
    return Sample(f"{model.label} {report.last_layer}", report.layers[report.last_layer], strata)


def improvement(baseline: Sample, text: Sample, options: Options) -> Improvement:
    """baseline / text SDC rate with a log-method interval (and a bootstrap one on request);
    undefined, and said so, when either side saw no SDC."""
    empty = [sample.label for sample in (baseline, text) if sample.rate.sdc == 0]
    if empty:
        return Improvement(missing=f"no SDC in {' or '.join(empty)}")
    a, b = baseline.rate, text.rate
    ratio, low, high = ratio_interval(a.rate, a.variance, b.rate, b.variance, options.confidence)
    bootstrap = None
    if options.bootstrap:
        _, boot_low, boot_high = bootstrap_ratio_interval(
            counts(baseline.strata),
            counts(text.strata),
            options.confidence,
            resamples=options.bootstrap,
        )
        bootstrap = (boot_low, boot_high)
    return Improvement(ratio, low, high, bootstrap)


# --- the document ---------------------------------------------------------------------------


def _percent(value: float) -> str:
    return f"{100 * value:.3g}%"


def _interval(rate: Rate) -> str:
    return f"[{_percent(rate.low)}, {_percent(rate.high)}]"


def _accuracy(value: float | None) -> str:
    return "unknown" if value is None else f"{100 * value:.2f}%"


def _ratio(result: Improvement) -> str:
    if result.missing:
        return f"n/a ({result.missing})"
    text = f"{result.ratio:.2f} [{result.low:.2f}, {result.high:.2f}]"
    if result.bootstrap:
        text += f"; bootstrap [{result.bootstrap[0]:.2f}, {result.bootstrap[1]:.2f}]"
    return text


def _top2diff(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "unknown"
    return f"{value:+.2f} pp" if signed else f"{value:.2f}%"


def header_blocks(report: Report) -> list[Block]:
    options = report.options
    single = INTERVAL_NAMES[options.interval]
    blocks: list[Block] = [
        Heading(report.title, 1),
        Paragraph(
            f"Generated by bitstorm {__version__} (python -m campaign.report) on "
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. An SDC is a trial whose top-1 prediction "
            "differs from the fault-free one. Rates over several strata (model x kind x layer x "
            "format x bit) weight each stratum by its share of the fault space; their "
            f"{options.confidence:.0%} intervals use the stratified variance (normal "
            f"approximation); a rate that rests on one stratum has a {single} interval."
        ),
    ]
    for campaign in report.campaigns:
        blocks += [Heading(f"Campaign {campaign.name}"), Bullets(tuple(spec_summary(campaign)))]
    return blocks


def spec_summary(campaign: CampaignReport) -> list[str]:
    manifest, spec = campaign.manifest, campaign.manifest.get("spec", {})
    sampling = spec.get("sampling", "unknown")
    if sampling == "per_stratum":
        sampling += f", {spec.get('trials_per_stratum')} trials per stratum"
    elif sampling != "exhaustive":
        sampling += f", margin {spec.get('margin')} at confidence {spec.get('confidence')}"
    bits = spec.get("bits")
    versions = ", ".join(f"{k} {v}" for k, v in sorted(manifest.get("versions", {}).items()))
    planned = manifest.get("plan", {}).get("trials")
    targets = [
        f"{t['model']} {t['kind']}: +-{t['margin']:.3%} after {t['trials']:,} trials "
        + ("(met)" if t["met"] else "(NOT met)")
        for t in manifest.get("targets") or []
    ]
    return [
        f"folder: {campaign.location} (status: {manifest.get('status', 'unknown')})",
        f"models: {', '.join(m.name for m in campaign.models)}",
        f"fault kinds: {', '.join(spec.get('kinds', []))}; "
        f"formats: {', '.join(spec.get('formats', []))}; "
        f"bits: {'all' if bits is None else ', '.join(map(str, bits))}",
        f"sampling: {sampling}"
        + (f"; where each estimate ended: {'; '.join(targets)}" if targets else ""),
        f"images: {len(manifest.get('images', []))} (asked for {spec.get('images')}, "
        f"golden-correct only: {spec.get('golden_correct_only')})",
        f"trials: {campaign.trials:,} recorded"
        + ("" if planned is None else f" of {planned:,} planned"),
        f"versions: {versions or 'not recorded'}",
    ]


def comparison_blocks(report: Report) -> list[Block]:
    comparisons, options = report.comparisons, report.options
    intervals = f"a {options.confidence:.0%} log-method interval"
    if options.bootstrap:
        intervals += f" and a {options.bootstrap}-resample bootstrap interval"
    blocks: list[Block] = [
        Heading("Baseline vs text head"),
        Paragraph(
            "Improvement = baseline SDC rate / text-head SDC rate (above 1: the text head is "
            f"more reliable), with {intervals}. Last layer: each model's last injected layer in "
            "module order. ΔTop2Diff: text minus baseline mean golden Top2Diff, in percentage "
            "points."
        ),
    ]
    for kind in dict.fromkeys(c.kind for c in comparisons):
        blocks += [
            Heading(f"{kind} faults", 3),
            comparison_table([c for c in comparisons if c.kind == kind]),
        ]
    last = {m.label: m.kinds[c.kind].last_layer for c in comparisons for m in (c.baseline, c.text)}
    if last:
        blocks.append(
            Paragraph("Last layers: " + "; ".join(f"{k}: {v}" for k, v in last.items()) + ".")
        )
    if not comparisons:
        blocks.append(Paragraph("No pair of a linear-head and a text-head model to compare."))
    if report.notes:
        blocks.append(Bullets(report.notes))
    return blocks


def comparison_table(comparisons: Sequence[Comparison]) -> Table:
    header = (
        "Model (backbone/dataset)",
        "Baseline acc",
        "Text acc",
        "ΔTop2Diff",
        "Improvement last layer",
        "Improvement overall",
    )
    rows = tuple(
        (
            f"{c.model} ({c.text.label} vs {c.baseline.label})",
            _accuracy(c.baseline.facts.val_top1),
            _accuracy(c.text.facts.val_top1),
            _top2diff(c.delta_top2diff, signed=True),
            _ratio(c.last_layer),
            _ratio(c.overall),
        )
        for c in comparisons
    )
    return Table(header, rows)


def plot_blocks(report: Report) -> list[Block]:
    blocks: list[Block] = [Heading("Plots")]
    for kind in report.kinds:
        blocks += [
            Image(_bit_plot(kind, fmt, report.formats), f"SDC rate by bit, {fmt} {kind} faults")
            for fmt in report.formats
        ]
        blocks.append(Image(f"sdc_by_layer_{kind}.png", f"SDC rate by layer, {kind} faults"))
    blocks.append(
        Paragraph(
            "Error bars: the intervals of the tables. By bit (log scale): a bit where no SDC was "
            "seen is a hollow triangle at its interval's upper bound; lower ends below the "
            "axis are cut at its floor. Text heads are dashed (by bit) or hatched (by layer)."
        )
    )
    return blocks


def model_blocks(model: ModelReport) -> list[Block]:
    facts = model.facts
    blocks: list[Block] = [
        Heading(f"Model {model.label}"),
        Table(
            ("Fact", "Value"),
            (
                ("campaign", model.campaign),
                ("backbone", facts.backbone or "unknown"),
                ("head", facts.head or "unknown"),
                ("dataset", facts.dataset or "unknown"),
                ("validation accuracy (top-1)", _accuracy(facts.val_top1)),
                ("campaign images", str(model.images)),
                ("mean golden Top2Diff", _top2diff(model.golden_top2diff)),
                ("last layer", ", ".join(sorted({k.last_layer for k in model.kinds.values()}))),
            ),
        ),
        Table(
            ("Kind", "SDC rate", "Interval", "SDC", "Trials", "Effective trials"),
            tuple(
                (
                    kind.kind,
                    _percent(kind.overall.rate),
                    _interval(kind.overall),
                    f"{kind.overall.sdc:,}",
                    f"{kind.overall.trials:,}",
                    f"{kind.effective_trials:,.0f}",
                )
                for kind in model.kinds.values()
            ),
        ),
    ]
    for kind in model.kinds.values():
        blocks += [
            Heading(f"{model.label}, {kind.kind} faults by layer", 3),
            _rate_table("Layer", kind.layers),
            Heading(f"{model.label}, {kind.kind} faults by bit", 3),
            _rate_table(
                "Bit",
                {_bit_label(key, kind.formats): rate for key, rate in kind.bits.items()},
            ),
        ]
    return blocks


def _bit_label(key: tuple[str, int], formats: Sequence[str]) -> str:
    """A bit position, with its format when the campaign has several (fp16 bit 14 is an
    exponent bit, fp32 bit 14 a mantissa bit)."""
    fmt, bit = key
    return str(bit) if len(formats) == 1 else f"{fmt} bit {bit}"


def _rate_table(first: str, rates: dict[Any, Rate]) -> Table:
    return Table(
        (first, "SDC rate", "Interval", "SDC", "Trials"),
        tuple(
            (str(key), _percent(r.rate), _interval(r), f"{r.sdc:,}", f"{r.trials:,}")
            for key, r in rates.items()
        ),
    )


# --- report.json ------------------------------------------------------------------------------


def report_json(report: Report) -> dict[str, Any]:
    """The numbers of the tables, machine-readable: rates as fractions, not percent; layers
    (in module order) and bits as lists, since the file's keys are sorted."""
    return {
        "bitstorm": __version__,
        "options": dataclasses.asdict(report.options),
        "campaigns": [
            {
                "name": c.name,
                "location": c.location,
                "status": c.manifest.get("status"),
                "trials": c.trials,
                "spec": c.manifest.get("spec"),
                "versions": c.manifest.get("versions"),
            }
            for c in report.campaigns
        ],
        "models": {m.label: _model_json(m, report.options) for m in report.models},
        "comparisons": [
            {
                "model": c.model,
                "baseline": c.baseline.label,
                "text": c.text.label,
                "kind": c.kind,
                "baseline_val_top1": c.baseline.facts.val_top1,
                "text_val_top1": c.text.facts.val_top1,
                "delta_top2diff": c.delta_top2diff,
                "baseline_last_layer": c.baseline.kinds[c.kind].last_layer,
                "text_last_layer": c.text.kinds[c.kind].last_layer,
                "improvement_last_layer": _improvement_json(c.last_layer),
                "improvement_overall": _improvement_json(c.overall),
            }
            for c in report.comparisons
        ],
    }


def _model_json(model: ModelReport, options: Options) -> dict[str, Any]:
    return {
        "name": model.name,
        "campaign": model.campaign,
        **dataclasses.asdict(model.facts),
        "images": model.images,
        "golden_top2diff": model.golden_top2diff,
        "kinds": {
            kind.kind: {
                "overall": dataclasses.asdict(kind.overall),
                "effective_trials": kind.effective_trials,
                "last_layer": kind.last_layer,
                "layers": [{"layer": k, **dataclasses.asdict(r)} for k, r in kind.layers.items()],
                "bits": [
                    {"format": fmt, "bit": bit, **dataclasses.asdict(r)}
                    for (fmt, bit), r in kind.bits.items()
                ],
                "strata": [_stratum_json(s, options) for s in kind.strata],
            }
            for kind in model.kinds.values()
        },
    }


def _improvement_json(result: Improvement) -> dict[str, Any]:
    """An unbounded bootstrap end (too few SDCs in the text head's draws) is null: JSON has no
    infinity."""
    row = dataclasses.asdict(result)
    if result.bootstrap:
        row["bootstrap"] = [end if math.isfinite(end) else None for end in result.bootstrap]
    return row


def _stratum_json(stratum: StratumCounts, options: Options) -> dict[str, Any]:
    """One stratum's counts with its own binomial interval (Wilson or Clopper-Pearson)."""
    low, high = INTERVALS[options.interval](stratum.sdc, stratum.trials, options.confidence)
    return {
        "layer": stratum.layer,
        "format": stratum.fmt,
        "bit": stratum.bit,
        "trials": stratum.trials,
        "sdc": stratum.sdc,
        "population": stratum.population,
        "rate": stratum.sdc / stratum.trials,
        "low": low,
        "high": high,
    }


# --- putting it together -------------------------------------------------------------------


def write_report(report: Report, out: Path) -> list[Path]:
    """report.md, report.html, report.json and the plots, each written atomically."""
    blocks = [
        *header_blocks(report),
        *comparison_blocks(report),
        *plot_blocks(report),
        *(block for model in report.models for block in model_blocks(model)),
    ]
    return [
        write_bytes_atomic(out / "report.md", to_markdown(blocks).encode()),
        write_bytes_atomic(out / "report.html", to_html(blocks, report.title).encode()),
        write_json_atomic(out / "report.json", report_json(report)),
        *write_plots(report, out),
    ]


def write_plots(report: Report, out: Path) -> list[Path]:
    written = []
    for kind in report.kinds:
        for fmt in report.formats:
            by_bit = series(
                report.models,
                kind,
                lambda k, fmt=fmt: {bit: r for (f, bit), r in k.bits.items() if f == fmt},
            )
            png = sdc_by_bit(by_bit, f"{fmt} {kind} faults: SDC rate by bit")
            written.append(write_bytes_atomic(out / _bit_plot(kind, fmt, report.formats), png))
        by_layer = series(report.models, kind, lambda k: k.layers)
        png = sdc_by_layer(by_layer, f"{kind} faults: SDC rate by layer")
        written.append(write_bytes_atomic(out / f"sdc_by_layer_{kind}.png", png))
    return written


def _bit_plot(kind: str, fmt: str, formats: Sequence[str]) -> str:
    return f"sdc_by_bit_{kind}.png" if len(formats) == 1 else f"sdc_by_bit_{kind}_{fmt}.png"


def series(
    models: Sequence[ModelReport], kind: str, rates: Callable[[KindReport], dict[Any, Rate]]
) -> list[Series]:
    """What the plots draw of each model tested with ``kind``; a model keeps its colour."""
    return [
        Series(
            f"{model.label} ({model.facts.head or 'head unknown'})",
            f"C{i % 10}",
            model.facts.head == BASELINE_HEAD,
            rates(model.kinds[kind]),
        )
        for i, model in enumerate(models)
        if kind in model.kinds
    ]


def default_out(campaign: CampaignReport) -> Path:
    """``<campaign>/report`` for a local campaign; ``./<campaign>-report`` for a URI."""
    if isinstance(campaign.store.filesystem, pafs.LocalFileSystem):
        return Path(campaign.store.root) / "report"
    return Path(f"{campaign.name}-report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m campaign.report",
        description="SDC rates, baseline-vs-text improvement and plots of a campaign, as "
        "report.md, report.html and report.json.",
    )
    parser.add_argument("campaign", metavar="CAMPAIGN_DIR", help="a campaign folder or URI")
    parser.add_argument(
        "--compare",
        metavar="OTHER_CAMPAIGN_DIR",
        help="a second campaign whose models join the report and the baseline-vs-text pairing",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default: CAMPAIGN_DIR/report, or ./<campaign>-report for a URI)",
    )
    parser.add_argument(
        "--confidence",
        type=float,
        help="interval level (default: the campaign spec's confidence, 0.95 unless it set one)",
    )
    parser.add_argument(
        "--interval",
        choices=list(INTERVALS),
        default="wilson",
        help="interval of a rate that rests on one stratum (default: wilson)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help="also give bootstrap intervals of the improvement ratios, with N resamples",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    locations = [args.campaign] + ([args.compare] if args.compare else [])
    try:
        options = Options(args.confidence, args.interval, args.bootstrap)
        report = build_report(locations, options)
        written = write_report(report, args.out or default_out(report.campaigns[0]))
    except BitstormError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    print()
    print(to_markdown(comparison_blocks(report)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

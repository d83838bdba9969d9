"""Campaign folders into a report's records (campaign.analysis.summary).

Every number comes from DuckDB aggregates over the Parquet files (stratum counts, cluster sums,
golden means): no query hands trial rows to Python, so a report on billions of trials needs no
more memory than one on thousands.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from bitstorm.errors import DataError
from campaign.analysis.compare import compare, label_models, pair_models
from campaign.analysis.results import (
    OVERALLS,
    Results,
    StratumCounts,
    group_by,
    open_results,
    variance_rates,
)
from campaign.analysis.results import estimate as results_estimate
from campaign.analysis.stats import ClusterSums, Rate, effective_sample_size_from_sums
from campaign.analysis.summary import (
    INTERVALS,
    CampaignReport,
    KindReport,
    ModelFacts,
    ModelReport,
    Options,
    Report,
)


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
            kind: kind_report(
                kind,
                members,
                order[model, kind],
                sizes.get((model, kind), 0.0),
                options,
                results.overall,
            )
            for kind, members in group_by(by_model[model], lambda s: s.kind).items()
        }
        images, top2diff = golden.get(model, (0, None))
        facts_of = facts.get(model, ModelFacts())
        over = spec.get("top2diff_images") or "campaign"
        if over == "validation":
            top2diff = facts_of.val_top2diff
        models.append(ModelReport(model, model, name, facts_of, images, top2diff, kinds, over))
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
    """From the manifest's ``models``. A manifest older than that field leaves every model's
    facts unknown: reading them from the checkpoints would take torch, which this wing must not
    import."""
    return {
        name: ModelFacts(
            entry.get("backbone"),
            entry.get("head"),
            entry.get("dataset"),
            entry.get("val_top1"),
            entry.get("val_top2diff"),
            entry.get("source"),
        )
        for name, entry in manifest.get("models", {}).items()
    }


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
    overall: str = "fault_space",
) -> KindReport:
    """One model's rates for one kind: overall by the campaign's definition (and by the other,
    where the kind has more than one layer), per layer, and per bit (weighted as overall)."""
    by_layer = group_by(strata, lambda s: s.layer)
    ordered = [layer for layer in layers if layer in by_layer]
    by_bit = group_by(strata, lambda s: (s.fmt, s.bit))
    rates = variance_rates(strata)  # the kind's strata are every layer's and bit's pool context
    rate = estimate(strata, options, rates, overall)
    other = next(rule for rule in OVERALLS if rule != overall)
    return KindReport(
        kind=kind,
        overall=dataclasses.replace(rate, effective_trials=effective_trials),
        last_layer=ordered[-1],
        layers={layer: estimate(by_layer[layer], options, rates) for layer in ordered},
        bits={bit: estimate(by_bit[bit], options, rates, overall) for bit in sorted(by_bit)},
        strata=tuple(strata),
        overall_rule=overall,
        alternative=estimate(strata, options, rates, other) if len(ordered) > 1 else None,
    )


def estimate(
    strata: Sequence[StratumCounts],
    options: Options,
    rates: Mapping[StratumCounts, float],
    overall: str = "fault_space",
) -> Rate:
    """The stratified estimate (campaign.analysis.results.estimate: strata weighted as
    ``overall`` says, variance rates shrunk over the model and kind's bit pools); a rate that
    rests on one stratum gets the binomial interval asked for (Wilson or Clopper-Pearson)
    instead of the normal approximation."""
    combined = results_estimate(strata, options.confidence, rates, overall)
    if len(strata) > 1:
        return combined
    (stratum,) = strata
    low, high = INTERVALS[options.interval](stratum.sdc, stratum.trials, options.confidence)
    return dataclasses.replace(combined, low=low, high=high)

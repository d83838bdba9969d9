"""A report's files: report.md, report.html, report.json and the plots, each written atomically;
the plot blocks live here beside the plots so that their file names are made in one place."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitstorm.atomic import write_bytes_atomic, write_json_atomic
from bitstorm.version import __version__
from campaign.analysis.document import (
    Block,
    Gallery,
    Heading,
    Image,
    Paragraph,
    to_html,
    to_markdown,
)
from campaign.analysis.plots import Series, improvement_by_layer, sdc_by_bit, sdc_by_layer
from campaign.analysis.render import comparison_blocks, header_blocks, model_blocks
from campaign.analysis.results import StratumCounts
from campaign.analysis.stats import Rate, ratio_interval
from campaign.analysis.summary import (
    BASELINE_HEAD,
    INTERVALS,
    Improvement,
    KindReport,
    ModelReport,
    Options,
    Report,
)


def write_report(report: Report, out: Path) -> list[Path]:
    """report.md, report.html (its plots inline), report.json and the plots; returns the paths
    written."""
    plots = make_plots(report)
    blocks = [
        *header_blocks(report),
        *comparison_blocks(report),
        *plot_blocks(plots),
        *(block for model in report.models for block in model_blocks(model)),
    ]
    return [
        write_bytes_atomic(out / "report.md", to_markdown(blocks).encode()),
        write_bytes_atomic(out / "report.html", to_html(blocks, report.title).encode()),
        write_json_atomic(out / "report.json", report_json(report)),
        *(write_bytes_atomic(out / plot.name, plot.png) for plot in plots),
    ]


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
                "protocol": c.protocol,
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
                "overall": c.text.kinds[c.kind].overall_rule,
                "improvement_overall": _improvement_json(c.overall),
                "improvement_overall_other": (
                    None if c.alternative is None else _improvement_json(c.alternative)
                ),
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
        "top2diff_images": model.top2diff_images,
        "kinds": {
            kind.kind: {
                "overall_rule": kind.overall_rule,
                "overall": dataclasses.asdict(kind.overall),
                "overall_other": (
                    None if kind.alternative is None else dataclasses.asdict(kind.alternative)
                ),
                "effective_trials": kind.overall.effective_trials,
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
        "census": stratum.census,
        "rate": stratum.sdc / stratum.trials,
        "low": low,
        "high": high,
    }


# --- plots ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plot:
    name: str  # its file name beside the report
    alt: str
    png: bytes


def make_plots(report: Report) -> list[Plot]:
    """Per fault kind: SDC rate by bit (per format) and by layer, and the improvement by layer
    where a comparison has one."""
    plots = []
    for kind in report.kinds:
        for fmt in report.formats:
            by_bit = series(
                report.models,
                kind,
                lambda k, fmt=fmt: {bit: r for (f, bit), r in k.bits.items() if f == fmt},
            )
            png = sdc_by_bit(by_bit, f"{fmt} {kind} faults: SDC rate by bit", fmt)
            alt = f"SDC rate by bit, {fmt} {kind} faults"
            plots.append(Plot(_bit_plot(kind, fmt, report.formats), alt, png))
        by_layer = series(report.models, kind, lambda k: k.layers)
        png = sdc_by_layer(by_layer, f"{kind} faults: SDC rate by layer")
        plots.append(Plot(f"sdc_by_layer_{kind}.png", f"SDC rate by layer, {kind} faults", png))
        if improvements := _improvements(report, kind):
            png = improvement_by_layer(improvements, f"{kind} faults: improvement by layer")
            alt = f"Improvement by layer, {kind} faults"
            plots.append(Plot(f"improvement_by_layer_{kind}.png", alt, png))
    return plots


def plot_blocks(plots: Sequence[Plot]) -> list[Block]:
    return [
        Heading("Plots"),
        Gallery(tuple(Image(plot.name, plot.alt, plot.png) for plot in plots)),
        Paragraph(
            "Rates in percent on a log axis, with the intervals of the tables as error bars; a "
            "caret at the bottom marks a lower end below the axis. Keys where a model saw no "
            "SDC are crosses in the strip under the axis (their upper bounds are in the "
            "tables). Text heads are dashed. Improvement: baseline / text SDC rate per layer "
            "both models have, with its log-method interval; above 1 the text head is better."
        ),
    ]


def _bit_plot(kind: str, fmt: str, formats: Sequence[str]) -> str:
    return f"sdc_by_bit_{kind}.png" if len(formats) == 1 else f"sdc_by_bit_{kind}_{fmt}.png"


def series(
    models: Sequence[ModelReport], kind: str, rates: Callable[[KindReport], dict[Any, Rate]]
) -> list[Series]:
    """What the plots draw of each model tested with ``kind``, in percent; a model keeps its
    colour."""
    return [
        Series(
            f"{model.label} ({model.facts.head or 'head unknown'})",
            f"C{i % 10}",
            model.facts.head == BASELINE_HEAD,
            {
                key: (100 * r.rate, 100 * r.low, 100 * r.high) if r.sdc else None
                for key, r in rates(model.kinds[kind]).items()
            },
        )
        for i, model in enumerate(models)
        if kind in model.kinds
    ]


def _improvements(report: Report, kind: str) -> list[Series]:
    """Per comparison of ``kind``: baseline / text SDC rate at each layer both models have."""
    found = []
    for i, c in enumerate(x for x in report.comparisons if x.kind == kind):
        base, text = c.baseline.kinds[kind].layers, c.text.kinds[kind].layers
        values: dict[Any, tuple[float, float, float] | None] = {}
        for layer in (layer for layer in base if layer in text):
            a, b = base[layer], text[layer]
            values[layer] = (
                ratio_interval(a.rate, a.variance, b.rate, b.variance, a.confidence)
                if a.sdc and b.sdc
                else None
            )
        if values:
            found.append(Series(f"{c.baseline.label} / {c.text.label}", f"C{i % 10}", True, values))
    return found

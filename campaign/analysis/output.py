"""A report's files: report.md, report.html, report.json and the plots, each written atomically;
the plot blocks live here beside the plots so that their file names are made in one place."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bitstorm.atomic import write_bytes_atomic, write_json_atomic
from bitstorm.version import __version__
from campaign.analysis.document import Block, Heading, Image, Paragraph, to_html, to_markdown
from campaign.analysis.plots import Series, sdc_by_bit, sdc_by_layer
from campaign.analysis.render import comparison_blocks, header_blocks, model_blocks
from campaign.analysis.results import StratumCounts
from campaign.analysis.stats import Rate
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
    """report.md, report.html, report.json and the plots; returns the paths written."""
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


def plot_blocks(report: Report) -> list[Block]:
    blocks: list[Block] = [Heading("Plots")]
    for kind in report.kinds:
        blocks += [
            Image(_bit_plot(kind, fmt, report.formats), f"SDC rate by bit, {fmt} {kind} faults")
            for fmt in report.formats
        ]
        blocks.append(Image(_layer_plot(kind), f"SDC rate by layer, {kind} faults"))
    blocks.append(
        Paragraph(
            "Error bars: the intervals of the tables. By bit (log scale): a bit where no SDC was "
            "seen is a hollow triangle at its interval's upper bound; lower ends below the "
            "axis are cut at its floor. Text heads are dashed (by bit) or hatched (by layer)."
        )
    )
    return blocks


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
        written.append(write_bytes_atomic(out / _layer_plot(kind), png))
    return written


def _bit_plot(kind: str, fmt: str, formats: Sequence[str]) -> str:
    return f"sdc_by_bit_{kind}.png" if len(formats) == 1 else f"sdc_by_bit_{kind}_{fmt}.png"


def _layer_plot(kind: str) -> str:
    return f"sdc_by_layer_{kind}.png"


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

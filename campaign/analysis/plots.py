"""The report's plots as PNG bytes: SDC rate by bit (log scale) and by layer (grouped bars),
one series per model, with the intervals of the report's tables as error bars.

Figures are made with ``matplotlib.figure.Figure`` directly (the Agg canvas, no pyplot), so
nothing global changes and no display is needed.
"""

from __future__ import annotations

import io
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from campaign.analysis.stats import Rate

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Series:
    """One model's rates at some keys (bits or layers); baselines solid, others dashed or
    hatched; ``colour`` stays with the model across plots."""

    label: str
    colour: str
    baseline: bool
    rates: dict[Hashable, Rate]

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """rate, low, high and whether any SDC was seen, one entry per key."""
        rates = list(self.rates.values())
        return (
            np.array([r.rate for r in rates]),
            np.array([r.low for r in rates]),
            np.array([r.high for r in rates]),
            np.array([r.sdc > 0 for r in rates]),
        )


def sdc_by_bit(series: Sequence[Series], title: str) -> bytes:
    """Log scale. A bit with no SDC has no place on a log axis: it is a hollow down-triangle at
    its interval's upper bound; lower ends of error bars are cut at the axis floor."""
    figure, axes = _figure(10.0)
    floor = 0.5 * min(_lowest_shown(s) for s in series)
    for i, line in enumerate(series):
        rate, low, high, seen = line.arrays()
        x = np.array(list(line.rates), dtype=float) + _offset(i, len(series), 0.12)
        shown = np.where(seen, rate, np.nan)
        below = np.nan_to_num(shown - np.maximum(low, floor))
        above = np.nan_to_num(high - shown)
        axes.errorbar(
            x,
            shown,
            yerr=[below, above],
            marker="o",
            markersize=4,
            capsize=2,
            color=line.colour,
            linestyle="-" if line.baseline else "--",
            label=line.label,
        )
        marks = np.maximum(high, floor)[~seen]
        axes.scatter(x[~seen], marks, marker="v", facecolors="none", edgecolors=line.colour)
    axes.set_yscale("log")
    axes.set_ylim(bottom=floor)
    axes.set_xlabel("bit position")
    axes.grid(True, which="both", alpha=0.3)
    return _finish(figure, axes, f"{title} (hollow triangle: no SDC seen, at the upper bound)")


def sdc_by_layer(series: Sequence[Series], title: str) -> bytes:
    """Grouped bars: the models side by side at each layer (layers in first-seen order)."""
    layers = list(dict.fromkeys(layer for s in series for layer in s.rates))
    position = {layer: i for i, layer in enumerate(layers)}
    width = 0.8 / len(series)
    figure, axes = _figure(max(8.0, 0.3 * len(layers) * len(series) + 2))
    for i, bars in enumerate(series):
        rate, low, high, _ = bars.arrays()
        x = np.array([position[layer] for layer in bars.rates]) + _offset(i, len(series), width)
        axes.bar(
            x,
            rate,
            width,
            yerr=[rate - low, high - rate],
            capsize=2,
            color=bars.colour,
            hatch="" if bars.baseline else "//",
            edgecolor="white",
            error_kw={"elinewidth": 0.8},
            label=bars.label,
        )
    axes.set_xticks(range(len(layers)), [str(layer) for layer in layers], rotation=90, fontsize=7)
    axes.grid(True, axis="y", alpha=0.3)
    return _finish(figure, axes, title)


def _lowest_shown(series: Series) -> float:
    """The smallest value the plot must show: a positive rate, or a zero rate's upper bound
    (0 when the bit was run exhaustively: then one SDC in all its trials)."""
    rate, _, high, seen = series.arrays()
    trials = np.array([r.trials for r in series.rates.values()], dtype=float)
    shown = np.where(seen, rate, high)
    return float(np.where(shown > 0, shown, 1 / np.maximum(trials, 1)).min())


def _offset(i: int, count: int, step: float) -> float:
    """Where series ``i`` of ``count`` sits beside its key, so error bars do not overlap."""
    return step * (i - (count - 1) / 2)


def _figure(width: float) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, 5.5), layout="constrained")
    return figure, figure.subplots()


def _finish(figure: Figure, axes: Axes, title: str) -> bytes:
    axes.set_ylabel("SDC rate")
    axes.set_title(title)
    axes.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()

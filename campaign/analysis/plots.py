"""The report's plots as PNG bytes: SDC rate (percent) by bit and by layer, and the improvement
(baseline / text SDC rate) by layer, one series per model or pair, with the intervals of the
report's tables as error bars.

Read without a legend lecture: values on a log axis; a key where nothing was seen (no SDC, or
no ratio) is marked in a strip of its own under the axis, never drawn as a value; a lower
interval end below the axis stops at the axis with a caret that says so; a float format's sign,
exponent and mantissa bits are shaded; the figure's size is bounded whatever the layer count
(labels are thinned instead).

Figures are made with ``matplotlib.figure.Figure`` directly (the Agg canvas, no pyplot), so
nothing global changes and no display is needed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# IEEE layouts, mantissa then exponent widths (bit 0 is the lowest mantissa bit), and widths.
FLOAT_FIELDS = {"fp32": (23, 8), "fp16": (10, 5), "bf16": (7, 8)}
WIDTHS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8}
MAX_LABELS = 80  # tick labels on one axis before every n-th is shown
CARET_DOWN = 11  # matplotlib's CARETDOWNBASE marker


@dataclass(frozen=True)
class Series:
    """One model's (or pair's) values at some keys (bits or layers): ``(value, low, high)``, or
    None where nothing was seen. Baselines are solid, others dashed; ``colour`` stays with the
    model across plots."""

    label: str
    colour: str
    baseline: bool
    values: dict[Hashable, tuple[float, float, float] | None]


def sdc_by_bit(series: Sequence[Series], title: str, fmt: str) -> bytes:
    keys = list(range(WIDTHS[fmt]))
    return _plot(
        series,
        keys,
        title,
        "SDC rate (%)",
        "no SDC seen",
        x_label="bit position (0: lowest mantissa bit)",
        regions=_bit_regions(fmt, len(keys)),
    )


def sdc_by_layer(series: Sequence[Series], title: str) -> bytes:
    return _plot(series, _layers(series), title, "SDC rate (%)", "no SDC seen", x_label="layer")


def improvement_by_layer(series: Sequence[Series], title: str) -> bytes:
    return _plot(
        series,
        _layers(series),
        title,
        "baseline / text SDC rate",
        "no ratio: a side\nsaw no SDC",
        x_label="layer",
        reference=1.0,
    )


def _layers(series: Sequence[Series]) -> list[Hashable]:
    """Every series' layers, in first-seen (module) order."""
    return list(dict.fromkeys(key for s in series for key in s.values))


def _bit_regions(fmt: str, width: int) -> list[tuple[int, int, str, str]]:
    """(first bit, last bit, name, colour) of each field of ``fmt``."""
    if fmt not in FLOAT_FIELDS:
        return [(0, width - 2, "value bits", "#f2f2f2"), (width - 1, width - 1, "sign", "#e4d8f0")]
    mantissa, exponent = FLOAT_FIELDS[fmt]
    return [
        (0, mantissa - 1, "mantissa", "#f2f2f2"),
        (mantissa, mantissa + exponent - 1, "exponent", "#fbe3c9"),
        (mantissa + exponent, mantissa + exponent, "sign", "#e4d8f0"),
    ]


def _plot(
    series: Sequence[Series],
    keys: list[Hashable],
    title: str,
    y_label: str,
    unseen_label: str,
    *,
    x_label: str,
    regions: Sequence[tuple[int, int, str, str]] = (),
    reference: float | None = None,
) -> bytes:
    from matplotlib.figure import Figure

    width = min(16.0, max(8.0, 0.14 * len(keys) * max(1, len(series)) ** 0.5 + 3.0))
    figure = Figure(figsize=(width, 6.0), layout="constrained")
    main, strip = figure.subplots(2, 1, sharex=True, height_ratios=[6, 1])
    position = {key: i for i, key in enumerate(keys)}
    seen = [v for s in series for v in s.values.values() if v is not None]
    floor = _floor(seen, reference)
    step = min(0.8 / max(1, len(series)), 0.2)
    for i, line in enumerate(series):
        x = np.arange(len(keys)) + step * (i - (len(series) - 1) / 2)
        value = np.full(len(keys), np.nan)
        low, high = value.copy(), value.copy()
        for key, point in line.values.items():
            if point is not None:
                value[position[key]], low[position[key]], high[position[key]] = point
        clipped = low < floor
        main.errorbar(
            x,
            value,
            yerr=[value - np.maximum(low, floor), high - value],
            marker="o",
            markersize=4,
            capsize=2,
            elinewidth=0.9,
            color=line.colour,
            linestyle="-" if line.baseline else "--",
            linewidth=1.0,
            label=line.label,
        )
        main.plot(
            x[clipped],
            np.full(clipped.sum(), floor),
            linestyle="none",
            marker=CARET_DOWN,
            color=line.colour,
        )
        unseen = [x[position[key]] for key, point in line.values.items() if point is None]
        strip.plot(unseen, [i] * len(unseen), linestyle="none", marker="x", color=line.colour)
    for first, last, name, colour in regions:
        for axes in (main, strip):
            axes.axvspan(first - 0.5, last + 0.5, color=colour, zorder=0, linewidth=0)
        main.text(
            (first + last) / 2,
            1.01,
            name,
            transform=main.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="#555",
        )
    if reference is not None:
        main.axhline(reference, color="#444", linewidth=0.8)
    main.set_yscale("log")
    main.set_ylim(bottom=floor / 1.6)  # room under the carets
    main.set_ylabel(y_label)
    main.grid(True, which="major", alpha=0.3)
    main.set_title(title, pad=16 if regions else 6)
    handles, labels = main.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    _strip(strip, len(series), unseen_label)
    _ticks(strip, keys, x_label)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _floor(seen: Sequence[tuple[float, float, float]], reference: float | None) -> float:
    """The axis floor: a little under the smallest value shown (and the reference line)."""
    values = [v for v, _, _ in seen if v > 0] + ([reference] if reference else [])
    return 0.5 * min(values) if values else 1e-3


def _strip(strip: Axes, rows: int, label: str) -> None:
    strip.set_ylim(-0.7, rows - 0.3)
    strip.set_yticks([])
    strip.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    strip.grid(True, axis="x", alpha=0.2)


def _ticks(axes: Axes, keys: list[Hashable], label: str) -> None:
    every = math.ceil(len(keys) / MAX_LABELS)
    shown = range(0, len(keys), every)
    long = max((len(str(k)) for k in keys), default=1) > 3
    axes.set_xticks(
        list(shown), [str(keys[i]) for i in shown], rotation=90 if long else 0, fontsize=8
    )
    axes.set_xlim(-0.6, len(keys) - 0.4)
    axes.set_xlabel(label + (f" (every {every}th labelled)" if every > 1 else ""))

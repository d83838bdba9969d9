"""The report's plots: what a reader sees is what the tables say. A key where nothing was seen
is never drawn as a value, rates are in percent, a float format's fields are where IEEE puts
them, and a figure stays a readable size whatever the number of layers."""

import struct

from campaign.analysis.output import series
from campaign.analysis.plots import Series, _bit_regions, sdc_by_bit, sdc_by_layer
from campaign.analysis.stats import Rate
from campaign.analysis.summary import KindReport, ModelFacts, ModelReport


def _size(png: bytes) -> tuple[int, int]:
    """Width and height in pixels, from the PNG's IHDR chunk."""
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return struct.unpack(">II", png[16:24])


def _rate(sdc: int, trials: int = 100) -> Rate:
    rate = sdc / trials
    return Rate(rate, rate / 2, min(1.0, 2 * rate + 0.03), 0.95, 1e-4, trials, sdc)


def test_a_key_without_sdc_is_not_a_value_and_rates_are_percent():
    kind = KindReport(
        kind="weight",
        overall=_rate(3),
        last_layer="fc",
        layers={"conv1": _rate(0), "fc": _rate(5)},
        bits={("fp32", 0): _rate(0), ("fp32", 30): _rate(5)},
        strata=(),
    )
    model = ModelReport("m", "m", "c", ModelFacts(head="linear"), 8, None, {"weight": kind})
    (drawn,) = series([model], "weight", lambda k: k.layers)
    assert drawn.values["conv1"] is None  # drawn in the "no SDC seen" strip, not at a bound
    assert drawn.values["fc"] == (5.0, 2.5, 13.0) and drawn.baseline


def test_float_fields_shade_where_ieee_puts_them():
    assert [(a, b, n) for a, b, n, _ in _bit_regions("fp32", 32)] == [
        (0, 22, "mantissa"),
        (23, 30, "exponent"),
        (31, 31, "sign"),
    ]
    assert [(a, b) for a, b, _, _ in _bit_regions("fp16", 16)] == [(0, 9), (10, 14), (15, 15)]
    assert [(a, b) for a, b, _, _ in _bit_regions("bf16", 16)] == [(0, 6), (7, 14), (15, 15)]
    assert [n for _, _, n, _ in _bit_regions("int8", 8)] == ["value bits", "sign"]


def test_plots_stay_a_readable_size_for_few_and_many_layers():
    def layers(count):
        values = {f"block{i}.conv": (1.0 + i % 7, 0.5, 3.0 + i % 7) for i in range(count)}
        return [Series("a (linear)", "C0", True, values), Series("b (text)", "C1", False, values)]

    small, large = _size(sdc_by_layer(layers(12), "t")), _size(sdc_by_layer(layers(200), "t"))
    assert small[0] <= large[0] <= 16 * 110 and small[1] == large[1] <= 6 * 110
    bits = {b: (0.1, 0.05, 0.2) for b in range(32)}
    assert _size(sdc_by_bit([Series("a", "C0", True, bits)], "t", "fp32"))[0] <= 16 * 110

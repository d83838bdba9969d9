"""campaign.report on synthetic campaigns whose SDC counts are known, so every rate, ratio and
interval in report.json can be recomputed here by hand (weighting strata by population)."""

import base64
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
from scipy.stats import norm

from campaign.analysis.build import build_report
from campaign.analysis.document import Heading, Paragraph, Table, to_html, to_markdown
from campaign.analysis.render import comparison_blocks, console_summary
from campaign.analysis.results import open_results, overall_rates
from campaign.analysis.stats import clopper_pearson_interval, effective_sample_size, wilson_interval
from campaign.analysis.summary import Options
from campaign.report import main
from campaign.sequential import Target, group_status
from tests.campaign.conftest import model_entry

IMAGES = 8
SITES = {
    ("base", "weight", "conv1"): 100,
    ("base", "weight", "fc"): 50,
    ("text", "weight", "conv1"): 100,
    ("text", "weight", "fc.projection"): 200,
    ("text", "weight", "fc.classes"): 40,
}
COUNTS = {  # (model, kind, layer, bit) -> (trials, sdc)
    ("base", "weight", "conv1", 0): (20, 1),
    ("base", "weight", "conv1", 30): (20, 8),
    ("base", "weight", "fc", 0): (10, 0),
    ("base", "weight", "fc", 30): (10, 6),
    ("text", "weight", "conv1", 0): (20, 0),
    ("text", "weight", "conv1", 30): (20, 5),
    ("text", "weight", "fc.projection", 0): (16, 1),
    ("text", "weight", "fc.projection", 30): (16, 4),
    ("text", "weight", "fc.classes", 0): (10, 0),
    ("text", "weight", "fc.classes", 30): (10, 2),
}
MODELS = {"base": model_entry("linear", 0.95), "text": model_entry("text", 0.93)}
TOP2DIFF = {"base": 80.0, "text": 70.5}


def _strata(model, layer=None, bit=None):
    """(trials, sdc, population, bit) of the strata that match, from the known counts."""
    return [
        (n, k, SITES[m, kind, lay] * IMAGES, b)
        for (m, kind, lay, b), (n, k) in COUNTS.items()
        if m == model and layer in (None, lay) and bit in (None, b)
    ]


def _rate(strata):
    return sum(size * k / n for n, k, size, _ in strata) / sum(size for _, _, size, _ in strata)


def _shrunk(stratum, strata):
    """p for the variance: (k + 0.5) / (n + 1); in a bit whose strata saw no SDC at all, 2
    pseudo-trials at the rate (K + 0.5) / (N + 1) of the bit's other strata."""
    n, k, _, bit = stratum
    others = [(n2, k2) for n2, k2, _, b in strata if b == bit]
    if sum(k2 for _, k2 in others) > 0:
        return (k + 0.5) / (n + 1)
    prior = 0.5 / (sum(n2 for n2, _ in others) - n + 1)
    return (k + 2 * prior) / (n + 2)


def _variance(strata, context):
    """Stratified variance (trials drawn with replacement: no correction), p shrunk within the
    model's strata ``context``."""
    total = sum(size for _, _, size, _ in strata)
    return sum(
        (size / total) ** 2
        * _shrunk((n, k, size, bit), context)
        * (1 - _shrunk((n, k, size, bit), context))
        / n
        for n, k, size, bit in strata
    )


def _row(rows, key):
    """The row of a layer or bit in report.json's lists."""
    (row,) = [row for row in rows if key in (row.get("layer"), row.get("bit"))]
    return row


def _run(path, *options, out):
    return main([path, "--out", str(out), *options])


@pytest.fixture
def zoo(synthetic_campaign):
    return synthetic_campaign("zoo", COUNTS, SITES, MODELS, images=IMAGES, top2diff=TOP2DIFF)


def test_report_files_and_numbers_match_the_known_counts(zoo, tmp_path, capsys):
    out = tmp_path / "report"
    assert _run(zoo, out=out) == 0
    for name in ("report.md", "report.html", "report.json"):
        assert (out / name).stat().st_size > 0
    for name in ("sdc_by_bit_weight.png", "sdc_by_layer_weight.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert not list(out.glob(".*"))  # no temporary file left behind
    report = json.loads((out / "report.json").read_text())

    base = report["models"]["base"]["kinds"]["weight"]
    assert base["overall"]["rate"] == pytest.approx(_rate(_strata("base")))
    assert base["overall"]["trials"] == 60 and base["overall"]["sdc"] == 15
    assert _row(base["layers"], "conv1")["rate"] == pytest.approx((1 / 20 + 8 / 20) / 2)
    assert _row(base["bits"], 30)["rate"] == pytest.approx(_rate(_strata("base", bit=30)))
    text_layers = report["models"]["text"]["kinds"]["weight"]["layers"]
    assert [row["layer"] for row in text_layers] == ["conv1", "fc.projection", "fc.classes"]
    assert report["models"]["text"]["golden_top2diff"] == pytest.approx(70.5)

    (comparison,) = report["comparisons"]
    assert (comparison["baseline"], comparison["text"]) == ("base", "text")
    assert (comparison["baseline_last_layer"], comparison["text_last_layer"]) == (
        "fc",
        "fc.classes",
    )
    assert comparison["delta_top2diff"] == pytest.approx(-9.5)
    last = comparison["improvement_last_layer"]
    assert last["ratio"] == pytest.approx((6 / 10 / 2) / (2 / 10 / 2))
    spread = norm.ppf(0.975) * math.sqrt(
        _variance(_strata("base", "fc"), _strata("base")) / 0.3**2
        + _variance(_strata("text", "fc.classes"), _strata("text")) / 0.1**2
    )
    assert (last["low"], last["high"]) == pytest.approx(
        (3 * math.exp(-spread), 3 * math.exp(spread))
    )
    overall = comparison["improvement_overall"]
    assert overall["ratio"] == pytest.approx(_rate(_strata("base")) / _rate(_strata("text")))
    assert overall["low"] < overall["ratio"] < overall["high"]

    markdown = (out / "report.md").read_text()
    assert "| Model (backbone/dataset) | Baseline acc | Text acc | ΔTop2Diff |" in markdown
    assert "95.00% | 93.00% | -9.50 pp | 3.00 [" in markdown
    assert "![SDC rate by bit, fp32 weight faults](sdc_by_bit_weight.png)" in markdown
    page = (out / "report.html").read_text()
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"improvement_by_layer_weight.png"}  # conv1: both models
    embedded = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(p.read_bytes() for p in pngs)
    assert page.count("<details>") == 2 * 2  # by layer and by bit, per model: folded
    assert not re.search(r">(True|False|None)<", page)
    printed = capsys.readouterr().out
    assert f"wrote {out / 'report.md'}" in printed and "Improvement last layer" in printed


def test_a_rate_on_one_stratum_gets_the_interval_asked_for(synthetic_campaign, tmp_path):
    counts = {key: value for key, value in COUNTS.items() if key[3] == 30}
    path = synthetic_campaign("one_bit", counts, SITES, MODELS, images=IMAGES)
    assert _run(path, "--interval", "cp", "--confidence", "0.9", out=tmp_path / "r") == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    layer = _row(report["models"]["base"]["kinds"]["weight"]["layers"], "fc")
    assert (layer["low"], layer["high"]) == pytest.approx(clopper_pearson_interval(6, 10, 0.9))
    stratum = report["models"]["text"]["kinds"]["weight"]["strata"][0]
    assert (stratum["layer"], stratum["bit"], stratum["sdc"]) == ("conv1", 30, 5)
    assert (stratum["low"], stratum["high"]) == pytest.approx(clopper_pearson_interval(5, 20, 0.9))
    assert wilson_interval(5, 20, 0.9) != pytest.approx((stratum["low"], stratum["high"]))


def test_a_text_model_without_sdc_gives_n_a(synthetic_campaign, tmp_path, capsys):
    counts = {key: (n, 0 if key[0] == "text" else k) for key, (n, k) in COUNTS.items()}
    path = synthetic_campaign("quiet", counts, SITES, MODELS, images=IMAGES)
    assert _run(path, "--bootstrap", "50", out=tmp_path / "r") == 0
    (comparison,) = json.loads((tmp_path / "r" / "report.json").read_text())["comparisons"]
    assert comparison["improvement_overall"]["ratio"] is None
    assert comparison["improvement_overall"]["missing"] == "no SDC in text"
    assert "n/a (no SDC in text fc.classes)" in capsys.readouterr().out


def test_bootstrap_intervals_are_reported(zoo, tmp_path):
    assert _run(zoo, "--bootstrap", "300", out=tmp_path / "r") == 0
    (comparison,) = json.loads((tmp_path / "r" / "report.json").read_text())["comparisons"]
    low, high = comparison["improvement_overall"]["bootstrap"]
    assert low < comparison["improvement_overall"]["ratio"] < high
    # text's last layer: 2 SDCs in 10 trials, so about 11% of redraws have none; the ratio's
    # upper end is unbounded, which JSON writes as null
    low, high = comparison["improvement_last_layer"]["bootstrap"]
    assert low < 3 and high is None
    assert "; bootstrap [" in (tmp_path / "r" / "report.md").read_text()


def test_compare_pairs_a_baseline_and_a_text_model_from_two_campaigns(synthetic_campaign, tmp_path):
    def only(model):
        return {key[1:]: v for key, v in COUNTS.items() if key[0] == model}

    # both campaigns call their model "net": the report tells them apart by campaign name
    baseline = synthetic_campaign(
        "baseline_run",
        {("net", *key): v for key, v in only("base").items()},
        {("net", *key[1:]): v for key, v in SITES.items() if key[0] == "base"},
        {"net": model_entry("linear", 0.95)},
        images=IMAGES,
    )
    text = synthetic_campaign(
        "text_run",
        {("net", *key): v for key, v in only("text").items()},
        {("net", *key[1:]): v for key, v in SITES.items() if key[0] == "text"},
        {"net": model_entry("text", 0.93)},
        images=IMAGES,
    )
    assert main([baseline, "--compare", text, "--out", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report["models"]) == {"baseline_run/net", "text_run/net"}
    (comparison,) = report["comparisons"]
    assert (comparison["baseline"], comparison["text"]) == ("baseline_run/net", "text_run/net")
    assert comparison["improvement_last_layer"]["ratio"] == pytest.approx(3.0)
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "resnet18/digits (text_run/net vs baseline_run/net)" in markdown


def test_effective_sample_size_counts_trials_that_share_a_fault(synthetic_campaign, tmp_path):
    path = synthetic_campaign("clustered", COUNTS, SITES, MODELS, images=IMAGES, images_per_fault=4)
    assert _run(path, out=tmp_path / "r") == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    expected = 0.0
    for (model, *_), (n, k) in COUNTS.items():  # per stratum, summed
        if model == "base":
            successes, trials = [], []
            for start in range(0, n, 4):  # clusters of 4 trials; the first k trials are SDCs
                trials.append(min(4, n - start))
                successes.append(max(0, min(k - start, trials[-1])))
            expected += effective_sample_size(successes, trials)
    size = report["models"]["base"]["kinds"]["weight"]["effective_trials"]
    assert size == pytest.approx(expected)
    assert size < 60


def test_neuron_faults_on_different_images_are_different_faults(synthetic_campaign, tmp_path):
    neuron = {(m, "neuron", lay): size for (m, _, lay), size in SITES.items()}
    counts = {(m, "neuron", lay, b): n_k for (m, _, lay, b), n_k in COUNTS.items()}
    path = synthetic_campaign("neurons", counts, neuron, MODELS, images=IMAGES, images_per_fault=4)
    assert _run(path, out=tmp_path / "r") == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    kind = report["models"]["base"]["kinds"]["neuron"]
    # The same index on 4 images is 4 faults: no clusters, every trial counts.
    assert kind["effective_trials"] == pytest.approx(kind["overall"]["trials"])


def test_an_old_manifest_without_model_facts_still_reports(synthetic_campaign, tmp_path):
    path = synthetic_campaign("old", COUNTS, SITES, None, images=IMAGES)
    assert _run(path, out=tmp_path / "r") == 0
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "| head | unknown |" in markdown
    assert "text: head unknown" in markdown


def test_console_summary_has_the_rates_and_the_reports_comparison(zoo):
    report = build_report([zoo], Options(confidence=0.9))
    text = console_summary(report)
    table, comparison = text.split("\n\n", 1)
    protocol, header, *rows = table.splitlines()
    assert protocol.startswith("campaign zoo: protocol") and "range restriction off" in protocol
    assert "90% interval" in header and len(rows) == 2
    assert "fault-space weighted; mean of per-layer rates: " in rows[0]
    base = report.models[0].kinds["weight"].overall
    assert rows[0].split()[:4] == ["base", "weight", "60", f"{base.rate:.3%}"]
    assert f"[{base.low:.3%}, {base.high:.3%}]" in rows[0]
    assert comparison == to_markdown(comparison_blocks(report))
    assert "Improvement last layer" in comparison


def test_overall_rates_are_the_reports_overall_rates(zoo):
    rates = overall_rates(open_results(zoo), 0.9)
    assert list(rates) == [("base", "weight"), ("text", "weight")]
    assert rates["base", "weight"].rate == pytest.approx(_rate(_strata("base")))
    assert (rates["base", "weight"].trials, rates["base", "weight"].sdc) == (60, 15)
    assert rates["base", "weight"].confidence == 0.9
    report = build_report([zoo], Options(confidence=0.9))
    for model in report.models:
        overall = model.kinds["weight"].overall
        assert dataclasses.replace(overall, effective_trials=None) == rates[model.name, "weight"]


def test_the_sequential_targets_of_the_manifest_are_summarised(zoo, tmp_path):
    """Targets as the runner writes them (asdict of each GroupStatus) and as manifests from
    before GroupStatus held a Rate wrote them (flat rate, margin and trials)."""
    strata = open_results(zoo).strata()
    base, _ = group_status(strata, Target(margin=0.5, confidence=0.95))
    old = {"model": "text", "kind": "weight", "trials": 92, "rate": 0.1, "margin": 0.0125}
    manifest_path = Path(zoo, "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["targets"] = [dataclasses.asdict(base), {**old, "needed": 9, "met": False}]
    manifest_path.write_text(json.dumps(manifest))
    assert _run(zoo, out=tmp_path / "r") == 0
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert f"base weight: +-{base.rate.margin:.3%} after 60 trials (met)" in markdown
    assert "text weight: +-1.250% after 92 trials (NOT met)" in markdown


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_manifest", "is not a campaign folder"),
        ("no_trials", "has no trials yet"),
        ("bad_confidence", "--confidence 1.5"),
    ],
)
def test_bad_input_exits_2_and_names_the_problem(case, message, zoo, tmp_path, capsys):
    path = zoo
    if case == "no_manifest":
        path = str(tmp_path / "empty")
        Path(path).mkdir()
    if case == "no_trials":
        for shard in Path(zoo, "trials").rglob("*.parquet"):
            shard.unlink()
    options = ["--confidence", "1.5"] if case == "bad_confidence" else []
    assert _run(path, *options, out=tmp_path / "r") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_blocks_escape_what_would_be_markup():
    blocks = [
        Heading("a <b> & c"),
        Paragraph("x * y"),
        Table(("name", "value"), (("a|b", "<script>"),)),
    ]
    html = to_html(blocks, "t<")
    assert "<b>" not in html and "&lt;script&gt;" in html and "<title>t&lt;</title>" in html
    markdown = to_markdown(blocks)
    assert "| a\\|b | \\<script> |" in markdown and "x \\* y" in markdown

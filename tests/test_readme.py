"""The README's examples run as written (issue 14): its model-source YAML parses into the sources
it names, and the Python API and "coming from pytorchfi" code blocks execute on a real model,
so the documented surface cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from torch import nn

import bitstorm
from campaign.spec import SOURCES, CampaignSpec
from tests.campaign.factories import small_net

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(heading: str, language: str) -> list[str]:
    """The fenced ``language`` code blocks of the README section under ``### heading``."""
    text = README.read_text()
    match = re.search(rf"^### {re.escape(heading)}\n(.*?)(?=^##)", text, re.M | re.S)
    assert match, f"README has no section {heading!r}"
    found = re.findall(rf"^```{language}\n(.*?)^```", match.group(1), re.M | re.S)
    assert found, f"README section {heading!r} has no {language} block"
    return found


def _data(count: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 3, size, size, generator=generator), torch.arange(count) % 10


def test_the_model_sources_example_parses_into_the_sources_it_names():
    (example,) = blocks("Models from anywhere", "yaml")
    settings = yaml.safe_load(example) | {"name": "readme", "output": "unused"}
    spec = CampaignSpec.parse(settings)
    assert [next(s for s in SOURCES if getattr(m, s)) for m in spec.models] == [
        "checkpoint",
        "torchvision",
        "torchvision",
        "timm",
        "factory",
    ]
    assert spec.dataset == "imagenet"


def test_the_python_api_example_runs(tmp_path, monkeypatch):
    (example,) = blocks("Python API (notebooks and scripts, no Ray needed)", "python")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    images, labels = _data(16)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        predicted = model(images).argmax(1)  # the labels a trained model would get right
    small = {"images": images, "labels": labels, "progress": False, "output": None}
    small |= {"kinds": ["weight"], "bits": [30], "trials_per_stratum": 8, "image_selection": "any"}
    names = {
        "model": model,
        "images": images,
        "labels": predicted,
        "baseline_result": bitstorm.run_campaign(small_net(), **small),
        "text_result": bitstorm.run_campaign(small_net(), **small),
    }
    exec(compile(example, str(README), "exec"), names)
    result = names["result"]
    summary = result.summary()
    assert list(summary["kind"]) == ["weight"]
    assert (summary["trials"] > 0).all()
    assert set(result.by_layer()["layer"]) and all(
        layer.startswith("layer4.") for layer in result.by_layer()["layer"]
    )
    assert len(result.by_bit()) == 32


def test_the_coming_from_pytorchfi_examples_run(tmp_path, monkeypatch):
    pytorchfi_loop, bitstorm_lines = blocks("Coming from pytorchfi", "python")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    torch.manual_seed(0)
    model = small_net().eval()
    images, _ = _data(8)
    with torch.no_grad():
        labels = model(images).argmax(1)  # the labels a trained model would get right
    golden = int(labels[0])
    weight = model[0].weight.detach()
    faults = [(0, k, c, 1, 1, float(weight[k, c, 1, 1]) * 1e6) for k in range(4) for c in range(3)]
    names = {"model": model, "nn": nn, "image": images[:1], "golden": golden}
    names["my_sampled_faults"] = faults
    exec(compile(pytorchfi_loop, str(README), "exec"), names)
    assert 0 < names["sdc"] <= len(faults)  # huge weights flip some decisions, not all is luck

    names = {"bitstorm": bitstorm, "model": model, "images": images, "labels": labels}
    exec(compile(bitstorm_lines, str(README), "exec"), names)
    summary = names["result"].summary()
    assert sorted(summary["kind"]) == ["neuron", "weight"]
    assert (summary["trials"] == 2 * 32 * 256).all()  # two layers x 32 bits x 256 per stratum


@pytest.mark.parametrize(
    "heading", ["Python API (notebooks and scripts, no Ray needed)", "Coming from pytorchfi"]
)
def test_the_examples_name_only_public_api(heading):
    for code in blocks(heading, "python"):
        for name in re.findall(r"bitstorm\.(\w+)", code):
            assert name in bitstorm.__all__, f"README uses bitstorm.{name}, which is not public"


def test_the_campaign_sql_runs_on_the_files_and_agrees_with_the_view(tmp_path, monkeypatch):
    """The DuckDB CLI queries read the trial files directly, where masked faults' Top2Diff is
    null (campaign.store): they must still give what the full ``trials`` view gives."""
    import duckdb

    first, more = blocks("Campaigns", "sql")[:2]
    torch.manual_seed(0)
    model = small_net().eval()
    images, _ = _data(8)
    with torch.no_grad():
        labels = model(images).argmax(1)
    result = bitstorm.run_campaign(
        model,
        images,
        labels,
        bits=[0, 23, 30],
        output=str(tmp_path),
        name="digits_bitstorm",
        trials_per_stratum=32,
        progress=False,
    )
    monkeypatch.chdir(tmp_path)
    by_kind = duckdb.sql(first).fetchall()
    view = result.sql("select model, kind, count(*), avg(sdc::int) from trials group by all")
    assert sorted(by_kind) == sorted(view.itertuples(index=False, name=None))
    monkeypatch.chdir(tmp_path / "digits_bitstorm")
    code = "\n".join(line for line in more.splitlines() if not line.startswith("--"))
    *_, moved = (duckdb.sql(q).fetchall() for q in code.split(";") if q.strip())
    faulty = result.sql("select avg(top2diff) from trials where not non_finite")
    assert moved[0][2] == pytest.approx(float(faulty.iloc[0, 0]))

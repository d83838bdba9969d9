"""The Python API for notebooks and scripts: ``bitstorm.run_campaign(model, images, labels)``.

Why: a campaign spec names checkpoints and data sets on disk and runs on Ray; someone with a
model in a notebook should get the same exact flips, plan, statistics and Parquet layout in one
call, in-process and Ray-free by default. It builds the same ``CampaignSpec`` (every spec field
can be passed as a keyword) and runs it through the same runner, with the models and images
handed over instead of loaded, so a campaign here and one through Ray actors (``use_ray=True``,
or the CLI) give the same rows for the same seed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bitstorm.errors import ConfigError
from campaign.analysis.build import build_report
from campaign.analysis.compare import Pair
from campaign.analysis.compare import compare as compare_pairs
from campaign.analysis.results import Results, open_results
from campaign.analysis.stats import Rate
from campaign.analysis.summary import Options, Report
from campaign.runner import CheckedCampaign, check_sites
from campaign.runner import run_campaign as run_spec
from campaign.sources import state_sha256
from campaign.spec import CampaignSpec
from trainers.data import DataBundle


@dataclass(frozen=True)
class CampaignResult:
    """A finished campaign's folder, read through DuckDB: tables as pandas DataFrames."""

    root: str

    @property
    def results(self) -> Results:
        return open_results(self.root)

    def report(self, confidence: float = 0.95) -> Report:
        return build_report([self.root], Options(confidence=confidence))

    def summary(self, confidence: float = 0.95) -> pandas.DataFrame:
        """The SDC rate and its interval per model x fault kind (the campaign's overall)."""
        rows = [
            {"model": m.name, "kind": kind, **_rate(k.overall), "overall": k.overall_rule}
            for m in self.report(confidence).models
            for kind, k in m.kinds.items()
        ]
        return pandas.DataFrame(rows)

    def by_layer(self, confidence: float = 0.95) -> pandas.DataFrame:
        rows = [
            {"model": m.name, "kind": kind, "layer": layer, **_rate(rate)}
            for m in self.report(confidence).models
            for kind, k in m.kinds.items()
            for layer, rate in k.layers.items()
        ]
        return pandas.DataFrame(rows)

    def by_bit(self, confidence: float = 0.95) -> pandas.DataFrame:
        rows = [
            {"model": m.name, "kind": kind, "format": fmt, "bit": bit, **_rate(rate)}
            for m in self.report(confidence).models
            for kind, k in m.kinds.items()
            for (fmt, bit), rate in k.bits.items()
        ]
        return pandas.DataFrame(rows)

    def sql(self, query: str) -> pandas.DataFrame:
        """DuckDB SQL over the views ``trials``, ``golden`` and ``census``."""
        return self.results.df(query)


def run_campaign(
    model: nn.Module | Mapping[str, nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    kinds: Sequence[str] = ("weight", "neuron"),
    layers: Sequence[str] = ("*",),
    sampling: Mapping[str, float] | str | None = None,
    train_images: torch.Tensor | None = None,
    output: str | None = None,
    name: str = "notebook",
    use_ray: bool = False,
    fresh: bool = False,
    progress: bool = True,
    **spec: Any,
) -> CampaignResult:
    """Inject faults into ``model`` (or several, by name) on ``images`` (already preprocessed,
    ``[N, C, H, W]``) with ``labels`` ``[N]``; any other campaign spec field (``bits``,
    ``formats``, ``trials_per_stratum``, ``protocol``, ``seed``, ...) is a keyword. Results go
    to ``output`` (default: a new temporary folder) in the campaign layout. ``train_images``
    are profiled for range restriction (``protocol="goldeneye"``). Runs in this process
    unless ``use_ray``."""
    models = dict(model) if isinstance(model, Mapping) else {"model": model}
    images, labels = torch.as_tensor(images), torch.as_tensor(labels).long()
    if images.dim() != 4 or labels.shape != (len(images),):
        raise ConfigError(
            f"images must be [N, C, H, W] and labels [N]; got {tuple(images.shape)} and "
            f"{tuple(labels.shape)}"
        )
    settings: dict[str, Any] = {
        "name": name,
        "models": [{"name": n, "in_memory": True} for n in models],
        "kinds": list(kinds),
        "layers": list(layers),
        "images": len(images),
        "output": output or tempfile.mkdtemp(prefix="bitstorm-"),
        **spec,
    }
    if sampling is not None:
        settings["sampling"] = dict(sampling) if isinstance(sampling, Mapping) else sampling
        if isinstance(sampling, Mapping):
            settings.setdefault("trials_per_stratum", 64)  # the pilot of sequential sampling
    parsed = CampaignSpec.parse(settings)
    for module in models.values():
        module.eval()
    with torch.no_grad():
        classes = int(next(iter(models.values()))(images[:1]).shape[-1])
    train = images if train_images is None else torch.as_tensor(train_images)
    data = DataBundle(
        train=TensorDataset(train, torch.zeros(len(train), dtype=torch.long)),
        val=TensorDataset(images, labels),
        class_names=tuple(str(i) for i in range(classes)),
        image_shape=tuple(images.shape[1:]),
    )
    if parsed.range_restriction and train_images is None:
        raise ConfigError(
            "train_images: range restriction profiles its bounds on training images; pass "
            "train_images=..., or protocol='bitstorm' (no restriction)"
        )
    facts = {n: _facts(m) for n, m in models.items()}
    checked = CheckedCampaign(facts, models, check_sites(parsed, models, data), data)
    store = run_spec(parsed, fresh=fresh, progress=progress, checked=checked, local=not use_ray)
    return CampaignResult(store.root)


def compare(
    baseline: CampaignResult, text: CampaignResult, confidence: float = 0.95
) -> pandas.DataFrame:
    """Improvement in reliability (baseline SDC rate / text SDC rate, with intervals) for every
    baseline model x text model x fault kind both were tested with."""
    options = Options(confidence=confidence)
    pairs = [
        Pair(b, t)
        for b in baseline.report(confidence).models
        for t in text.report(confidence).models
    ]
    rows = []
    for c in compare_pairs(pairs, options):
        row = {"baseline": c.baseline.name, "text": c.text.name, "kind": c.kind}
        for part, improvement in (("overall", c.overall), ("last_layer", c.last_layer)):
            row |= {
                f"{part}_improvement": improvement.ratio,
                f"{part}_low": improvement.low,
                f"{part}_high": improvement.high,
                f"{part}_missing": improvement.missing,
            }
        rows.append(row)
    return pandas.DataFrame(rows)


def _rate(rate: Rate) -> dict[str, Any]:
    return {
        "rate": rate.rate,
        "low": rate.low,
        "high": rate.high,
        "confidence": rate.confidence,
        "trials": rate.trials,
        "sdc": rate.sdc,
    }


def _facts(model: nn.Module) -> dict[str, Any]:
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    return {
        "source": f"in-memory {kind} (bitstorm.run_campaign)",
        "backbone": type(model).__name__,
        "head": "custom",
        "dataset": "given tensors",
        "val_top1": None,
        "epoch": None,
        "weights_sha256": state_sha256(model),
    }

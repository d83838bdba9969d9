"""Synthetic campaign folders with SDC counts a test chooses, written the way the runner writes
them (Store, trial_table, manifest), so readers of results can be checked against known numbers
without training or running anything; and the two tiny checkpoints the end-to-end campaign tests
run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from campaign.store import GOLDEN_SCHEMA, LAYOUT, Store, trial_table
from trainers.checkpoint import save_checkpoint
from trainers.config import TrainConfig
from trainers.models import build_model

# (model, kind, layer, bit) -> (trials, sdc)
Counts = dict[tuple[str, str, str, int], tuple[int, int]]


def model_entry(head: str, val_top1: float = 0.9, backbone: str = "resnet18") -> dict[str, Any]:
    """A manifest ``models`` entry, as campaign.runner.model_facts writes it."""
    return {
        "backbone": backbone,
        "head": head,
        "dataset": "digits",
        "val_top1": val_top1,
        "epoch": 1,
    }


def write_campaign(
    root: Path,
    name: str,
    counts: Counts,
    sites: dict[tuple[str, str, str], int],
    models: dict[str, dict[str, Any]] | None,
    *,
    images: int = 8,
    top2diff: dict[str, float] | None = None,
    images_per_fault: int = 1,
) -> str:
    """Write campaign ``root/name`` and return its folder. Layers are planned (and so ordered)
    as ``sites`` lists them; each (model, kind, layer) is one shard. In a stratum the first
    ``sdc`` trials are the SDCs, and consecutive runs of ``images_per_fault`` trials share one
    fault index (a cluster). ``models=None`` writes a manifest from before the ``models``
    field. Golden Top2Diff is ``top2diff[model]`` (default 50) for every image."""
    store = Store.open(str(root), name)
    for shard, (model, kind, layer) in enumerate(sites):
        strata = {
            bit: n_k
            for (m, k, lay, bit), n_k in counts.items()
            if (m, k, lay) == (model, kind, layer)
        }
        store.write_table(
            store.shard_path(model, kind, shard), _rows(strata, layer, shard, images_per_fault)
        )
    model_names = list(dict.fromkeys(model for model, _, _ in sites))
    for model in model_names:
        golden = {
            "image": list(range(images)),
            "label": [0] * images,
            "golden_top1": [0] * images,
            "confidence": [0.9] * images,
            "top2diff": [(top2diff or {}).get(model, 50.0)] * images,
        }
        store.write_table(store.golden_path(model), pa.table(golden, schema=GOLDEN_SCHEMA))
    manifest: dict[str, Any] = {
        "layout": LAYOUT,
        "status": "complete",
        "spec": {
            "name": name,
            "models": [{"name": m, "checkpoint": f"/nonexistent/{m}"} for m in model_names],
            "kinds": list(dict.fromkeys(kind for _, kind, _ in sites)),
            "formats": ["fp32"],
            "bits": sorted({bit for *_, bit in counts}),
            "sampling": "per_stratum",
            "trials_per_stratum": max(n for n, _ in counts.values()),
            "images": images,
            "image_selection": "every_model_correct",
        },
        "images": list(range(images)),
        "plan": {
            "shards": len(sites),
            "trials": sum(n for n, _ in counts.values()),
            "shard_list": [
                {"id": i, "model": m, "kind": k, "layer": lay, "fmt": "fp32", "sites": size}
                for i, ((m, k, lay), size) in enumerate(sites.items())
            ],
            "packs": [[i] for i in range(len(sites))],
        },
        "versions": {"bitstorm": "test"},
    }
    if models is not None:
        manifest["models"] = models
    store.write_json(store.manifest_path, manifest)
    return store.root


def _rows(
    strata: dict[int, tuple[int, int]], layer: str, shard: int, images_per_fault: int
) -> pa.Table:
    bits, sdc, index = [], [], []
    for bit, (trials, successes) in strata.items():
        bits += [bit] * trials
        sdc += [i < successes for i in range(trials)]
        index += [bit * 10_000 + i // images_per_fault for i in range(trials)]
    sdc_array = np.array(sdc, dtype=bool)
    return trial_table(
        {
            "layer": layer,
            "index": index,
            "bit": bits,
            "format": "fp32",
            "image": [i % images_per_fault for i in range(len(bits))],
            "faulty_top1": sdc_array.astype(np.int32),
            "sdc": sdc_array,
            "non_finite": False,
            "top2diff": 10.0,
            "value_before": 1.0,
            "value_after": 2.0,
            "shard": shard,
        }
    )  # golden top-1 is 0 for every image: faulty_top1 1 is an SDC


@pytest.fixture
def synthetic_campaign(tmp_path: Path) -> Callable[..., str]:
    """``write_campaign`` under this test's tmp_path."""

    def write(name: str, counts: Counts, sites, models, **options) -> str:
        return write_campaign(tmp_path, name, counts, sites, models, **options)

    return write


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A linear-head and a random-text-head tiny CNN (10 classes), saved as bitstorm saves them."""
    folder = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for head in ("linear", "text_random"):
        cfg = TrainConfig(backbone="tiny_cnn", head=head, dataset="synthetic", embedding_dim=16)
        model = build_model("tiny_cnn", head, 10, embedding_dim=16, seed=1)
        paths[head] = str(
            save_checkpoint(
                folder / head,
                model,
                cfg,
                epoch=1,
                history=[],
                class_names=tuple(f"class{i}" for i in range(10)),
            )
        )
    return paths

"""A Ray Tune sweep over head initialisations on tiny data, with ASHA, end to end."""

import pytest

from bitstorm.errors import ConfigError
from trainers.checkpoint import load_checkpoint
from trainers.tune import SweepConfig, load_sweep, run_sweep, summarise


def test_sweep_over_four_head_kinds(ray_local, tmp_path):
    sweep = SweepConfig(
        base="digits_text",
        overrides={
            "backbone": "tiny_cnn",
            "dataset": "synthetic",
            "synthetic_size": 200,
            "epochs": 3,
            "batch_size": 32,
            "schedule": "constant",
        },
        variants={
            "linear": {"head": "linear"},
            "text_templates": {"head": "text", "descriptions": "templates"},
            "text_random": {"head": "text_random", "embedding_dim": 32},
            "text_orthogonal": {"head": "text_orthogonal", "embedding_dim": 32},
        },
        lrs=[0.05],
        grace_period=1,
        max_concurrent_trials=2,
        output=str(tmp_path),
        name="tiny",
    )
    results = run_sweep(sweep)
    table, best = summarise(results, sweep)
    rows = table.strip().splitlines()
    assert rows[0].startswith("variant,lr,epoch,val_top1") and len(rows) == 1 + 4
    assert set(best) == {"linear", "text_templates", "text_random", "text_orthogonal"}
    for variant, row in best.items():
        _, cfg = load_checkpoint(row["checkpoint"])
        assert cfg.head == ("text" if variant == "text_templates" else variant)
        assert 1 <= row["epoch"] <= 3 and 0 <= row["val_top1"] <= 1
    # The templates variant built its class embeddings once, on the driver, from the st encoder.
    built = list((tmp_path / "embeddings").glob("synthetic-templates-*.safetensors"))
    assert len(built) == 1
    # A rerun of the same sweep is Tuner.restore: the finished trials come back, none reruns.
    again = run_sweep(sweep)
    assert sorted(r.metrics["trial_id"] for r in again) == sorted(
        r.metrics["trial_id"] for r in results
    )
    assert summarise(again, sweep)[0] == table


def test_shipped_sweep_and_validation():
    sweep = load_sweep("digits")
    assert {
        "linear",
        "text",
        "text_templates",
        "text_random",
        "text_orthogonal",
        "text_frozen",
    } <= set(sweep.variants)
    with pytest.raises(ConfigError, match="trial_mode 'local' is not one of function, train"):
        load_sweep("digits", ["trial_mode=local"])
    with pytest.raises(ConfigError, match="at least one variant"):
        load_sweep("digits", ["lrs=[]"])

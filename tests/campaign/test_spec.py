"""Campaign spec validation: the sequential-sampling shorthand and its limits, with errors that
name the field."""

import pytest
import yaml

from bitstorm.errors import ConfigError
from campaign.spec import CampaignSpec, load_spec

MODELS = [{"name": "m", "checkpoint": "/nonexistent/m"}]


def _load(tmp_path, **fields):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"models": MODELS} | fields))
    return load_spec(path)


def test_a_margin_mapping_means_sequential_sampling(tmp_path):
    spec = _load(tmp_path, sampling={"margin": 0.005, "confidence": 0.99})
    assert spec.sampling == "sequential"
    assert spec.margin == 0.005 and spec.confidence == 0.99
    # The same campaign as spelling the fields out, so both share results folders.
    spelled = _load(tmp_path, sampling="sequential", margin=0.005, confidence=0.99)
    assert spelled == spec and spelled.fingerprint() == spec.fingerprint()
    # One key keeps the other's default; integers are numbers too.
    only_margin = CampaignSpec(models=MODELS, sampling={"margin": 0.02})
    assert only_margin.sampling == "sequential" and only_margin.margin == 0.02
    assert only_margin.confidence == CampaignSpec(models=MODELS).confidence
    assert isinstance(CampaignSpec(models=MODELS, sampling={"confidence": 0.9}).margin, float)


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ({"margin": 0.01, "confidance": 0.95}, r"sampling: a mapping takes margin and confidence"),
        ({"trials": 100}, r"sampling: .*\['trials'\]"),
        ({}, r"sampling: a mapping takes margin and confidence"),
        ({"margin": "0.01"}, r"sampling\.margin must be a number, got '0.01'"),
        ({"confidence": True}, r"sampling\.confidence must be a number"),
        ({"margin": None}, r"sampling\.margin must be a number"),
        ({"margin": 1.5}, r"margin and confidence must lie strictly between 0 and 1"),
        ({"confidence": 0}, r"margin and confidence must lie strictly between 0 and 1"),
        ("adaptive", r"sampling: 'adaptive' is not one of per_stratum, exhaustive"),
    ],
)
def test_bad_sampling_is_refused_naming_the_field(tmp_path, sampling, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, sampling=sampling)


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_trials", 0), ("max_trials", -5), ("max_rounds", 0), ("max_rounds", -1)],
)
def test_trial_and_round_limits_must_be_positive(field, value):
    with pytest.raises(ConfigError, match=rf"{field} must be positive, got {value}"):
        CampaignSpec(models=MODELS, sampling={"margin": 0.01}, **{field: value})
    spec = CampaignSpec(models=MODELS, sampling={"margin": 0.01}, **{field: 1})
    assert getattr(spec, field) == 1


def test_old_and_misplaced_sampling_fields_are_explained():
    with pytest.raises(ConfigError, match="'margin' is now 'leveugle'"):
        CampaignSpec(models=MODELS, sampling="margin")
    with pytest.raises(ConfigError, match="max_trials applies to sequential sampling only"):
        CampaignSpec(models=MODELS, max_trials=1000)


def test_more_rounds_continue_the_same_campaign_but_a_budget_does_not():
    base = CampaignSpec(models=MODELS, sampling={"margin": 0.01})
    more_rounds = CampaignSpec(models=MODELS, sampling={"margin": 0.01}, max_rounds=80)
    budget = CampaignSpec(models=MODELS, sampling={"margin": 0.01}, max_trials=5000)
    assert more_rounds.fingerprint() == base.fingerprint()  # a rerun with more rounds resumes
    assert budget.fingerprint() != base.fingerprint()  # a budget changes earlier rounds

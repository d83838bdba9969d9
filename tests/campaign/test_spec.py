"""Campaign spec validation: the sequential-sampling shorthand and its limits, with errors that
name the field."""

import pytest
import yaml

from bitstorm.errors import ConfigError
from campaign.spec import CampaignSpec, ModelEntry, Resources, load_spec

MODELS = [{"name": "m", "checkpoint": "/nonexistent/m"}]


def _load(tmp_path, **fields):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"models": MODELS} | fields))
    return load_spec(path)


def _parse(**fields):
    return CampaignSpec.parse({"models": MODELS} | fields)


def test_a_margin_mapping_means_sequential_sampling(tmp_path):
    spec = _load(tmp_path, sampling={"margin": 0.005, "confidence": 0.99})
    assert spec.sampling == "sequential"
    assert spec.margin == 0.005 and spec.confidence == 0.99
    # The same campaign as spelling the fields out, so both share results folders.
    spelled = _load(tmp_path, sampling="sequential", margin=0.005, confidence=0.99)
    ids = {"m": "weights"}
    assert spelled == spec and spelled.fingerprint(ids) == spec.fingerprint(ids)
    # One key keeps the other's default; integers are numbers too.
    only_margin = _parse(sampling={"margin": 0.02})
    assert only_margin.sampling == "sequential" and only_margin.margin == 0.02
    assert only_margin.confidence == _parse().confidence
    assert isinstance(_parse(sampling={"confidence": 0.9}).margin, float)


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (
            {"margin": 0.01, "confidance": 0.95},
            r"sampling: a mapping takes margin, relative_margin, confidence",
        ),
        ({"trials": 100}, r"sampling: .*\['trials'\]"),
        ({}, r"sampling: a mapping takes margin, relative_margin, confidence"),
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
        _parse(sampling={"margin": 0.01}, **{field: value})
    spec = _parse(sampling={"margin": 0.01}, **{field: 1})
    assert getattr(spec, field) == 1


def test_old_and_misplaced_sampling_fields_are_explained():
    with pytest.raises(ConfigError, match="'margin' is now 'leveugle'"):
        _parse(sampling="margin")
    with pytest.raises(ConfigError, match="max_trials applies to sequential sampling only"):
        _parse(max_trials=1000)


def test_more_rounds_continue_the_same_campaign_but_a_budget_does_not():
    ids = {"m": "weights"}
    base = _parse(sampling={"margin": 0.01})
    more_rounds = _parse(sampling={"margin": 0.01}, max_rounds=80)
    budget = _parse(sampling={"margin": 0.01}, max_trials=5000)
    assert more_rounds.fingerprint(ids) == base.fingerprint(ids)  # more rounds resume
    assert budget.fingerprint(ids) != base.fingerprint(ids)  # a budget changes earlier rounds


def test_moving_folders_does_not_change_the_fingerprint_but_other_weights_do():
    """Where a campaign runs (folders, data root, resources) is not what it measures; the
    models enter by the content of their weights, not by their paths."""
    ids = {"m": "weights"}
    spec = _parse()
    moved = _parse(
        models=[{"name": "m", "checkpoint": "/elsewhere/m"}],
        output="/mnt/other",
        data_root="/mnt/data",
        resources={"actors": 8, "gpus_per_actor": 1},
    )
    assert moved.fingerprint(ids) == spec.fingerprint(ids)
    assert spec.fingerprint({"m": "other weights"}) != spec.fingerprint(ids)
    assert _parse(images=64).fingerprint(ids) != spec.fingerprint(ids)


def test_the_spec_is_typed_once(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"models": MODELS, "resources": {"actors": 3}}))
    spec = load_spec(path, ["resources.cpus_per_actor=2", "images=32"])
    assert isinstance(spec.models[0], ModelEntry) and spec.models[0].checkpoint == "/nonexistent/m"
    assert spec.resources == Resources(actors=3, cpus_per_actor=2.0)
    assert spec.images == 32
    with pytest.raises(ConfigError, match=r"resources\.actors=\.\.\."):
        _parse(actors=4)  # the old, flat place of a resource field
    with pytest.raises(ConfigError, match=r"resources\.actors must be positive"):
        _parse(resources={"actors": 0})
    with pytest.raises(ConfigError, match=r"unknown field 'gpus'"):
        _parse(resources={"gpus": 1})


def test_a_protocol_fills_every_choice_left_out_and_a_spec_may_override_each():
    goldeneye = _parse(protocol="goldeneye")
    assert (goldeneye.range_restriction, goldeneye.non_finite_sdc) == (True, False)
    assert (goldeneye.image_selection, goldeneye.overall) == ("own_correct", "layer_mean")
    assert (goldeneye.allocation, goldeneye.top2diff_images) == ("equal", "validation")
    default = _parse()
    assert default.protocol == "bitstorm" and default.range_restriction is False
    assert default.overall == "fault_space" and default.image_selection == "every_model_correct"
    mixed = _parse(protocol="goldeneye", range_restriction=False, overall="fault_space")
    assert mixed.range_restriction is False and mixed.overall == "fault_space"
    assert mixed.non_finite_sdc is False  # the rest still the protocol's
    # Every resolved choice is measured: switching one changes the fingerprint.
    ids = {"m": "sha"}
    assert mixed.fingerprint(ids) != goldeneye.fingerprint(ids)
    assert _parse(protocol="goldeneye", non_finite_sdc=False).fingerprint(ids) == (
        goldeneye.fingerprint(ids)
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"protocol": "pytorchfi"}, r"protocol: 'pytorchfi' is not one of goldeneye, bitstorm"),
        ({"overall": "pooled"}, r"overall: 'pooled' is not one of fault_space, layer_mean"),
        ({"image_selection": "best"}, r"image_selection: 'best' is not one of"),
        ({"clamp": True}, r"clamp: replaced by range_restriction: true"),
        ({"golden_correct_only": False}, r"golden_correct_only: replaced by image_selection"),
        ({"profile_images": 0}, r"profile_images must be positive"),
        ({"relative_margin": 1.5}, r"relative_margin must lie strictly between 0 and 1"),
    ],
)
def test_bad_protocol_choices_are_refused_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        _parse(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "../../x"}, r"name: '\.\./\.\./x' is not a safe name"),
        ({"name": "a b"}, r"name: 'a b' is not a safe name"),
        ({"models": [{"name": "li/n", "checkpoint": "/x"}]}, r"models\[\]\.name: 'li/n'"),
        ({"kinds": []}, r"kinds: give at least one"),
        ({"formats": []}, r"formats: give at least one"),
        ({"layers": []}, r"layers: give at least one"),
        ({"bits": []}, r"bits: give at least one bit position"),
    ],
)
def test_unsafe_names_and_empty_lists_are_refused_before_any_work(fields, message):
    with pytest.raises(ConfigError, match=message):
        _parse(**fields)


def test_an_output_uri_pyarrow_cannot_open_is_refused(tmp_path):
    from campaign.store import Store

    with pytest.raises(ConfigError, match=r"'foo://x': pyarrow opens no file system"):
        Store.open("foo://x", "c")
    assert Store.open(str(tmp_path / "a:b"), "c").root.endswith("a:b/c")  # a folder, not a URI

"""Description sources and the cleaning of messy, real language-model output."""

import json

import pytest

from bitstorm.errors import ConfigError, DataError
from embeddings.classes import class_names
from embeddings.descriptions import (
    TEMPLATES,
    clean_descriptions,
    description_hash,
    read_descriptions,
    shipped_descriptions,
    template_descriptions,
)

from .conftest import shared_file


@pytest.mark.parametrize("class_set", ["digits", "cifar10"])
def test_shipped_descriptions_are_informative(class_set):
    names = class_names(class_set)
    descriptions = clean_descriptions(shipped_descriptions(class_set), names)
    assert list(descriptions) == names
    for name, texts in descriptions.items():
        assert len(texts) >= 5 and len({t.casefold() for t in texts}) == len(texts)
        assert all(len(t.split()) >= 8 for t in texts), name  # sentences, not labels
        assert not any(t.format("x") in {tpl.format("x") for tpl in TEMPLATES} for t in texts)


def test_shipped_descriptions_only_where_written():
    with pytest.raises(ConfigError, match="templates, llm"):
        shipped_descriptions("cifar100")


def test_templates_use_readable_names():
    texts = template_descriptions(["aquarium_fish"])["aquarium_fish"]
    assert texts[0] == "a photo of a aquarium fish." and len(texts) == len(TEMPLATES)


def test_cleaning_fixes_what_can_be_fixed():
    raw = {
        "Aquarium Fish": ["  A small   fish.", ".", "", "a small fish.", "Bright\nscales "],
        "lawn mower": "A machine that cuts grass.",
        "unrelated": ["ignored"],
    }
    with pytest.warns(UserWarning, match="ignoring 1 classes"):
        cleaned = clean_descriptions(raw, ["aquarium_fish", "lawn_mower"])
    assert cleaned == {
        "aquarium_fish": ["A small fish.", "Bright scales"],
        "lawn_mower": ["A machine that cuts grass."],
    }


def test_cleaning_refuses_missing_classes_by_name():
    with pytest.raises(DataError, match=r"2 of 3 classes: dog, bird"):
        clean_descriptions({"cat": ["a cat"], "dog": [".", " "]}, ["cat", "dog", "bird"])
    with pytest.raises(DataError, match="same class"):
        clean_descriptions({"hot dog": ["x"], "hot_dog": ["y"]}, ["hot_dog"])


def test_description_files_must_have_the_shape(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"cat": "not a list"}))
    with pytest.raises(DataError, match="class_name"):
        read_descriptions(path)
    path.write_text("{broken")
    with pytest.raises(DataError, match="not valid JSON"):
        read_descriptions(path)
    with pytest.raises(DataError, match="cannot read"):
        read_descriptions(tmp_path / "absent.json")


def test_hash_identifies_the_set():
    a = {"cat": ["x", "y"]}
    assert description_hash(a) == description_hash({"cat": ["x", "y"]})
    assert description_hash(a) != description_hash({"cat": ["y", "x"]})


@pytest.mark.parametrize(
    ("file", "class_set", "per_class"),
    [("cifar10_prompts_full.json", "cifar10", 30), ("cifar100_prompts_full.json", "cifar100", 40)],
)
def test_real_cupl_descriptions_clean_up(file, class_set, per_class):
    raw = read_descriptions(shared_file(f"cupl/{file}"))
    names = class_names(class_set)
    cleaned = clean_descriptions(raw, names, file)
    assert list(cleaned) == names  # "aquarium fish" matched "aquarium_fish", and so on
    raw_total = sum(len(v) for v in raw.values())
    clean_total = sum(len(v) for v in cleaned.values())
    assert raw_total == per_class * len(names) and clean_total < raw_total  # duplicates dropped
    for texts in cleaned.values():
        assert all(t == " ".join(t.split()) and any(c.isalnum() for c in t) for t in texts)

"""Class sets in the order the data sets number their labels."""

import pytest

from bitstorm.errors import ConfigError, DataError
from embeddings.classes import CLASS_SETS, class_names, display_name


def test_every_shipped_set_has_the_published_size_and_order():
    sizes = {name: len(class_names(name)) for name in CLASS_SETS}
    assert sizes == {
        "digits": 10,
        "cifar10": 10,
        "cifar100": 100,
        "stl10": 10,
        "food101": 101,
        "imagenet": 1000,
    }
    assert class_names("cifar10")[:3] == ["airplane", "automobile", "bird"]
    assert class_names("stl10")[2] == "car" and class_names("stl10")[7] == "monkey"
    assert class_names("cifar100")[1] == "aquarium_fish" and class_names("cifar100")[-1] == "worm"
    # torchvision sorts Food-101's class folder names: "cheese_plate" < "cheesecake" in ASCII.
    food = class_names("food101")
    assert food == sorted(food) and food.index("cheese_plate") + 1 == food.index("cheesecake")
    assert class_names("imagenet")[:2] == ["tench", "goldfish"]
    assert class_names("digits")[7] == "seven"


def test_a_text_file_of_names(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat\n\n  dog  \nhot_dog\n")
    assert class_names(str(path)) == ["cat", "dog", "hot_dog"]
    path.write_text("cat\ndog\ncat\n")
    with pytest.raises(DataError, match="unique"):
        class_names(str(path))


def test_unknown_set_lists_the_known_ones():
    with pytest.raises(ConfigError, match="digits, cifar10, cifar100, stl10, food101, imagenet"):
        class_names("cifar11")


def test_display_name():
    assert display_name("lawn_mower") == "lawn mower"
    assert display_name(" great  white shark ") == "great white shark"

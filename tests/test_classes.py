"""Class order is the dataset's own label order: a shifted list trains every class under another's label."""

import pytest

from gdd_ray.classes import dataset_classes, load_classes, parse_class_file
from gdd_ray.errors import UserError


def test_cifar100_is_the_alphabetical_fine_label_order_of_meta():
    classes = dataset_classes("cifar100")
    assert len(classes) == 100
    ids = [c.class_id for c in classes]
    assert ids == sorted(ids)  # the meta file's fine_label_names are alphabetical
    assert ids[:5] == ["apple", "aquarium_fish", "baby", "bear", "beaver"]
    assert ids[-3:] == ["wolf", "woman", "worm"]
    assert classes[1].name == "aquarium fish" and classes[1].label == 1
    assert ids.index("maple_tree") == 47 and ids.index("tractor") == 89


def test_cifar10_tiny_imagenet_imagenet_orders():
    assert [c.class_id for c in dataset_classes("cifar10")][:3] == ["airplane", "automobile", "bird"]
    tiny = dataset_classes("tiny-imagenet")
    assert len(tiny) == 200 and tiny[0].class_id == "n01443537" and tiny[0].name == "goldfish"
    assert [c.class_id for c in tiny] == sorted(c.class_id for c in tiny)
    inet = dataset_classes("imagenet-1k")
    assert len(inet) == 1000 and inet[0].class_id == "n01440764" and inet[0].name == "tench"
    assert inet[1].prompt("a photo of a {name}") == "a photo of a goldfish"


def test_class_file_formats(tmp_path):
    classes = parse_class_file("cat\n\n# comment\nn02084071\tdog\nhot_air_balloon\n", "f")
    assert [(c.label, c.class_id, c.name) for c in classes] == [
        (0, "cat", "cat"),
        (1, "n02084071", "dog"),
        (2, "hot_air_balloon", "hot air balloon"),
    ]
    f = tmp_path / "c.txt"
    f.write_text("a\nb\n")
    assert [c.class_id for c in load_classes(None, str(f))] == ["a", "b"]


@pytest.mark.parametrize(
    "text, msg", [("", "lists no classes"), ("\n# x\n", "lists no classes"), ("a\na\n", "duplicate")]
)
def test_bad_class_files(text, msg):
    with pytest.raises(UserError, match=msg):
        parse_class_file(text, "f")


def test_unreadable_class_file(tmp_path):
    with pytest.raises(UserError, match="cannot read it"):
        load_classes(None, str(tmp_path / "missing.txt"))

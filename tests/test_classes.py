"""Class order is the dataset's own label order: a shifted list trains every class under another's label."""

import pytest

from gdd_ray.classes import check_prompts, dataset_classes, load_classes, parse_class_file, template_fields
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


# ---- prompts with context (descriptions, collisions) ----------------------------------------------

SHIPPED = ("cifar10", "cifar100", "tiny-imagenet", "imagenet-1k")
TEMPLATES = ("{name}", "{desc}", "a photo of a {name}", "a photo of {desc}")


def _canonical(text):
    return " ".join(text.casefold().split())


@pytest.mark.parametrize("dataset", SHIPPED)
@pytest.mark.parametrize("template", TEMPLATES)
def test_no_two_classes_of_a_shipped_list_share_a_prompt(dataset, template):
    classes = dataset_classes(dataset)
    prompts = [_canonical(c.prompt(template)) for c in classes]
    assert len(set(prompts)) == len(classes), [p for p in prompts if prompts.count(p) > 1][:10]
    check_prompts(classes, template, dataset)  # the refusal agrees


@pytest.mark.parametrize("dataset", ("tiny-imagenet", "imagenet-1k"))
def test_every_imagenet_class_has_a_description_that_names_it(dataset):
    for c in dataset_classes(dataset):
        assert c.description, c
        assert c.description.casefold().startswith(("a ", "an ", c.name.casefold()[:4])) or "," in c.description, c


# The known collisions and ambiguities of ImageNet-1K's first WordNet lemma: each wnid's prompt must say
# which sense it is. (wnid, words its {desc} must contain)
AMBIGUOUS = [
    ("n02012849", ["crane", "bird"]),
    ("n03126707", ["crane", "machine"]),
    ("n03710637", ["maillot", "tights"]),
    ("n03710721", ["swimsuit"]),
    ("n02113186", ["corgi", "dog"]),
    ("n02963159", ["cardigan", "sweater"]),
    ("n01608432", ["kite", "bird of prey"]),
    ("n01847000", ["drake", "duck"]),
    ("n02123159", ["tiger cat", "domestic"]),
    ("n04355933", ["sunglass", "burning glass"]),
    ("n04356056", ["sunglasses", "dark glasses"]),
    ("n03773504", ["missile", "rocket"]),
    ("n04008634", ["projectile", "flying"]),
    ("n03793489", ["mouse", "computer"]),
    ("n03642806", ["laptop"]),
    ("n03832673", ["notebook", "computer"]),
    ("n02879718", ["bow", "arrows"]),
    ("n03014705", ["chest", "box"]),
]


def test_known_ambiguous_imagenet_classes_are_described_by_their_sense():
    by_id = {c.class_id: c for c in dataset_classes("imagenet-1k")}
    for wnid, words in AMBIGUOUS:
        desc = by_id[wnid].prompt("{desc}").casefold()
        assert all(w in desc for w in words), (wnid, desc)
    # the two cranes and the two maillots had the same first lemma: their names differ now too
    assert by_id["n02012849"].name != by_id["n03126707"].name
    assert by_id["n03710637"].name != by_id["n03710721"].name
    assert by_id["n02113186"].name.casefold() != by_id["n02963159"].name.casefold()


def test_tiny_imagenet_shares_imagenet_descriptions():
    inet = {c.class_id: c for c in dataset_classes("imagenet-1k")}
    tiny = dataset_classes("tiny-imagenet")
    assert all((c.name, c.description) == (inet[c.class_id].name, inet[c.class_id].description) for c in tiny)
    cardigan = next(c for c in tiny if c.class_id == "n02963159")
    assert "sweater" in cardigan.prompt("{desc}")


def test_three_column_class_file_and_desc_fallback():
    classes = parse_class_file("n1\tkite\ta kite, a bird of prey\nn2\tkite toy\nbox\n", "f")
    assert [(c.name, c.description, c.line) for c in classes] == [
        ("kite", "a kite, a bird of prey", 1),
        ("kite toy", "", 2),
        ("box", "", 3),
    ]
    assert [c.prompt("{desc}") for c in classes] == ["a kite, a bird of prey", "kite toy", "box"]
    assert classes[0].prompt("a photo of {name}") == "a photo of kite"
    with pytest.raises(UserError, match="line 1 has 4 tab-separated columns"):
        parse_class_file("a\tb\tc\td\n", "f")


def test_colliding_prompts_are_refused_naming_the_lines():
    text = "# header\nn1\tcrane\ta crane, a bird\nn2\tcrane\ta crane, a machine\nn3\tKite\nn4\tkite\n"
    classes = parse_class_file(text, "f")
    with pytest.raises(UserError) as e:
        check_prompts(classes, "a photo of a {name}", "--classes f")
    msg = str(e.value)
    assert "--classes f: 2 prompt(s)" in msg
    assert "line 2 (label 0) and line 3 (label 1) give 'a photo of a crane'" in msg
    assert "line 4 (label 2) and line 5 (label 3)" in msg  # case and spacing do not make prompts differ
    assert "--allow-duplicate-prompts" in msg
    with pytest.raises(UserError, match="line 4 .* and line 5"):
        check_prompts(classes, "{desc}", "f")  # the cranes' descriptions differ; the kites have none
    check_prompts(classes[:2], "{desc}", "f")


@pytest.mark.parametrize("template, msg", [("a photo", "must contain {name} or {desc}"), ("{name", "not a valid")])
def test_bad_templates(template, msg):
    with pytest.raises(UserError, match=msg):
        template_fields(template)
    assert template_fields("{desc} in {name}") == {"desc", "name"}

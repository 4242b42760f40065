"""Several prompt templates (--prompt-templates): one per image from its own seed, stored per row, cached per
(class, template), checked like one template, and part of the generate fingerprint."""

from collections import Counter

import numpy as np
import pytest
from gen_helpers import three_class_config, tiny_config, tree_digest

from gdd_ray import pipeline, shards, storage
from gdd_ray.classes import ClassInfo, check_prompts, dataset_classes, parse_templates
from gdd_ray.cli import main
from gdd_ray.config_loader import build_config
from gdd_ray.errors import UserError
from gdd_ray.generate.generator import UnitGenerator
from gdd_ray.generate.model import load_pipeline
from gdd_ray.generate.stage import make_job
from gdd_ray.plan import WorkUnit, template_choice

TEMPLATES = ["a photo of a {name}", "a drawing of a {name}", "{desc}, close-up"]


def test_template_choice_is_per_image_deterministic_and_spread():
    picks = [template_choice(0, label, i, 3) for label in range(10) for i in range(60)]
    assert picks == [template_choice(0, label, i, 3) for label in range(10) for i in range(60)]
    counts = Counter(picks)
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 150  # 600 images over 3: none starved
    assert {template_choice(0, 3, i, 1) for i in range(50)} == {0}  # one template: always it
    assert picks != [template_choice(1, label, i, 3) for label in range(10) for i in range(60)]  # the run seed


def test_template_file_parsing():
    text = "# templates\n\na photo of a {name}\n  {desc}, close-up  \n# done\n"
    assert parse_templates(text, "f") == ("a photo of a {name}", "{desc}, close-up")
    for bad, message in [
        ("a {name}\na {colour}\n", "f: line 2: 'a {colour}': {colour} is not allowed"),
        ("a {name}\na photo\n", "f: line 2: must contain {name} or {desc}"),
        ("a {name}\n{name:>9}\n", "line 2"),
        ("a {name}\na {name}\n", "line 2 repeats the template"),
        ("# nothing\n\n", "lists no templates"),
    ]:
        with pytest.raises(UserError, match=None) as e:
            parse_templates(bad, "f")
        assert message in str(e.value), str(e.value)


def test_file_and_yaml_list_give_the_same_config_and_one_template_flag_excludes_them(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n".join(TEMPLATES) + "\n")
    base = dict(dataset="cifar10", ipc=2, out=str(tmp_path / "run"))
    from_file = build_config({**base, "prompt_templates": str(f)})
    y = tmp_path / "c.yaml"
    y.write_text("prompt_templates:\n" + "".join(f"  - '{t}'\n" for t in TEMPLATES))
    from_yaml = build_config(base, str(y))
    assert from_file.generate.templates == from_yaml.generate.templates == tuple(TEMPLATES)
    assert build_config(base).generate.templates == ("{name}",)
    with pytest.raises(UserError, match="not both"):
        build_config({**base, "prompt_templates": str(f), "prompt_template": "a {name}"})
    with pytest.raises(UserError, match="item 2: must contain"):
        build_config({**base, "prompt_templates": ["a {name}", "oops"]})


def test_collisions_count_every_class_template_pair():
    classes = [ClassInfo(0, "cat", "cat"), ClassInfo(1, "a cat", "a cat"), ClassInfo(2, "dog", "dog")]
    check_prompts(classes, ("{name}",), "f")  # one template: all distinct
    with pytest.raises(
        UserError, match=r"line 1 \(label 0\) with 'a {name}' and line 2 \(label 1\) with '{name}' give 'a cat'"
    ):
        check_prompts(classes, ("{name}", "a {name}"), "f")  # cat under 'a {name}' is 'a cat' under '{name}'
    same_class = [ClassInfo(0, "cat", "cat"), ClassInfo(1, "dog", "dog")]
    check_prompts(same_class, ("{name}", "{desc}"), "f")  # one class giving one text twice is no collision


def test_fingerprint_follows_the_list_contents(tmp_path):
    base = dict(dataset="cifar10", ipc=2, out=str(tmp_path / "run"), model="tiny")

    def generate_fp(**values):
        ctx, inputs = pipeline.context(build_config({**base, **values}))
        return ctx.fingerprint("generate"), inputs["generate"]

    plain, plain_inputs = generate_fp()
    assert "prompt_templates" not in plain_inputs  # runs without a list keep their fingerprint
    two, inputs = generate_fp(prompt_templates=TEMPLATES[:2])
    assert inputs["prompt_templates"] == TEMPLATES[:2]
    assert len({plain, two, generate_fp(prompt_templates=TEMPLATES)[0]}) == 3
    assert generate_fp(prompt_templates=TEMPLATES[1::-1])[0] != two  # the order decides which image gets which
    assert generate_fp(prompt_templates=TEMPLATES[:2])[0] == two


def test_changing_the_list_on_resume_is_refused(tmp_path, tiny_model):
    from gdd_ray.generate import stage as gen_stage

    cfg = three_class_config(tmp_path / "run", ipc=2, prompt_templates=TEMPLATES[:2])
    gen_stage.run(pipeline.check(cfg), serial=True)
    before = tree_digest(tmp_path / "run")
    with pytest.raises(UserError, match="prompt-templates"):
        pipeline.check(cfg.replace(**{"generate.prompt_templates": tuple(TEMPLATES)}))
    assert tree_digest(tmp_path / "run") == before
    loc = storage.Location(str(tmp_path / "run" / "generated"))
    table = shards.read_shards(loc, loc.list(".parquet"), columns=["label", "index", "prompt"])
    classes = pipeline.context(cfg)[0].classes
    for label, index, prompt in zip(*(table[c].to_pylist() for c in ("label", "index", "prompt"))):
        assert prompt == classes[label].prompt(TEMPLATES[template_choice(0, label, index, 2)])


def _generator(tmp_path, pipe, name, **overrides):
    cfg = tiny_config(tmp_path / name, **{"unit_size": 4, **overrides})
    job = make_job(cfg, dataset_classes("cifar10"), "fp-test", str(tmp_path / name / "generated"))
    return UnitGenerator(job, pipeline=pipe)


def _rows(gen, units) -> dict[tuple[int, int], tuple[str, np.ndarray]]:
    out = {}
    for unit in units:
        gen.run(unit)
        t = shards.read_shard(gen.out, unit.shard_name)
        for label, index, prompt, img in zip(t["label"].to_pylist(), t["index"].to_pylist(), t["prompt"].to_pylist(),
                                             shards.png_bytes(t)):  # fmt: skip
            out[(label, index)] = (prompt, shards.decode_png(img).astype(int))
    return out


@pytest.mark.slow  # six generators on the tiny model
def test_per_image_template_independent_of_batching_and_units_and_matches_its_prompt(tmp_path, tiny_model):
    pipe = load_pipeline("tiny", device="cpu")
    calls = []
    original = pipe.encode_prompt
    pipe.encode_prompt = lambda *a, **k: calls.append(list(a[0])) or original(*a, **k)
    grids = {  # (batch size, units covering the grid's first 12 images, which use all three templates)
        "b1": (1, [WorkUnit(0, 6, 10), WorkUnit(6, 12, 10)]),
        "b2": (2, [WorkUnit(0, 12, 10)]),
        "b4": (4, [WorkUnit(0, 4, 10), WorkUnit(4, 8, 10), WorkUnit(8, 12, 10)]),
    }
    seen = {}
    for name, (batch, units) in grids.items():
        gen = _generator(tmp_path, pipe, name, batch_size=batch, prompt_templates=TEMPLATES)
        seen[name] = _rows(gen, units)
        assert gen.prompts.encoder_calls == 1  # 10 classes x 3 templates: one batched call at start-up
    classes = dataset_classes("cifar10")
    assert calls[0] == [c.prompt(t) for c in classes for t in TEMPLATES]
    prompts = {k: v[0] for k, v in seen["b1"].items()}
    for name in ("b2", "b4"):
        assert {k: v[0] for k, v in seen[name].items()} == prompts
        assert max(np.abs(seen[name][k][1] - seen["b1"][k][1]).max() for k in prompts) <= 1
    used = Counter(prompts[(c, i)] == classes[c].prompt(t) for c, i in prompts for t in TEMPLATES)
    assert used[True] == len(prompts)  # every row's prompt is one of its class's templates
    per_template = Counter(TEMPLATES.index(next(t for t in TEMPLATES if classes[c].prompt(t) == p))
                           for (c, _), p in prompts.items())  # fmt: skip
    assert len(per_template) == 3  # spread, not all one template
    # The pixels are those of the chosen template's own prompt: a one-template run of it draws the same image.
    for t, template in enumerate(TEMPLATES):
        mine = [k for k in prompts if template_choice(0, k[0], k[1], 3) == t]
        if not mine:
            continue
        single = _generator(tmp_path, pipe, f"single{t}", batch_size=2, prompt_template=template)
        alone = _rows(single, [WorkUnit(0, 12, 10)])
        assert all(alone[k][0] == prompts[k] for k in mine)
        assert max(np.abs(alone[k][1] - seen["b2"][k][1]).max() for k in mine) <= 1


def test_bad_template_file_through_the_cli(tmp_path, capsys, tiny_model):
    f = tmp_path / "t.txt"
    f.write_text("a photo of a {name}\na photo of a {name.upper}\n")
    run = tmp_path / "run"
    code = main(["distill", "--dataset", "cifar10", "--ipc", "2", "--out", str(run), "--prompt-templates", str(f)])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert f"--prompt-templates {f}: line 2:" in lines[0] and "{name.upper} is not allowed" in lines[0]
    assert not run.exists()

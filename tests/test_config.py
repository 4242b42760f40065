import dataclasses

import pytest

from gdd_ray.classes import ClassInfo
from gdd_ray.config import SECTIONS
from gdd_ray.config_loader import build_config, config_from_args, options
from gdd_ray.errors import UserError
from gdd_ray.pipeline import generation_fingerprint


def test_defaults_and_flags():
    cfg = config_from_args(["--dataset", "cifar100", "--ipc", "20", "--out", "/tmp/x"])
    assert cfg.generate.model == "stabilityai/sdxl-turbo"
    assert cfg.generate.steps == 1 and cfg.generate.guidance == 0.0 and cfg.generate.gen_resolution == 512
    assert cfg.image_size == 32
    assert cfg.generate.prompt_template == "{name}"
    assert cfg.stages == ("generate", "augment", "train")
    cfg = config_from_args(["--dataset", "tiny-imagenet", "--ipc", "1", "--out", "x", "--stages", "generate"])
    assert cfg.image_size == 64 and cfg.stages == ("generate",)


def test_yaml_keys_match_flags_and_flags_win(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("dataset: cifar10\nipc: 5\nprompt-template: 'a photo of a {name}'\nbatch_size: 4\nout: /tmp/o\n")
    cfg = config_from_args(["--config", str(y), "--ipc", "7"])
    assert cfg.ipc == 7  # flag wins
    assert cfg.generate.prompt_template == "a photo of a {name}"
    assert cfg.generate.batch_size == 4


@pytest.mark.parametrize(
    "values, message",
    [
        ({"dataset": "mnist", "ipc": 1, "out": "x"}, "unknown dataset 'mnist'"),
        ({"dataset": "cifar10", "ipc": 0, "out": "x"}, "--ipc must be at least 1"),
        ({"dataset": "cifar10", "ipc": "two", "out": "x"}, "'ipc' must be an integer"),
        ({"dataset": "cifar10", "ipc": 1}, "--out is required"),
        ({"ipc": 1, "out": "x"}, "give --dataset"),
        ({"dataset": "cifar10", "ipc": 1, "out": "x", "stages": "generate,fly"}, "unknown stage(s) fly"),
        ({"dataset": "cifar10", "ipc": 1, "out": "x", "prompt_template": "a photo"}, "must contain {name}"),
        ({"dataset": "cifar10", "ipc": 1, "out": "x", "gen_resolution": 100}, "multiple of 8"),
        ({"dataset": "cifar10", "ipc": 1, "out": "x", "image_size": 1024}, "--image-size must be between"),
        ({"dataset": "cifar10", "ipc": 1, "out": "x", "bogus": 1}, "unknown option(s) bogus"),
        ({"dataset": "cifar10", "ipc": True, "out": "x"}, "'ipc' must be an integer"),
        ({"dataset": "cifar10", "ipc": 1, "out": "x", "lr": "nan"}, "'lr' must be a finite number"),
        ({"dataset": "cifar10", "ipc": 1, "out": "x", "net_norm": "layer"}, "unknown net-norm 'layer'"),
    ],
)
def test_bad_values_are_one_clear_error(values, message):
    with pytest.raises(UserError) as e:
        build_config(values)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_fingerprint_covers_pixels_not_layout():
    base = build_config({"dataset": "cifar10", "ipc": 5, "out": "x"})
    names = [ClassInfo(0, "a", "a"), ClassInfo(1, "b", "b")]
    fp = generation_fingerprint(base, names)
    assert generation_fingerprint(base.replace(ipc=50, **{"generate.batch_size": 2}), names) == fp
    assert generation_fingerprint(base.replace(**{"generate.workers": 8}), names) == fp
    for change in [
        {"seed": 1},
        {"generate.steps": 2},
        {"generate.prompt_template": "a {name}"},
        {"generate.model": "m"},
    ]:
        assert generation_fingerprint(base.replace(**change), names) != fp, change
    assert generation_fingerprint(base, names[::-1]) != fp


def test_local_paths_become_absolute_uris_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = build_config({"dataset": "cifar10", "ipc": 1, "out": "runs/x", "eval_data": "data/c10"})
    assert cfg.out == str(tmp_path / "runs" / "x") and cfg.train.eval_data == str(tmp_path / "data" / "c10")
    assert build_config({"dataset": "cifar10", "ipc": 1, "out": "s3://b/run"}).out == "s3://b/run"


def test_descriptions_decide_the_fingerprint_only_when_the_template_uses_them():
    base = build_config({"dataset": "cifar10", "ipc": 5, "out": "x"})
    plain = [ClassInfo(0, "a", "a"), ClassInfo(1, "b", "b")]
    described = [ClassInfo(0, "a", "a", "an a, the letter"), ClassInfo(1, "b", "b", "a b, the letter")]
    assert generation_fingerprint(base, described) == generation_fingerprint(base, plain)
    with_desc = base.replace(**{"generate.prompt_template": "a photo of {desc}"})
    assert generation_fingerprint(with_desc, described) != generation_fingerprint(with_desc, plain)


def test_colliding_class_list_is_refused_unless_allowed(tmp_path):
    from gdd_ray import pipeline

    f = tmp_path / "classes.tsv"
    f.write_text("n1\tcrane\ta crane, a wading bird\nn2\tcrane\ta crane, a lifting machine\n")
    values = {"classes": str(f), "ipc": 1, "out": str(tmp_path / "out")}
    with pytest.raises(UserError, match=r"line 1 \(label 0\) and line 2 \(label 1\) give 'crane'"):
        pipeline.context(build_config(values))
    ctx, _ = pipeline.context(build_config({**values, "allow_duplicate_prompts": True}))
    assert len(ctx.classes) == 2
    ctx, _ = pipeline.context(build_config({**values, "prompt_template": "a photo of {desc}"}))
    assert ctx.classes[1].prompt(ctx.cfg.generate.prompt_template) == "a photo of a crane, a lifting machine"
    assert not (tmp_path / "out").exists()  # the check writes nothing


def test_every_field_is_an_option_and_no_flag_is_a_section_name():
    # A field named like a section (train's --select vs the select stage's section) once vanished from the
    # flags and YAML keys: every field of every section is an option, and each option name is unique.
    names = [o.name for o in options()]
    fields = [f.name for klass in SECTIONS.values() for f in dataclasses.fields(klass)]
    assert len(names) == len(set(names))
    assert set(fields) <= set(names) and not set(names) & set(SECTIONS)


def test_the_names_of_the_last_release_still_work_for_one_release(tmp_path, capsys):
    """The challenge's pick was `--select` and the select stage's config section `clip`: a flag, a YAML key or a
    run.json of that release is read under today's name, with one line saying so; both names at once is refused."""
    from gdd_ray.config import RunConfig
    from gdd_ray.config_loader import config_from_args

    base = ["--dataset", "cifar10", "--ipc", "2", "--out", str(tmp_path / "run")]
    assert config_from_args([*base, "--select", "spread"]).train.pick == "spread"
    assert "--select is now --pick" in capsys.readouterr().out
    yaml = tmp_path / "old.yaml"
    yaml.write_text("select: first\n")
    assert config_from_args([*base, "--config", str(yaml)]).train.pick == "first"
    with pytest.raises(UserError, match="--select is the old name of --pick; give only --pick"):
        config_from_args([*base, "--select", "first", "--pick", "spread"])
    old = config_from_args([*base, "--select-by", "clip", "--pick", "first"]).to_dict()
    old["clip"] = old.pop("select")
    old["train"]["select"] = old["train"].pop("pick")
    cfg = RunConfig.from_dict(old)
    assert cfg.select.select_by == "clip" and cfg.train.pick == "first"

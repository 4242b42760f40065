"""Hostile and careless input through the real CLI: each case is one line on stderr (`error: ...`), exit
code 2, no traceback, and the run folder it points at is byte-for-byte untouched (digest before and after).

The cases run `cli.main` in process, as every entry point does; all fail before Ray or the model starts."""

from __future__ import annotations

import json

import pytest
from gen_helpers import tree_digest, write_generated

from gdd_ray.classes import folder_names
from gdd_ray.cli import main
from gdd_ray.errors import UserError

BASE = ["--ipc", "1", "--model", "tiny", "--stages", "generate"]


@pytest.fixture
def existing_run(tmp_path):
    """A folder that looks like a finished run (what bad input must not touch)."""
    run = tmp_path / "run"
    (run / "generated").mkdir(parents=True)
    (run / "generated" / "c00000-i000000-000002.parquet").write_bytes(b"precious")
    (run / "generated" / "_manifest.json").write_text("{}")
    (run / "run.json").write_text('{"fingerprints": {"generate": "0000"}, "config": {"seed": 5}}')
    return run


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def exit_code(argv: list[str]) -> int:
    """main's exit code, a flag the parser refuses (SystemExit(2) after its one line) included."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


ALIAS_BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)

TEMPLATES = [
    ("{name}{0}", "{0} is not allowed"),
    ("{name}{nme}", "{nme} is not allowed"),
    ("{name} {", "literal braces"),
    ("{name} }", "literal braces"),
    ("{name}{name:>100000000}", "{name:>100000000} is not allowed"),
    ("{name.__class__.__mro__}{name}", "{name.__class__.__mro__} is not allowed"),
    ("{name[0]}", "{name[0]} is not allowed"),
    ("{name!r}", "{name!r} is not allowed"),
    ("a photo", "must contain {name}"),
    ("{{name}}", "must contain {name}"),
    ("x" * 1001 + "{name}", "at most 1000"),
    ("{name}\nfoo", "control or format characters"),
]

NUMBERS = [
    (["--ipc", "1000000000000"], "--ipc must be at most"),
    (["--ipc", "nan"], "'ipc' must be an integer"),
    (["--ipc", "1.5"], "'ipc' must be an integer"),
    (["--gen-resolution", "100000"], "--gen-resolution must be at most"),
    (["--guidance", "inf"], "'guidance' must be a finite number"),
    (["--guidance", "nan"], "'guidance' must be a finite number"),
    (["--batch-size", "1000000000"], "--batch-size must be at most"),
    (["--unit-size", "0"], "--unit-size must be at least 1"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--seed", str(2**64)], "--seed must be at most"),
    (["--workers", "100000"], "--workers must be at most"),
    (["--image-size", "100000"], "--image-size must be between"),
    (["--ipc", "\u0663"], "'ipc' must be an integer"),  # ARABIC-INDIC DIGIT THREE: int() would take it
    (["--ipc", "1_000"], "'ipc' must be an integer"),
    (["--lr", "1e999"], "'lr' must be a finite number"),
    (["--guidance", "\uff11"], "'guidance' must be a finite number"),  # FULLWIDTH DIGIT ONE
    (["--pda-ops", "[" * 5000 + "]" * 5000], "nests deeper than 32 levels"),
    (["--pda-ops", '{"hflip": {"p": NaN}}'], "not valid JSON"),
    (["--pda-ops", '{"hflip": {"p": 2}}'], "pda-ops: hflip.p must be a number in [0.0, 1.0]"),  # at start, no augment
    (["--model", "x" * 5000], "at most 4096 characters"),
]

YAMLS = [
    (ALIAS_BOMB, "aliases"),
    ("ipc: true\n", "'ipc' must be an integer"),
    ("ipc: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("ipc: [1, 2]\n", "'ipc' must be an integer"),
    ("stages: 5\n", "comma-separated list"),
    ("ipc: 1\nipc: 2\n" + "#" * (2**20), "larger than 1 MiB"),
    ("ipc: 1\nbogus-key: 3\n", "unknown option(s) bogus-key"),
    ("ipc: 2\nipc: 3\n", "the key 'ipc' is given twice (line 2)"),
    (
        "prompt-template: '{name}'\nprompt_template: 'a {name}'\n",
        "'prompt-template' and 'prompt_template' are the same option",
    ),
    ("pda-ops: {hflip: {p: 0.5}, hflip: {p: 0.1}}\n", "the key 'hflip' is given twice"),
    ("prompt_templates: [['{name}']]\n", "'prompt-templates' must be a list of at most 256 strings"),
    ("stages: [[generate]]\n", "'stages' must be a list of at most 256 strings"),
    ("pda-ops: " + "[" * 40 + "]" * 40 + "\n", "nests deeper than 32 levels"),
    ("ipc: 1\npda-ops: {hflip: {p: [1]}}\n", "pda-ops: hflip.p must be a number in [0.0, 1.0]"),
    ("ipc: 1\npda-ops: {rotate: {border: [1]}}\n", "rotate.border must be one of"),
    ("ipc: 1\npda-ops: {1: {}}\n", "pda-ops: unknown op '1'"),
    ("pda-ops: [hflip]\n", "'pda-ops' must be a mapping"),
    ("guidance: .nan\n", "'guidance' must be a finite number"),
    ("model: [tiny]\n", "'model' must be a string"),
]

CLASS_FILES = [
    (b"cat\n..\n", "'..' is a relative folder name"),
    (b"cat\n.\n", "'.' is a relative folder name"),
    (b"a/b\n", "path separator"),
    (b"n01\\x\tcat\n", "path separator"),
    (b"cat\ncat\n", "duplicate class 'cat' (first on line 1)"),
    (b"\tcat\n", "has a name but no id"),
    (b"a\tb\tc\td\n", "4 tab-separated columns; at most 3"),
    (b"cat\x00dog\n", "NUL bytes"),
    ("\ufeffcat\ndog\n".encode("utf-16"), "UTF-16"),
    (b"\xff\xfe\xfa\n", "UTF-16"),
    (b"caf\xe9\n", "not a UTF-8 text file"),
    (b"x" * 300 + b"\tcat\n", "longer than 200 characters"),
    (b"# only a comment\n\n", "lists no classes"),
    # Lines are split at \n only: each of these would have been a line break for str.splitlines.
    (
        "cat\u2028dog\nbird\n".encode(),
        "line 1: the class id 'cat\\u2028dog' contains a control or format character (U+2028 LINE SEPARATOR)",
    ),
    ("cat\x85dog\n".encode(), "(U+0085"),
    (b"cat\x0bdog\n", "(U+000B"),
    (b"cat\x0cdog\n", "(U+000C"),
    (b"cat\x1cdog\n", "(U+001C"),
    (b"cat\rdog\n", "(U+000D"),  # a lone CR (a CRLF's CR is the line's end)
    (b"cat\x7f\n", "(U+007F"),  # DEL
    ("ca\u200bt\n".encode(), "(U+200B ZERO WIDTH SPACE)"),
    ("cat\u202egod\n".encode(), "(U+202E RIGHT-TO-LEFT OVERRIDE)"),
    ("n01\tca\u200dt\n".encode(), "the class name must be at most 300 printable characters (U+200D ZERO WIDTH JOINER"),
    ("n01\tcat\ta \u202e b\n".encode(), "the class description must be at most 300 printable characters (U+202E"),
    ("caf\u00e9\ncafe\u0301\n".encode(), "line 2: duplicate class 'cafe\u0301' (first on line 1)"),  # NFC, NFD
    (b"cat.\n", "'cat.' ends in a dot or space"),
    (b"...\n", "'...' ends in a dot or space"),
    (b"CON\n", "is a device name Windows reserves"),
    (b"nul\n", "is a device name Windows reserves"),
    (b"aux\tAux\n", "is a device name Windows reserves"),
    (b"com1.txt\n", "is a device name Windows reserves"),
    (b"a:b\n", "contains a character folder names cannot hold"),
    (b"what?\n", "contains a character folder names cannot hold"),
]


@pytest.mark.parametrize("template, message", TEMPLATES, ids=[t[:30] for t, _ in TEMPLATES])
def test_prompt_templates(template, message, existing_run, capsys):
    before = tree_digest(existing_run)
    argv = ["distill", "--dataset", "cifar10", *BASE, "--prompt-template", template, "--out", str(existing_run)]
    assert main([*argv, "--overwrite"]) == 2  # --overwrite included: nothing may be deleted first
    assert message in one_error_line(capsys)
    assert tree_digest(existing_run) == before


@pytest.mark.parametrize("flags, message", NUMBERS, ids=[" ".join(f) for f, _ in NUMBERS])
def test_numbers(flags, message, existing_run, capsys):
    before = tree_digest(existing_run)
    args = ["distill", "--dataset", "cifar10", *BASE, *flags, "--out", str(existing_run), "--overwrite"]
    assert main(args) == 2
    assert message in one_error_line(capsys)
    assert tree_digest(existing_run) == before


# Each option within its bounds, the product not: refused by arithmetic before any list of units exists.
PLAN_SIZES = [
    (["--dataset", "imagenet-1k", "--ipc", "1000000", "--unit-size", "1", "--batch-size", "1"],
     "1,000,000,000 generated images"),
    (["--dataset", "imagenet-1k", "--ipc", "2000", "--unit-size", "1", "--batch-size", "1"], "2,000,000 shards"),
    (["--dataset", "imagenet-1k", "--ipc", "1000000", "--select-by", "clip", "--overgenerate", "100"], "100,000,000,000"),
    (["--dataset", "imagenet-1k", "--ipc", "1000", "--pda-variants", "1000", "--stages", "generate,augment"],
     "1,001,000,000 augmented images"),
]  # fmt: skip


@pytest.mark.parametrize("flags, message", PLAN_SIZES, ids=[" ".join(f[3:]) for f, _ in PLAN_SIZES])
def test_plan_size_is_checked_before_the_plan_is_built(flags, message, existing_run, monkeypatch, capsys):
    from gdd_ray import plan

    def never(*args):
        raise AssertionError("the plan was materialised before its size was checked")

    monkeypatch.setattr(plan, "plan_units", never)
    before = tree_digest(existing_run)
    args = ["distill", *BASE, *flags, "--out", str(existing_run), "--overwrite"]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert "the plan is too large" in line and message in line
    assert tree_digest(existing_run) == before


@pytest.mark.parametrize("text, message", YAMLS, ids=[m for _, m in YAMLS])
def test_yaml_configs(text, message, existing_run, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    before = tree_digest(existing_run)
    assert main(["distill", "--dataset", "cifar10", "--config", str(config), "--out", str(existing_run)]) == 2
    assert message in one_error_line(capsys)
    assert tree_digest(existing_run) == before


@pytest.mark.parametrize("data, message", CLASS_FILES, ids=[m for _, m in CLASS_FILES])
def test_class_files(data, message, existing_run, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_bytes(data)
    before = tree_digest(existing_run)
    assert main(["distill", "--classes", str(classes), *BASE, "--out", str(existing_run), "--overwrite"]) == 2
    assert message in one_error_line(capsys)
    assert tree_digest(existing_run) == before


@pytest.mark.parametrize(
    "out, message",
    [("ftp://host/run", "unknown storage scheme 'ftp://'"), ("/", "--out / is the filesystem's root")],
)
def test_out_locations(out, message, capsys):
    assert main(["distill", "--dataset", "cifar10", *BASE, "--out", out]) == 2
    assert message in one_error_line(capsys)


@pytest.mark.parametrize("record", ["[]", "null", '"text"', "{", '{"fingerprints": []}'])
@pytest.mark.parametrize("command", ["status", "export", "distill"])
def test_run_records_that_are_not_one(record, command, existing_run, tmp_path, capsys, tiny_model):
    (existing_run / "run.json").write_text(record)
    before = tree_digest(existing_run)
    argv = {
        "status": ["status", str(existing_run)],
        "export": ["export", "--run", str(existing_run), "--format", "imagefolder", "--dest", str(tmp_path / "x")],
        "distill": ["distill", "--dataset", "cifar10", *BASE, "--out", str(existing_run)],
    }[command]
    assert main(argv) == 2
    one_error_line(capsys)
    assert tree_digest(existing_run) == before
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "ids, message",
    [
        (["cat", ".."], "relative folder name"),
        (["."], "relative folder name"),
        (["a/b"], "path separator"),
        (["a\x00"], "control or format character"),
        (["x" * 5000], "longer than"),
        (["dog ", "cat"], "ends in a dot or space"),
        (["Cat", "cat"], "differ only in case"),
    ],
)
def test_export_folder_names_stay_inside_dest(ids, message):
    """What export --format imagefolder names its folders after (class ids of the run's shards)."""
    with pytest.raises(UserError, match=message):
        folder_names(ids)


def test_export_refuses_a_non_empty_dest(existing_run, tmp_path, capsys):
    (existing_run / "run.json").write_text(json.dumps({"fingerprints": {"generate": "0000"}, "classes": []}))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.txt").write_text("mine")
    argv = ["export", "--run", str(existing_run), "--format", "imagefolder", "--source", "generated"]
    assert main([*argv, "--dest", str(dest)]) == 2  # the manifest there is not the run's: refused first
    assert "no complete generate stage" in one_error_line(capsys)
    assert (dest / "mine.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def small_export_run(tmp_path_factory):
    from tests.test_export import make_run

    return make_run(tmp_path_factory.mktemp("run"), num_classes=2)[0]


def _rewrite_shard(loc, name: str, table, footer: dict[str, str]) -> None:
    from gdd_ray import storage

    loc.write_bytes(name, storage.parquet_bytes(table, footer))


@pytest.mark.parametrize("damage", ["foreign fingerprint", "short shard", "resized shard", "duplicate images"])
def test_export_refuses_an_inconsistent_run(damage, small_export_run, tmp_path, capsys):
    import shutil

    import pyarrow.parquet as pq

    from gdd_ray import shards
    from gdd_ray.run import RunDir

    out = tmp_path / "run"
    shutil.copytree(small_export_run.uri, out)
    loc = RunDir(str(out)).augmented
    first, second = shards.read_manifest(loc).names[:2]
    meta = pq.read_metadata(loc.file(first))
    footer = {k.decode(): v.decode() for k, v in meta.metadata.items()}
    if damage == "foreign fingerprint":  # a shard rewritten by another config since the manifest
        _rewrite_shard(loc, first, pq.read_table(loc.file(first)), {**footer, shards.FINGERPRINT: "f" * 16})
        message = "another fingerprint"
    elif damage == "short shard":  # rows lost since the manifest was written, footer intact
        _rewrite_shard(loc, first, pq.read_table(loc.file(first)).slice(1), footer)
        message = "short ("
    elif damage == "resized shard":  # the same rows and footer, other bytes than the manifest recorded
        _rewrite_shard(loc, first, pq.read_table(loc.file(first)), {**footer, "note": "rewritten"})
        message = "changed since its manifest was written"
    else:  # the second shard holds the first one's images (same rows, same fingerprint, the recorded size)
        _rewrite_shard(loc, second, pq.read_table(loc.file(first)), footer)
        manifest = json.loads(loc.read_bytes(shards.MANIFEST_FILE))
        for entry in manifest["shards"]:
            entry["bytes"] = loc.sizes(".parquet")[entry["name"]]
        loc.write_bytes(shards.MANIFEST_FILE, json.dumps(manifest).encode())
        message = "twice"
    before = tree_digest(out)
    dest = tmp_path / "dest"
    assert main(["export", "--run", str(out), "--format", "imagefolder", "--dest", str(dest)]) == 2
    assert message in one_error_line(capsys)
    assert tree_digest(out) == before and not dest.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no staging folder left


def test_class_files_that_hold(tmp_path):
    """CRLF line ends, letters of any script, spaces and a BOM are a class list like any other."""
    from gdd_ray.classes import load_classes

    classes = tmp_path / "classes.txt"
    classes.write_bytes("\ufeffn01\tcrème brûlée\r\nn02\tчай\r\n  n03\t日本茶 \r\n".encode())
    got = [(c.label, c.class_id, c.name) for c in load_classes(None, str(classes))]
    assert got == [(0, "n01", "crème brûlée"), (1, "n02", "чай"), (2, "n03", "日本茶")]


def test_names_one_tokenizer_reads_alike_are_one_prompt(existing_run, tmp_path, capsys):
    """NFC and NFD spellings of a name give CLIP identical tokens: two labels for one prompt are refused."""
    classes = tmp_path / "classes.txt"
    classes.write_text("n01\tcaf\u00e9\nn02\tcafe\u0301\n")
    before = tree_digest(existing_run)
    assert main(["distill", "--classes", str(classes), *BASE, "--out", str(existing_run)]) == 2
    assert "line 1 (label 0) and line 2 (label 1) give" in one_error_line(capsys)
    assert tree_digest(existing_run) == before


def test_negative_zero_is_zero(tmp_path):
    """`--guidance -0.0` is the value 0.0: the same fingerprint, so a rerun resumes instead of being refused."""
    from gdd_ray import pipeline
    from gdd_ray.classes import load_classes
    from gdd_ray.config_loader import build_config
    from gdd_ray.run import RunDir

    def fingerprint(guidance: str) -> str:
        cfg = build_config({"dataset": "cifar10", "ipc": 1, "out": str(tmp_path), "model": "tiny", "guidance": guidance,
                            "stages": "generate", "engine": "diffusers", "vae_dtype": "fp32"})  # fmt: skip
        assert str(cfg.generate.guidance) == "0.0"
        return pipeline.stage_inputs(cfg, load_classes("cifar10", None), RunDir(cfg.out))[0]["generate"]

    assert fingerprint("-0.0") == fingerprint("0.0") == fingerprint("0")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mean", "nan,0,0", "--std", "1,1,1"], "three finite comma-separated numbers, got 'nan,0,0'"),
        (["--mean", "0,0,0", "--std", "inf,1,1"], "three finite comma-separated numbers, got 'inf,1,1'"),
        (["--mean", "0,0", "--std", "1,1,1"], "three finite comma-separated numbers, got '0,0'"),
        (["--mean", "0,0,0", "--std", "0,1,1"], "three finite numbers each (std > 0)"),
    ],
)
def test_export_mean_and_std_are_finite(flags, message, small_export_run, tmp_path, capsys):
    before = tree_digest(small_export_run.root.path)
    dest = tmp_path / "x.pt"
    assert exit_code(["export", "--run", small_export_run.uri, "--format", "pt", "--dest", str(dest), *flags]) == 2
    assert message in one_error_line(capsys)
    assert not dest.exists() and tree_digest(small_export_run.root.path) == before


SWEEPS = [
    ("base: [1, 2]\ngrid: {ipc: [1]}\n", "base: must be a mapping of option: value, got [1, 2]"),
    ("base: {}\ngrid: [ipc]\n", "grid: must be a mapping"),
    ("grid: {ipc: 5}\n", "grid: must map each option to a non-empty list"),
    ("grid: {ipc: [1], ipc: [2]}\n", "the key 'ipc' is given twice"),
    ("grid: {ipc: [" + ",".join(map(str, range(1, 41))) + "], seed: [" + ",".join(map(str, range(40))) + "], "
     "eval-seed: [" + ",".join(map(str, range(40))) + "]}\n", "the grid has 64,000 points; at most 1,000"),
    ("grid: {ipc: [1]}\nextra: 1\n", "unknown section(s) extra"),
]  # fmt: skip


@pytest.mark.parametrize("text, message", SWEEPS, ids=[m[:30] for _, m in SWEEPS])
def test_sweep_files(text, message, tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(text)
    out = tmp_path / "root"
    assert main(["sweep", "--config", str(sweep), "--out", str(out)]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


# ---- messages that must not mislead -------------------------------------------------------------------------


def test_dropping_prompt_templates_on_resume_names_them(tmp_path, capsys, tiny_model):
    """run._describe_change compares every value of either run: one given only before is named, and the class
    list (recorded with descriptions while a template used {desc}) comes after the option that changed it."""
    from gdd_ray import pipeline
    from tests.gen_helpers import three_class_config

    templates = ["a photo of a {name}", "{desc}, close-up"]
    cfg = three_class_config(tmp_path / "run", ipc=1, prompt_templates=templates)
    pipeline.check(cfg)
    (tmp_path / "run" / "generated").mkdir()
    (tmp_path / "run" / "generated" / "u0000000000-0000000002.parquet").write_bytes(b"made by the first run")
    before = tree_digest(tmp_path / "run")
    argv = ["distill", "--classes", cfg.classes, "--ipc", "1", "--model", "tiny", "--gen-resolution", "64",
            "--image-size", "16", "--unit-size", "2", "--batch-size", "2", "--stages", "generate",
            "--out", cfg.out]  # fmt: skip
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert f"(prompt-templates {templates!r} -> (none), class list changed)" in line, line
    assert tree_digest(tmp_path / "run") == before


def test_a_format_spec_in_a_template_shows_the_braces_to_write(existing_run, capsys):
    argv = ["distill", "--dataset", "cifar10", *BASE, "--prompt-template", "{name:>10}", "--out", str(existing_run)]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "{name:>10} is not allowed" in line and "and {{ }} for literal braces" in line and "{{{{" not in line


@pytest.mark.parametrize("line", ["n01\t_", "n01\t__ _", "_"])
def test_a_class_whose_name_is_blank_once_read(line, existing_run, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text(f"{line}\nn02\tcat\n")
    before = tree_digest(existing_run)
    assert main(["distill", "--classes", str(classes), *BASE, "--out", str(existing_run)]) == 2
    assert "is blank once underscores are read as spaces" in one_error_line(capsys)
    assert tree_digest(existing_run) == before


def test_the_collision_hint_follows_the_template(existing_run, tmp_path, capsys):
    """With {desc} in use the colliding descriptions are to fix; with {name} only, a description and {desc}."""
    classes = tmp_path / "classes.txt"
    classes.write_text("n01\tkite\ta bird\nn02\tcrane\ta bird\n")
    argv = ["distill", "--classes", str(classes), *BASE, "--out", str(existing_run)]
    assert main([*argv, "--prompt-template", "a photo of {desc}"]) == 2
    line = one_error_line(capsys)
    assert "give each class its own description (third column" in line and "and use {desc}" not in line
    classes.write_text("n01\tkite\nn02\tKite\n")
    assert main([*argv, "--prompt-template", "a photo of a {name}"]) == 2
    assert "give each class its own name, or a description (third column) and use {desc}" in one_error_line(capsys)


@pytest.mark.parametrize("second", ["A  {name}", "a {name} ", "\u0061 {name}", "A\t{name}"])
def test_templates_clip_reads_alike_are_one(second, existing_run, tmp_path, capsys):
    templates = tmp_path / "templates.txt"
    templates.write_text(f"a {{name}}\n{second}\n")
    argv = ["distill", "--dataset", "cifar10", *BASE, "--prompt-templates", str(templates), "--out", str(existing_run)]
    assert main(argv) == 2
    assert "line 2 repeats the template 'a {name}'" in one_error_line(capsys)
    config = tmp_path / "config.yaml"
    config.write_text(f"ipc: 1\nprompt_templates: ['a {{name}}', '{second}']\n")
    assert main(["distill", "--dataset", "cifar10", "--config", str(config), "--out", str(existing_run)]) == 2
    assert "item 2 repeats the template 'a {name}'" in one_error_line(capsys)


def test_status_of_a_select_stage_counts_its_score_files(tmp_path, capsys):
    """The kept shards are written after every score file: status says how far scoring is (6 of 10 here)."""
    from gdd_ray import pipeline, shards, storage
    from gdd_ray.classes import load_classes
    from gdd_ray.config_loader import build_config
    from gdd_ray.run import RunDir

    cfg = build_config({"dataset": "cifar10", "ipc": 1, "out": str(tmp_path / "run"), "unit_size": 1, "batch_size": 1,
                        "select_by": "clip", "clip_model": "tiny", "stages": "generate,select"})  # fmt: skip
    classes = load_classes("cifar10", None)
    fps, inputs, _ = pipeline.stage_inputs(cfg, classes, RunDir(cfg.out))
    RunDir(cfg.out).prepare(cfg, [vars(c) for c in classes], fps, inputs)
    write_generated(cfg, classes)
    scores = storage.Location(str(tmp_path / "run" / "selected" / shards.SCORES_DIR))
    plan = pipeline.plan_run(cfg, len(classes))
    for unit in plan.units[:6]:
        table = shards.generated_table(unit, ["c"], ["c"], ["p"], [0], [b"x"])
        footer = {shards.SOURCE: unit.shard_name, shards.FINGERPRINT: fps["select"]}
        storage.Location(scores.uri).write_bytes(unit.shard_name, storage.parquet_bytes(table, footer))
    assert main(["status", cfg.out]) == 1
    out = capsys.readouterr().out
    select = [ln for ln in out.splitlines() if ln.strip().startswith("select")][0]
    assert "0/10 shards" in select and "6/10 generated shards scored" in select and "incomplete" in select


def test_negative_zero_in_pda_ops_is_zero():
    from gdd_ray.augment.recipe import resolve_ops
    from gdd_ray.fingerprints import digest

    minus = resolve_ops({"rotate": {"degrees": -0.0}, "hflip": {"p": -0.0}})
    plus = resolve_ops({"rotate": {"degrees": 0.0}, "hflip": {"p": 0.0}})
    assert digest(minus) == digest(plus) and str(minus[0][1]["degrees"]) == "0.0"
    assert resolve_ops({"rotate": {"degrees": 30}})[0][1]["degrees"] == 30  # other spellings kept as given

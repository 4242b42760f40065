"""Hostile and careless input through the real CLI: each case is one line on stderr (`error: ...`), exit
code 2, no traceback, and the run folder it points at is byte-for-byte untouched (digest before and after).

The cases run `cli.main` in process, as every entry point does; all fail before Ray or the model starts."""

from __future__ import annotations

import json

import pytest
from gen_helpers import tree_digest

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
    ("{name}\nfoo", "control characters"),
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
    (["--dataset", "imagenet-1k", "--ipc", "1000000", "--unit-size", "1"], "1,000,000,000 generated images"),
    (["--dataset", "imagenet-1k", "--ipc", "2000", "--unit-size", "1"], "2,000,000 shards"),
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
        (["a\x00"], "control character"),
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

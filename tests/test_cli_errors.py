"""Bad input: one clear line on stderr, exit code 2, no traceback, existing output untouched.

The cases run `cli.main` in process (what every entry point calls); the last two tests run the real
script in a subprocess, as a user does."""

import subprocess
import sys

import pytest
from gen_helpers import tree_digest

from gdd_ray import storage
from gdd_ray.cli import main
from tests.conftest import REPO

DISTILL = [sys.executable, str(REPO / "jobs" / "distill.py")]


def distill(*args, env=None):
    return subprocess.run(DISTILL + list(args), capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


@pytest.fixture
def existing_run(tmp_path):
    """A folder that looks like a finished run of another config (what bad input must not touch)."""
    run = tmp_path / "run"
    (run / "generated").mkdir(parents=True)
    (run / "generated" / "u0000000000-0000000002.parquet").write_bytes(b"precious")
    (run / "run.json").write_text('{"fingerprints": {"generate": "0000"}, "config": {"seed": 5}}')
    return run


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "cifar1000", "--ipc", "2"], "unknown dataset 'cifar1000'"),
        (["--dataset", "cifar10", "--ipc", "0"], "--ipc must be at least 1"),
        (["--dataset", "cifar10", "--ipc", "-3"], "--ipc must be at least 1"),
        (["--classes", "/nonexistent/classes.txt", "--ipc", "2"], "cannot read it"),
        (["--classes", "EMPTY", "--ipc", "2"], "lists no classes"),
        (["--classes", "DUP", "--ipc", "2"], "line 2 (label 1) and line 3 (label 2) give 'kite'"),
        (["--dataset", "cifar10", "--ipc", "2", "--model", "/nonexistent/model"], "not a diffusers pipeline folder"),
        (["--dataset", "cifar10", "--ipc", "2", "--model", "someone/not-cached"], "cannot load it"),
        (["--dataset", "cifar10", "--ipc", "2", "--model", "tiny", "--seed", "1"], "differs from this one"),
        (["--dataset", "cifar10", "--ipc", "2", "--stages", "paint"], "unknown stage(s) paint"),
        (["--config", "/nonexistent.yaml"], "cannot read it"),
    ],
)
def test_bad_input(args, message, existing_run, tmp_path, capsys, tiny_model):  # model built before, not mid-case
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    dup = tmp_path / "dup.tsv"
    dup.write_text("cat\nkite\nKite\n")
    args = [{"EMPTY": str(empty), "DUP": str(dup)}.get(a, a) for a in args]
    before = tree_digest(existing_run)
    assert main(["distill", *args, "--out", str(existing_run)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("error: ") and message in lines[-1], err
    assert tree_digest(existing_run) == before


def test_out_under_a_file_is_refused_before_any_stage_is_asked(tmp_path, capsys):
    """A file where --out needs a folder: refused by the read-only pre-check, before the fingerprints (which
    import the model library) and before any stage's preflight; the file is untouched."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker / "run", blocker / "run" / "deeper", blocker):
        with pytest.raises(OSError):
            storage.refuse_blocked_local(str(out))
        # A model that is not there either: its own error would come from a later check.
        assert main(["distill", "--dataset", "cifar10", "--ipc", "1", "--model", "someone/not-cached",
                     "--out", str(out)]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out} is not writable") and err.count("\n") == 1, err
    assert blocker.read_text() == "x"
    for fine in (tmp_path / "new" / "deep" / "run", tmp_path, "s3://bucket/run"):
        storage.refuse_blocked_local(str(fine))  # a folder to create, an existing one, a bucket: left to the probe


@pytest.mark.slow  # a fresh interpreter running the script
def test_unwritable_out_through_the_script(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = distill("--dataset", "cifar10", "--ipc", "1", "--model", "tiny", "--out", str(blocker / "run"))
    assert r.returncode == 2 and "is not writable" in r.stderr and "Traceback" not in r.stderr
    assert blocker.read_text() == "x"


@pytest.mark.slow  # an interpreter importing the package per entry point
def test_help_lists_every_flag():
    r = distill("--help")
    assert r.returncode == 0
    for flag in ["--dataset", "--classes", "--ipc", "--model", "--steps", "--guidance", "--gen-resolution",
                 "--image-size", "--prompt-template", "--seed", "--batch-size", "--workers", "--out",
                 "--overwrite", "--stages", "--config"]:  # fmt: skip
        assert flag in r.stdout, flag


@pytest.mark.slow  # five interpreters, each importing torch and ray
def test_every_entry_point_reaches_every_command():
    scripts = [
        [sys.executable, "-m", "gdd_ray"],
        [str(REPO / ".venv" / "bin" / "gdd-ray")] if (REPO / ".venv" / "bin" / "gdd-ray").exists() else None,
    ]
    for cmd in filter(None, scripts):
        r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert r.returncode == 0 and all(c in r.stdout for c in ("distill", "status", "export")), r.stderr
    r = subprocess.run([sys.executable, "-m", "gdd_ray", "distill", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "--prompt-template" in r.stdout

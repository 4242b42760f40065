"""The README's cluster lines, as written: `export RAY_AUTH_MODE=token`, `ray get-auth-token --generate`,
`ray start --head` with Ray's defaults, then its `ray job submit` command with the quick-run options the
README gives. Read from README.md, so the test breaks when the README drifts from what works.

What differs from a user's shell, and why: HOME is a fresh folder (the token `ray get-auth-token` makes is this
test's, never the machine's ~/.ray/auth_token); the head gets ports and a temp dir of its own plus --block, so
it is stopped by its pid and never meets another Ray here; RAY_ADDRESS names that head's dashboard (a user's
head listens on the default 8265); `--out` of the quick-run options is a folder of this test.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from gen_helpers import read_images
from ray_head import RayHead

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def readme_cluster_lines() -> list[list[str]]:
    """The words of each line of the README code block holding `ray job submit` (comments dropped)."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```\n(.*?)^```", text, flags=re.S | re.M)
    block = next(b for b in blocks if "ray job submit" in b and "ray start --head" in b)
    return [shlex.split(line, comments=True) for line in block.splitlines() if shlex.split(line, comments=True)]


def readme_quick_options() -> list[str]:
    m = re.search(r"append the quick-run options\s+`([^`]+)`\s+to the submit line", (REPO / "README.md").read_text())
    assert m, "README.md no longer gives the quick-run options for the submit line"
    return shlex.split(m.group(1))


def with_out(options: list[str], out: Path) -> list[str]:
    i = options.index("--out")
    return [*options[:i], "--out", str(out), *options[i + 2 :]]


def test_readme_cluster_lines_as_written(tiny_model, tmp_path):
    lines = readme_cluster_lines()
    assert [w[:3] for w in lines] == [
        ["export", "RAY_AUTH_MODE=token"],
        ["ray", "get-auth-token", "--generate"],
        ["ray", "start", "--head"],
        ["ray", "job", "submit"],
    ], lines
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no token or address of the tests'
    env.update(HOME=str(home), PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
    head = None
    try:
        for words in lines:
            if words[0] == "export":
                name, value = words[1].split("=", 1)
                env[name] = value
            elif words[:2] == ["ray", "get-auth-token"]:
                r = subprocess.run(words, env=env, capture_output=True, text=True, timeout=60)
                assert r.returncode == 0, r.stderr[-2000:]
                assert (home / ".ray" / "auth_token").read_text().strip()
            elif words[:2] == ["ray", "start"]:
                head = RayHead(num_cpus=2, env=dict(env), start=tuple(words))
                # the head authenticates: the dashboard refuses a request that carries no token
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(head.dashboard_url + "/api/jobs/", timeout=10)
                assert refused.value.code in (401, 403)
            else:
                assert head is not None, "the README submits before it starts a head"
                out = tmp_path / "check"
                argv = [*words, *with_out(readme_quick_options(), out)]
                r = subprocess.run(argv, env={**env, "RAY_ADDRESS": head.dashboard_url}, cwd=REPO,
                                   capture_output=True, text=True, timeout=600)  # fmt: skip
                assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
                assert "succeeded" in r.stdout and "[generate] done:" in r.stdout, r.stdout[-3000:]
                assert sorted(read_images(out / "generated")) == [(c, 0) for c in range(10)]
    finally:
        if head is not None:
            head.stop()

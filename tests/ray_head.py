"""A real `ray start --head --block` child on free ports, for tests that go through `ray job submit`.

Only this child (and what it spawned) is stopped at the end, by its pid; nothing else on the machine is touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_env() -> dict[str, str]:
    """The venv's bin first on PATH: the job's `python` must be the one with gdd_ray and ray installed."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["RAY_AUTH_MODE"] = "token"  # as on a user's cluster; conftest points RAY_AUTH_TOKEN_PATH at the token
    env.pop("RAY_ADDRESS", None)
    return env


class RayHead:
    def __init__(
        self, num_cpus: int = 2, num_gpus: int = 0, env: dict[str, str] | None = None, start: tuple[str, ...] = ()
    ):
        """`start`: the command's own words (default `ray start --head`; e.g. as a README writes them); this
        adds only what keeps the child apart from any other Ray here: --block, ports, temp dir, resources."""
        gcs, dash, client, agent_http, agent_grpc, metrics, rt_env, nm, om = free_ports(9)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dash}"
        self.temp_dir = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")  # short: Ray's socket paths are limited
        self.env = env if env is not None else test_env()
        words = list(start or ("ray", "start", "--head"))
        assert words[:3] == ["ray", "start", "--head"], words
        ray_bin = str(Path(sys.executable).parent / "ray")
        cmd = [
            ray_bin, *words[1:], "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={rt_env}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
            f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]  # fmt: skip
        self.log = open(Path(self.temp_dir) / "head.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # never leave a half-started head behind
            raise

    def auth_headers(self) -> dict[str, str]:
        """What a client sends under token authentication (the dashboard refuses a request without it)."""
        path = self.env.get("RAY_AUTH_TOKEN_PATH") or str(Path(self.env["HOME"]) / ".ray" / "auth_token")
        token = self.env.get("RAY_AUTH_TOKEN") or Path(path).read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                req = urllib.request.Request(self.dashboard_url + "/api/version", headers=self.auth_headers())
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError("ray head did not come up")

    def stop(self) -> None:
        """SIGTERM to our `ray start --block` child: it takes down the processes it started."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

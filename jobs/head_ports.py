"""Which ports a Ray head opens, on which addresses, and what each serves to a client without the token.

    python jobs/head_ports.py --out bench_results/head_ports.json

Starts `ray start --head --block` (token authentication on, a temporary folder, free ports chosen here for the
ports that have flags) as a child, waits for its processes to settle, lists every listening socket of the
child's process tree (psutil), and sends one unauthenticated HTTP GET to `/` and `/metrics` of each port: an
HTTP status, or the fact that the port does not speak HTTP (gRPC: Ray's token interceptor guards those). For
the ports that answer 200, it records the metric label names they give away. Stops the child (only it) at the
end. docs/security.md is written from this file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

FLAGS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
         "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
         "object-manager-port")  # fmt: skip


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def probe(host: str, port: int, path: str) -> dict:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
            body = r.read().decode(errors="replace")
            return {"status": r.status, "bytes": len(body), "labels": sorted(set(re.findall(r'(\w+)="', body)))}
    except urllib.error.HTTPError as e:
        return {"status": e.code}
    except Exception as e:  # noqa: BLE001 - what a non-HTTP (gRPC) server does to an HTTP request
        return {"status": None, "not_http": type(e).__name__}


def main() -> None:
    import psutil
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_results/head_ports.json")
    parser.add_argument("--settle-s", type=float, default=40.0, help="wait for the agents before listing")
    args = parser.parse_args()
    ports = dict(zip(FLAGS, free_ports(len(FLAGS))))
    temp = tempfile.mkdtemp(prefix="rayp-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "start", "--head", "--block", "--num-cpus=1", f"--temp-dir={temp}", "--disable-usage-stats",
           *(f"--{flag}={port}" for flag, port in ports.items())]  # fmt: skip
    log = open(Path(temp) / "head.log", "w")
    child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(args.settle_s)
        tree = {p.pid: p for p in [psutil.Process(child.pid), *psutil.Process(child.pid).children(recursive=True)]}
        listening: dict[int, dict] = {}
        for c in psutil.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN and c.pid in tree:
                entry = listening.setdefault(c.laddr.port, {"binds": set(), "process": tree[c.pid].name()})
                entry["binds"].add(c.laddr.ip.removeprefix("::ffff:"))
        flag_of = {port: flag for flag, port in ports.items()}
        rows = []
        for port, entry in sorted(listening.items()):
            binds = sorted(entry["binds"])
            host = next((b for b in binds if b not in ("::", "0.0.0.0")), "127.0.0.1")
            rows.append({
                "port": port, "flag": flag_of.get(port), "process": entry["process"], "binds": binds,
                "get /": probe(host, port, "/"), "get /metrics": probe(host, port, "/metrics"),
            })  # fmt: skip
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
    result = {
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ray": ray.__version__,
        "command": " ".join(["ray", "start", "--head", "--block", "--num-cpus=1", "--port=...", "..."]),
        "settle_s": args.settle_s,
        "ports": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(
            r["port"],
            r["flag"] or "-",
            r["process"],
            r["binds"],
            r["get /"].get("status"),
            r["get /metrics"].get("status"),
        )


if __name__ == "__main__":
    main()

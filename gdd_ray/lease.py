"""One live driver per run: a lease file in OUT that names its holder and says it is alive.

    OUT/_lease-000003.json   {holder: {host, pid, pid_start, machine, ray_job}, token, generation,
                              started, heartbeat, expiry_s}

A driver takes the lease before it writes anything (run.json included) and holds it to the end: a heartbeat
thread rewrites its lease every `expiry_s / 4` seconds; on exit it deletes it. Taking it is an exclusive
create of the next generation's file (`storage.Location.create_exclusive`: a hard link on disks, a
conditional PUT on object stores), so of two drivers racing for one generation exactly one wins:

- no lease, or the newest one released: create generation 1 (or the next one);
- a live holder (heartbeat younger than its expiry): refuse at once, in one line naming the holder;
- an expired holder (killed, its node gone), or one on this same machine whose process is gone: create the
  next generation, saying so; the loser of a race for it re-reads and refuses.

A holder whose lease was taken over (it stalled past its expiry) sees the newer generation at its next
heartbeat and stops itself. Guarantees and their limits are in docs/resume.md ("One driver per run"):
the conditional create is atomic on local disks, NFS, S3 and GCS; the GCS emulator the tests use ignores
`ifGenerationMatch`, so there the tests prove the protocol, not the atomicity; expiry compares the holder's
clock with the reader's, so clocks must agree to well within the expiry (NTP does).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from gdd_ray import schema, storage
from gdd_ray.errors import UserError
from gdd_ray.logs import say

# Any sequence number (six digits or more); only the name lease_name writes for it counts, so one number never
# has two files (a planted `_lease-0000001.json` is not generation 1's lease, and is ignored like any stranger).
LEASE_PATTERN = re.compile(r"^_lease-(\d{6,18})\.json$")
DEFAULT_EXPIRY_S = 120.0  # a dead driver's run can be taken over this long after its last heartbeat
EXPIRY_ENV = "GDD_RAY_LEASE_EXPIRY_S"  # tests (and impatient users) shorten it


def lease_name(generation: int) -> str:
    return f"_lease-{generation:06d}.json"


def expiry_s() -> float:
    return schema.env_number(EXPIRY_ENV, DEFAULT_EXPIRY_S, 1.0, 86400.0)


# ---- who is holding it ------------------------------------------------------------------------------


def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def machine_id() -> str | None:
    """This boot of this machine and this pid namespace: pids compare only where both agree (containers
    sharing a host name have their own pids)."""
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot.strip()}:{pidns}" if boot else None


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot): tells a reused pid from the holder's."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def ray_job() -> str | None:
    """The Ray job this driver runs as: the submission id under `ray job submit`, else the connected job id."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if config:
        spec = schema.Fields(optional={"metadata": schema.Fields(optional={"job_submission_id": schema.Str(200)})})
        try:
            submission = schema.load(config, spec, "RAY_JOB_CONFIG_JSON_ENV_VAR", limit=2**20)
            submission = submission.get("metadata", {}).get("job_submission_id")
            if submission:
                return submission
        except ValueError:
            pass
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_job_id()
    except Exception:
        pass
    return None


def holder_info() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "pid_start": process_start(pid),
        "machine": machine_id(),
        "ray_job": ray_job(),
    }


def describe(record: dict[str, Any]) -> str:
    h = record.get("holder", {})
    job = f", Ray job {h['ray_job']}" if h.get("ray_job") else ""
    return f"{h.get('host', '?')} pid {h.get('pid', '?')}{job}, started {record.get('started', '?')}"


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def holder_gone(record: dict[str, Any]) -> bool:
    """The holder ran on this machine (same boot, same pid namespace) and its process is no more."""
    h = record.get("holder", {})
    if not h.get("machine") or h.get("machine") != machine_id():
        return False
    try:
        start = process_start(int(h["pid"]))
    except (KeyError, TypeError, ValueError):
        return False
    return start is None or (h.get("pid_start") is not None and start != h.get("pid_start"))


def state(record: dict[str, Any] | None, now: float | None = None, written: float | None = None) -> tuple[str, float]:
    """('live' | 'expired' | 'gone', seconds since the last heartbeat) of a lease record (checked by its schema).

    `written`: when the store says the file was last written. A heartbeat is never younger than its write, so
    a heartbeat stamped in the future (a holder's clock far ahead, or a planted file) ages from the write and
    expires after the normal window; without a write time it counts as written now."""
    if not record:
        return "expired", float("inf")
    now = _now() if now is None else now
    beat = min(float(record["heartbeat_t"]), now if written is None else written)
    age, expiry = now - beat, float(record["expiry_s"])
    if holder_gone(record):
        return "gone", age
    return ("live" if age < expiry else "expired"), age


# ---- reading -----------------------------------------------------------------------------------------


def generations(root: storage.Location) -> list[int]:
    try:
        names = root.list(include_hidden=True)
    except FileNotFoundError:
        return []
    return sorted(g for n in names if (m := LEASE_PATTERN.match(n)) and n == lease_name(g := int(m.group(1))))


def read(root: storage.Location, generation: int) -> dict[str, Any] | None:
    """A lease record (checked by its schema); None if it vanished (released) or cannot be read as one."""
    return schema.read_or_none(root, lease_name(generation), schema.LEASE, limit=64 * 1024)


def written(root: storage.Location, generation: int) -> float | None:
    try:
        return root.mtime(lease_name(generation))
    except OSError:
        return None


def current(root: storage.Location) -> dict[str, Any] | None:
    """The newest lease with its state: what `status` shows. None when nobody holds the run."""
    gens = generations(root)
    if not gens:
        return None
    record = read(root, gens[-1])
    if record is None:
        return None
    st, age = state(record, written=written(root, gens[-1]))
    return {**record, "state": st, "heartbeat_age_s": round(age, 1)}


# ---- holding it ----------------------------------------------------------------------------------------


@dataclass
class Lease:
    root: storage.Location
    generation: int
    record: dict[str, Any]
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return lease_name(self.generation)

    def _write(self) -> None:
        t = _now()
        self.record["heartbeat_t"] = t
        self.record["heartbeat"] = _iso(t)
        self.record["holder"]["ray_job"] = self.record["holder"].get("ray_job") or ray_job()
        self.root.write_bytes(self.name, json.dumps(self.record, indent=1).encode())

    def still_mine(self) -> bool:
        """No newer generation exists and ours still carries our token."""
        gens = generations(self.root)
        if gens and gens[-1] > self.generation:
            return False
        record = read(self.root, self.generation)
        return record is not None and record.get("token") == self.record["token"]

    def heartbeat(self) -> bool:
        """Rewrite the lease if it is still ours; False (and `lost`) once another driver took it over."""
        if self.lost:
            return False
        if not self.still_mine():
            self.lost = True
            return False
        self._write()
        return True

    def _beat(self, interval: float) -> None:
        import _thread

        while not self._stop.wait(interval):
            try:
                alive = self.heartbeat()
            except OSError as e:  # a store hiccup: the next beat tries again, well within the expiry
                say("lease", f"heartbeat failed ({storage.reason(e)}); retrying")
                continue
            if not alive:
                say("lease", f"another driver took over {self.root.uri}; this driver stops (its lease had expired)")
                _thread.interrupt_main()
                return

    def start(self) -> None:
        interval = max(0.2, float(self.record["expiry_s"]) / 4)
        self._thread = threading.Thread(target=self._beat, args=(interval,), name="gdd-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease, if it is still ours (never another driver's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            if not self.lost and self.still_mine():
                self.root.delete(self.name)
        except OSError:
            pass  # it expires on its own

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(root: storage.Location, expiry: float | None = None, attempts: int = 5) -> Lease:
    """Take the run's lease or raise UserError naming the live holder. Writes nothing else."""
    expiry = expiry_s() if expiry is None else expiry
    for _ in range(attempts):
        gens = generations(root)
        takeover = None
        if gens:
            record = read(root, gens[-1])
            if record is None and root.exists(lease_name(gens[-1])):
                takeover = "its lease file is unreadable"
            elif record is not None:
                st, age = state(record, written=written(root, gens[-1]))
                if st == "live":
                    left = float(record["expiry_s"]) - age
                    raise UserError(
                        f"{root.uri} is in use by another driver ({describe(record)}, heartbeat {age:.0f} s ago); "
                        f"wait for it to end or stop it (ray job stop), or use another --out; if it is dead, "
                        f"its lease expires in {max(0, left):.0f} s and a rerun then takes over"
                    )
                why = "its process is gone" if st == "gone" else f"no heartbeat for {age:.0f} s"
                takeover = f"{describe(record)}: {why}"
        generation = (gens[-1] + 1) if gens else 1
        t = _now()
        record = {
            "holder": holder_info(),
            "token": uuid.uuid4().hex,
            "generation": generation,
            "started": _iso(t),
            "heartbeat": _iso(t),
            "heartbeat_t": t,
            "expiry_s": expiry,
        }
        if root.create_exclusive(lease_name(generation), json.dumps(record, indent=1).encode()):
            lease = Lease(root, generation, record)
            if takeover:
                say("lease", f"taking over {root.uri} from a driver that is no longer alive ({takeover})")
            for g in gens:  # older generations: expired or released, never a live one
                root.delete(lease_name(g))
            lease.start()
            return lease
        time.sleep(0.05)  # another driver won this generation: look again (and refuse if it is live)
    raise UserError(f"{root.uri}: could not take the run's lease ({attempts} drivers raced for it); try again")

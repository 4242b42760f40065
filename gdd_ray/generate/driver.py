"""The distribution engine: a queue of work units fed to a pool of workers, with retries and progress.

Knows nothing of diffusion: a worker is anything with `run(unit) -> UnitResult` (in process) or a Ray
actor with `run_unit.remote(unit)`. Two runners with one signature:
    run_serial(units, make_worker, ...)   in-process, for tests and debugging
    run_on_ray(units, job, ...)          one GPU actor per worker, each kept busy from the queue

Scheduling is pull-based: every ready actor holds `PIPELINE_DEPTH` units at a time and gets the next one
as soon as one finishes, so a faster GPU simply does more units. An actor reports ready only after its
start-up (model load, prompt encoding, compile and warm-up), whose times it reports apart. An actor that dies (OOM, lost node,
killed process) is replaced and its units go back to the queue; a unit that fails `max_retries` times
stops the run with that unit's error. Shards are committed by the workers, so what finished stays.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gdd_ray.errors import Terminated, UserError, last_line, sigterm_received
from gdd_ray.generate.budget import TimeBudget
from gdd_ray.generate.generator import GenerationJob, UnitGenerator, UnitResult
from gdd_ray.logs import Progress, quiet_libraries, say
from gdd_ray.plan import WorkUnit

log = logging.getLogger("gdd_ray")

# Three units in flight per actor: one rendering, one queued for the device behind it, and one (or two)
# being PNG-encoded and uploaded; an upload that takes longer than a render no longer stalls the device.
PIPELINE_DEPTH = 3


class UnitFailed(RuntimeError):
    """A unit failed every attempt (a bug, a broken node...); shards already committed stay. `details` holds
    the traceback of the last attempt, printed to the job log before the run ends."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class UnitFailedByUserError(UnitFailed, UserError):
    """A unit failed every attempt because of something the user can fix (its cause was a UserError)."""


def unit_failed(message: str, error: BaseException | None) -> UnitFailed:
    """The error that ends a run after a unit's last attempt: a user error stays one (one line, exit 2),
    anything else carries the last attempt's traceback, which is printed now, into the job log."""
    import traceback

    cause = getattr(error, "cause", None) or error  # a RayTaskError carries the worker's own exception
    if isinstance(cause, UserError):
        return UnitFailedByUserError(message)
    details = str(error) if hasattr(error, "cause") else "".join(traceback.format_exception(error)) if error else ""
    if details:
        say("generate", f"last attempt's traceback:\n{details.rstrip()}")
    return UnitFailed(message, details)


def run_serial(
    units: Iterable[WorkUnit],
    make_worker: Callable[[], UnitGenerator],
    max_retries: int = 3,
    progress: Progress | None = None,
    budget: TimeBudget | None = None,
) -> list[UnitResult]:
    """Every unit in this process, in order, with the same retry rule as the Ray runner; with a `budget`, up
    to the last round that fits it."""
    worker = make_worker()
    if budget is not None and hasattr(worker, "load"):
        worker.load()  # start-up is not the budget's time (the Ray runner's actors load before they are ready)
    results = []
    queue = deque(units)
    while queue:
        if budget is not None and not budget.allows(queue, 0):  # never None here: nothing is out at a round's end
            break
        unit = queue.popleft()
        if queue and hasattr(worker, "prefetch"):
            worker.prefetch(queue[0])  # the next unit's first noise, drawn while this one renders
        for attempt in range(1, max_retries + 1):
            try:
                results.append(worker.run(unit))
                break
            except Exception as e:
                if attempt == max_retries:
                    raise unit_failed(f"work unit {unit} failed {attempt} times: {last_line(e)}", e) from e
        if budget is not None:
            budget.finished(results[-1].images)
        if progress:
            progress.add(1, results[-1].images)
    return results


def _actor_class():
    from concurrent.futures import ThreadPoolExecutor

    import ray

    @ray.remote
    class GeneratorActor:
        """One per GPU: every device call (load, compile, warm-up, renders) on one dedicated thread, since
        CUDA graphs and compile caches are per thread; encoding and uploads on the calling threads."""

        def __init__(self, job: GenerationJob):
            quiet_libraries()
            self.gen = UnitGenerator(job)
            self.device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
            self.device_thread.submit(self.gen.load).result()  # before ready(): start-up is not a unit's time

        def ready(self) -> dict:
            import os
            import socket

            return {"pid": os.getpid(), "host": socket.gethostname(), "device": self.gen.device, **self.gen.startup}

        def run_unit(self, unit: WorkUnit) -> UnitResult:
            self.gen.prefetch(unit)  # its first noise is drawn while the device renders the units before it
            rendered = self.device_thread.submit(self.gen.render, unit).result()  # renders queue in order
            return self.gen.encode_and_write(rendered)  # meanwhile the device thread renders the next unit

    return GeneratorActor


@dataclass
class _Slot:
    """A place for one actor; `epoch` tells a replaced actor's late failures from the new one's."""

    index: int
    actor: object = None
    epoch: int = 0
    ready_ref: object = None
    ready: bool = False
    info: dict = field(default_factory=dict)
    in_flight: int = 0


def actor_options(cluster_gpus: int, worker_gpus: float | None = None) -> dict:
    """One GPU per actor where the cluster has GPUs (or as asked); a CPU otherwise. PIPELINE_DEPTH threads
    take units; the actor renders them one at a time on its device thread."""
    opts = {"max_concurrency": PIPELINE_DEPTH, "max_restarts": 0, "max_task_retries": 0}
    gpus = worker_gpus if worker_gpus is not None else (1 if cluster_gpus > 0 else 0)
    if gpus > 0:
        opts["num_gpus"] = gpus
    else:
        opts["num_cpus"] = 1
    return opts


class ActorPool:
    """One generator actor per slot, kept busy from a queue of units: `run()` returns (results, stats).

    dispatch   every ready actor gets units until it holds PIPELINE_DEPTH (with a budget: while the next
               round fits, budget.py)
    on_ready   an actor finished its start-up (its load, compile and first-batch times go in the stats)
    on_result  a unit came back: kept, or retried (its own error) or requeued with the actor replaced (the
               actor, its process or its node died)
    stats: workers_started, worker_start_s (until the first actor was ready), startup (each ready actor's
    load, text-encode, compile and first-batch seconds), replacements, failed_attempts, errors."""

    def __init__(self, units, job, workers, max_retries, progress, cluster_gpus, max_replacements, worker_gpus, budget):
        self.job, self.max_retries, self.progress, self.budget = job, max_retries, progress, budget
        self.opts = actor_options(cluster_gpus, worker_gpus)
        self.actor_cls = _actor_class()
        self.queue: deque[WorkUnit] = deque(units)
        self.attempts: Counter[WorkUnit] = Counter()
        self.results: list[UnitResult] = []
        self.max_replacements = max(3, 2 * workers) if max_replacements is None else max_replacements
        self.stats: dict = dict(
            workers_started=0, worker_start_s=None, startup=[], replacements=0, failed_attempts=0, errors=[]
        )
        self.t0 = time.perf_counter()
        self.in_flight: dict = {}  # ObjectRef -> (slot, epoch, unit)
        self.slots = [_Slot(i) for i in range(workers)]
        for s in self.slots:
            self.start(s)

    def start(self, slot: _Slot) -> None:
        slot.actor = self.actor_cls.options(**self.opts).remote(self.job)
        slot.epoch += 1
        slot.ready = False
        slot.ready_ref = slot.actor.ready.remote()
        slot.in_flight = 0
        self.stats["workers_started"] += 1

    def replace(self, slot: _Slot, cause: str) -> None:
        import ray

        self.stats["replacements"] += 1
        if self.stats["replacements"] > self.max_replacements:
            raise unit_failed(
                f"generator workers keep dying ({self.stats['replacements']} replaced); last cause: {cause}", None
            )
        say("generate", f"worker {slot.index} died ({cause}); starting a replacement")
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:
            pass
        self.start(slot)

    def fail_unit(self, unit: WorkUnit, cause: str, error: BaseException | None = None) -> None:
        self.attempts[unit] += 1
        self.stats["failed_attempts"] += 1
        self.stats["errors"] = (self.stats["errors"] + [f"{unit}: {cause}"])[-10:]
        if self.attempts[unit] >= self.max_retries:
            raise unit_failed(f"work unit {unit} failed {self.attempts[unit]} times: {cause}", error)
        self.queue.appendleft(unit)  # retry soon, so a bad unit surfaces early rather than at the end

    def dispatch(self) -> None:
        for s in self.slots:
            while s.ready and self.queue and s.in_flight < PIPELINE_DEPTH:
                if self.budget is not None:
                    allowed = self.budget.allows(self.queue, sum(u.size for *_, u in self.in_flight.values()))
                    if allowed is False:
                        self.queue.clear()  # the budget is spent: the units out finish, nothing more starts
                    if not allowed:
                        break
                unit = self.queue.popleft()
                self.in_flight[s.actor.run_unit.remote(unit)] = (s, s.epoch, unit)
                s.in_flight += 1

    def on_ready(self, slot: _Slot, ref) -> None:
        import ray
        from ray.exceptions import RayError

        try:
            slot.info = ray.get(ref)
            slot.ready = True
            self.stats["startup"] = (self.stats["startup"] + [slot.info])[-20:]
            if self.stats["worker_start_s"] is None:
                self.stats["worker_start_s"] = round(time.perf_counter() - self.t0, 3)
        except RayError as e:
            self.replace(slot, f"could not start: {last_line(e)}")

    def on_result(self, ref) -> None:
        import ray
        from ray.exceptions import RayError, RayTaskError

        slot, epoch, unit = self.in_flight.pop(ref)
        if slot.epoch == epoch:
            slot.in_flight -= 1
        try:
            result = ray.get(ref)
        except RayTaskError as e:  # the unit's own code raised: the worker is fine
            self.fail_unit(unit, last_line(e), e)
            return
        except RayError as e:  # the worker, its process or its node is gone (ActorDiedError, NodeDiedError, ...)
            cause = f"{type(e).__name__}: {last_line(e)}"
            self.fail_unit(unit, f"worker died: {cause}", e)
            if slot.epoch == epoch:
                self.replace(slot, cause)
            return
        self.results.append(result)
        if self.budget is not None:
            self.budget.finished(result.images)
        if self.progress:
            self.progress.add(1, result.images, workers=sum(s.ready for s in self.slots))

    def run(self) -> tuple[list[UnitResult], dict]:
        import ray

        try:
            while self.queue or self.in_flight:
                if sigterm_received():  # a SIGTERM whose exception some library caught: stop all the same
                    raise Terminated()
                self.dispatch()
                waiting = list(self.in_flight) + [s.ready_ref for s in self.slots if not s.ready]
                wait_s = self.progress.interval_s if self.progress else 5.0
                done, _ = ray.wait(waiting, num_returns=1, timeout=wait_s)
                if not done:
                    if self.progress:
                        self.progress.maybe_print(workers=sum(s.ready for s in self.slots))
                    continue
                starting = next((s for s in self.slots if not s.ready and s.ready_ref == done[0]), None)
                if starting is not None:
                    self.on_ready(starting, done[0])
                else:
                    self.on_result(done[0])
        finally:
            for s in self.slots:
                try:
                    ray.kill(s.actor, no_restart=True)
                except Exception:
                    pass
        return self.results, self.stats


def run_on_ray(
    units: Iterable[WorkUnit],
    job: GenerationJob,
    workers: int,
    max_retries: int = 3,
    progress: Progress | None = None,
    cluster_gpus: int | None = None,
    max_replacements: int | None = None,
    stats: dict | None = None,
    worker_gpus: float | None = None,
    budget: TimeBudget | None = None,
) -> list[UnitResult]:
    """Run every unit on `workers` actors (with a `budget`: up to the last round that fits it, see budget.py);
    `stats` (if given) receives the pool's stats (ActorPool) as they are, also when a unit fails."""
    import ray

    if cluster_gpus is None:
        cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    pool = ActorPool(units, job, workers, max_retries, progress, cluster_gpus, max_replacements, worker_gpus, budget)
    if stats is not None:
        stats.update(pool.stats)
        pool.stats = stats  # one dict: a caller that catches a failure still reads what happened
    return pool.run()[0]

"""--time-budget: index-major dispatch that stops when another round would not fit, the IPC reached, and the
later stages reading only images below it. Time is a fake clock each unit advances, never real timing."""

import json
from collections import Counter, deque

import pytest
from gen_helpers import read_images, three_class_config

from gdd_ray import pipeline, shards
from gdd_ray.config_loader import build_config
from gdd_ray.errors import UserError
from gdd_ray.generate import budget as budget_mod
from gdd_ray.generate import stage as gen_stage
from gdd_ray.generate.budget import TimeBudget, ipc_reached
from gdd_ray.generate.driver import run_serial
from gdd_ray.generate.generator import UnitGenerator, UnitResult
from gdd_ray.plan import WorkUnit, plan_units
from gdd_ray.status import format_status, run_status


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(budget_mod, "clock", fake)
    return fake


class SecondPerImage:
    """A worker whose every image takes one second of the fake clock."""

    def __init__(self, clock):
        self.clock = clock

    def run(self, unit):
        self.clock.now += unit.size
        return UnitResult(unit, unit.size, 0, unit.size, 0.0, "fake", unit.size)


def test_durations_parse_and_are_bounded(tmp_path):
    base = dict(dataset="cifar10", ipc=2, out=str(tmp_path / "r"))
    for text, seconds in [("600", 600), ("90s", 90), ("10m", 600), ("1.5h", 5400), (" 2M ", 120)]:
        assert build_config({**base, "time_budget": text}).generate.time_budget_s == seconds
    for bad in ["0s", "-5m", "10d", "ten minutes", "inf", "nan", "8000h", ""]:
        with pytest.raises(UserError, match="--time-budget must be a duration"):
            build_config({**base, "time_budget": bad})
    with pytest.raises(UserError, match="--select-by clip is not supported"):
        build_config({**base, "time_budget": "10m", "select_by": "clip", "clip_model": "tiny"})


def test_ipc_reached_is_the_last_complete_round():
    units = plan_units(3, 7, 2)  # 21 images of 3 classes in units of 2: a unit may run into the next round
    names = [u.shard_name for u in units]
    assert ipc_reached(units, set(names)) == 7
    assert ipc_reached(units, set(names[:5])) == 3  # images 0..9 done: 3 of every class
    assert ipc_reached(units, set(names[:4])) == 2  # images 0..7: class 2's image 2 is not made yet
    assert ipc_reached(units, set(names[:3] + names[6:])) == 2  # a later unit alone does not count
    assert ipc_reached(units, set()) == 0


def test_serial_dispatch_stops_when_the_next_round_would_not_fit(clock):
    units = plan_units(3, 6, 2)  # 18 images in 9 units; rounds (by a unit's first image) of 4, 2, 4, 2, 4, 2
    budget = TimeBudget(13)
    results = run_serial(units, lambda: SecondPerImage(clock), budget=budget)
    # one image = 1 s: rounds 0..3 end at 4, 6, 10 and 12 s; round 4 would end at 16 > 13
    assert [r.unit for r in results] == units[:6]
    assert ipc_reached(units, {r.unit.shard_name for r in results}) == 4
    assert budget.describe() == {"time_budget_s": 13, "budget_used_s": 12.0, "stopped_by_budget": True}
    clock.now = 0.0
    assert len(run_serial(units, lambda: SecondPerImage(clock), budget=TimeBudget(18))) == 9  # exactly fits


def test_a_new_round_waits_for_a_measurement_and_counts_what_is_out(clock):
    queue = deque(plan_units(4, 4, 2))  # 4 classes in units of 2: rounds of 2 units x 2 images
    budget = TimeBudget(100)
    assert budget.allows(queue, 0) is True  # the first round always goes out: the clock starts here
    queue.popleft(), queue.popleft()
    assert budget.allows(queue, 4) is None  # round 1, nothing finished yet: wait
    clock.now = 10.0
    budget.finished(2)  # 0.2 img/s: 2 out + round 1's 4 = 30 s more, 40 <= 100
    assert budget.allows(queue, 2) is True
    clock.now = 0.0
    late = TimeBudget(35)
    late.allows(deque(plan_units(4, 4, 2)), 0)
    clock.now = 10.0
    late.finished(2)
    assert late.allows(queue, 2) is False and late.stopped  # 10 + 30 > 35
    assert late.allows(deque([WorkUnit(2, 4, 4)]), 0) is True  # a retry of a round already out still goes


def _fake_unit_time(monkeypatch, clock, seconds_per_unit=10.0):
    original = UnitGenerator.run

    def run(self, unit):
        result = original(self, unit)
        clock.now += seconds_per_unit
        return result

    monkeypatch.setattr(UnitGenerator, "run", run)


@pytest.mark.slow  # over 2 s on 2 cores: `make test` runs it, test-fast does not
def test_budget_stops_every_class_at_one_ipc_then_a_rerun_grows_it(tmp_path, tiny_model, monkeypatch, clock, capsys):
    _fake_unit_time(monkeypatch, clock)  # 3 classes x 2 rounds of 2-image units; a round = 30 s
    cfg = three_class_config(tmp_path / "run", ipc=4, time_budget="45s", stages="generate,train")
    ctx = pipeline.check(cfg)
    plain_train_fp = ctx.fingerprint("train")
    summary = gen_stage.run(ctx, serial=True)
    assert summary["ipc"] == 2 and summary["ipc_planned"] == 4 and summary["stopped_by_budget"]
    assert summary["time_budget_s"] == 45 and summary["budget_used_s"] == 30
    assert "stopped with every class at IPC 2 of the planned 4" in capsys.readouterr().out
    gen = tmp_path / "run" / "generated"
    per_class = Counter(label for label, _ in read_images(gen))
    assert per_class == {label: 2 for label in range(3)}  # every class alike
    manifest = shards.read_manifest(shards.storage.Location(str(gen)))
    assert len(manifest.names) == 3 and manifest.images == 6 and manifest.ipc == 2
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["stages"]["generate"]["ipc"] == 2
    st = run_status(str(tmp_path / "run"))  # done for this budget, not "incomplete"; it says which IPC
    assert st["stages"][0]["state"] == "time budget reached" and st["stages"][0]["ipc_reached"] == 2
    assert "every class at IPC 2 of 4 within the time budget" in format_status(st)

    # Later stages see IPC 2 through the manifest they read (the train stage's fingerprint is the plain one:
    # nothing is rewritten mid-run), and the train stage reads only index < 2.
    from gdd_ray import lifecycle
    from gdd_ray.train import stage as train_stage

    ctx2 = pipeline.check(cfg)
    assert ctx2.fingerprint("train") == plain_train_fp
    source = lifecycle.read_source(ctx2, "train")
    assert source.ipc == 2
    data = train_stage.load_data(ctx2, source)[0]
    assert data.index.max() == 1 and data.per_class == [2] * 3

    # A rerun with the same budget grows the run: the next round, then it has the planned IPC; what the train
    # stage reads has another digest, so a train stage of the smaller set is stale (train.run redoes it).
    clock.now = 1000.0
    again = gen_stage.run(ctx2, serial=True)
    assert again["ipc"] == 4 and not again["stopped_by_budget"] and again["totals"]["units_run"] == 3
    assert "every class reached the planned IPC 4" in capsys.readouterr().out
    grown = lifecycle.read_source(ctx2, "train")
    assert grown.ipc == 4 and grown.manifest.digest != source.manifest.digest
    assert json.loads((tmp_path / "run" / "run.json").read_text())["fingerprints"]["train"] == plain_train_fp
    assert Counter(label for label, _ in read_images(gen)) == {label: 4 for label in range(3)}
    assert run_status(str(tmp_path / "run"))["stages"][0]["state"] == "complete"
    gen_stage.run(pipeline.check(cfg), serial=True)
    assert "nothing left to grow" in capsys.readouterr().out


@pytest.mark.slow  # over 2 s on 2 cores: `make test` runs it, test-fast does not
def test_a_budget_larger_than_needed_reaches_the_planned_ipc(tmp_path, tiny_model, monkeypatch, clock):
    _fake_unit_time(monkeypatch, clock)
    cfg = three_class_config(tmp_path / "run", ipc=3, time_budget="1h")
    summary = gen_stage.run(pipeline.check(cfg), serial=True)
    assert summary["ipc"] == 3 and not summary["stopped_by_budget"]
    assert summary["totals"]["images"] == 9 and len(read_images(tmp_path / "run" / "generated")) == 9


@pytest.mark.slow  # the session's local Ray, one generator actor holding up to three units
def test_ray_driver_stops_at_a_round_with_units_in_flight(tmp_path, tiny_model, monkeypatch, local_ray):

    from gdd_ray.generate.driver import run_on_ray
    from gdd_ray.generate.stage import make_job

    cfg = three_class_config(tmp_path / "run", ipc=6)
    ctx = pipeline.context(cfg)[0]
    budget = TimeBudget(13)
    # One second per image finished: at a round's start the time used plus the images out is every image
    # handed out so far, so the decision does not depend on how the actors' timing interleaves.
    monkeypatch.setattr(budget_mod, "clock", lambda: float(budget.images_done))
    units = plan_units(3, 6, 2)
    job = make_job(cfg, ctx.classes, "fp", str(tmp_path / "run" / "generated"))
    results = run_on_ray(units, job, workers=1, cluster_gpus=0, budget=budget)
    # rounds of 6 images: round 1 starts at 6 (done or out) + 6 = 12 <= 13; round 2 would end at 12 + 6 > 13
    assert sorted(r.unit for r in results) == sorted(units[:6]) and budget.stopped
    assert ipc_reached(units, {r.unit.shard_name for r in results}) == 4

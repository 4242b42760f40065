"""Sweeps: the plan shares one generation and one PDA; a tiny sweep end to end, rerun without redoing work."""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import ray
from gen_helpers import tree_digest

from gdd_ray import pipeline, sweep, synthetic
from gdd_ray.classes import dataset_classes
from gdd_ray.config_loader import build_config
from gdd_ray.errors import UserError
from gdd_ray.run import RunDir
from tests.conftest import REPO


def _stage_fingerprints(values, stage_dirs=None):
    """The fingerprints the run of `values` computes itself (what the sweep's folder names must match)."""
    cfg = build_config(values)
    return pipeline.context(cfg, RunDir(cfg.out, stage_dirs))[0].fingerprints


def test_plan_shares_generation_at_the_largest_ipc_and_k(tmp_path):
    base = {"dataset": "cifar10", "model": "sdxl-random"}
    grid = {"ipc": [2, 4], "pda_variants": [0, 2], "eval_seed": [0, 1], "steps": [1, 2]}
    planned = sweep.plan_sweep(base, grid, str(tmp_path))
    assert len(planned) == 16 and len({p["run"]["out"] for p in planned}) == 16
    assert [p["values"] for p in planned] == [dict(zip(grid, c)) for c in itertools.product(*grid.values())]
    gens = {p["group"]: p["generation"] for p in planned}
    assert len(gens) == 2  # steps decides pixels: two generations, nothing else does
    assert len({p["pda"] for p in planned}) == 2  # one PDA over each
    assert all(g["ipc"] == 4 for g in gens.values())
    assert all(p["augmentation"]["pda_variants"] == 2 and p["augmentation"]["ipc"] == 4 for p in planned)
    p = next(p for p in planned if p["values"] == {"ipc": 2, "pda_variants": 0, "eval_seed": 1, "steps": 2})
    run = p["run"]
    shape = (run["ipc"], run["train_ipc"], run["pda_variants"], run["train_variants"], run["eval_seed"])
    assert shape == (4, 2, 2, 0, 1)
    assert p["stage_dirs"]["generate"] == gens[p["group"]]["out"] + "/generated"


@pytest.mark.slow  # the fingerprints of eight generations, two models' configs: ~4 s
def test_points_that_differ_in_pixels_get_their_own_generation_keyed_by_its_fingerprint(tmp_path, tiny_model):
    base = {"dataset": "cifar10", "pda_variants": 1}
    grid = {
        "model": ["tiny", "sdxl-random"],
        "prompt_template": ["a photo of a {name}", "{name}, studio light"],
        "steps": [1, 2],
        "ipc": [2, 3],
    }
    planned = sweep.plan_sweep(base, grid, str(tmp_path))
    gens = {p["group"]: p["generation"] for p in planned}
    assert len(gens) == 8  # every (model, template, steps): its own generation; IPC shares one
    pixels = {(p["values"]["model"], p["values"]["prompt_template"], p["values"]["steps"]): p["group"] for p in planned}
    assert len(set(pixels.values())) == 8
    for gfp, gen in gens.items():
        assert gen["out"] == str(tmp_path / "data" / gfp) and gen["ipc"] == 3 and gen["stages"] == "generate"
        assert _stage_fingerprints(gen)["generate"] == gfp  # keyed by the fingerprint the run itself computes
    for p in planned:
        aug = {k: v for k, v in p["augmentation"].items() if k != "stage_dirs"}
        fps = _stage_fingerprints(aug, p["augmentation"]["stage_dirs"])
        assert (fps["generate"], fps["augment"]) == (p["group"], p["pda"])
        assert p["stage_dirs"]["augment"] == aug["out"] + "/augmented" and aug["out"].endswith(f"pda-{p['pda']}")
        gen = p["generation"]
        assert (gen["model"], gen["prompt_template"], gen["steps"]) == tuple(p["values"][k] for k in grid if k != "ipc")


def test_points_that_differ_only_in_pda_ops_get_their_own_pda_over_one_generation(tmp_path):
    flip, rotate = {"hflip": {"p": 0.5}}, {"rotate": {"degrees": 30}}
    base = {"dataset": "cifar10", "model": "sdxl-random", "ipc": 2}
    planned = sweep.plan_sweep(base, {"pda_ops": [flip, rotate], "pda_variants": [1, 3]}, str(tmp_path))
    assert len({p["group"] for p in planned}) == 1  # the same pixels: one generation
    pdas = {p["pda"]: p["augmentation"] for p in planned}
    assert len(pdas) == 2 and {a["pda_variants"] for a in pdas.values()} == {3}  # one PDA per recipe, largest K
    for p in planned:
        assert p["augmentation"]["pda_ops"] == p["values"]["pda_ops"] == p["run"]["pda_ops"]
        assert p["run"]["train_variants"] == p["values"]["pda_variants"]
        assert p["augmentation"]["stage_dirs"]["generate"] == p["stage_dirs"]["generate"]
    assert len({p["stage_dirs"]["augment"] for p in planned}) == 2


def test_protocol_only_differs_in_training(tmp_path):
    base = {"dataset": "cifar10", "model": "sdxl-random", "ipc": 10, "pda_variants": 0}
    planned = sweep.plan_sweep(base, {"protocol": ["paper", "challenge"], "pick": ["first", "spread"]}, str(tmp_path))
    assert len(planned) == 4
    assert len({p["group"] for p in planned}) == 1 and len({p["pda"] for p in planned}) == 1
    assert len({json.dumps(p["augmentation"], sort_keys=True) for p in planned}) == 1  # one PDA config
    assert {(p["run"]["protocol"], p["run"]["pick"]) for p in planned} == set(itertools.product(*[
        ["paper", "challenge"], ["first", "spread"]]))  # fmt: skip
    cfgs = [build_config(p["run"]) for p in planned]
    assert {c.train.protocol for c in cfgs} == {"paper", "challenge"} and {c.stages for c in cfgs} == {("train",)}


def test_a_sweep_refuses_clip_selection(tmp_path):
    with pytest.raises(UserError, match="--select-by clip"):
        sweep.plan_sweep({"dataset": "cifar10", "select_by": "clip"}, {"ipc": [2, 4]}, str(tmp_path))


def test_sweep_file_refusals(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("base: {dataset: cifar10}\ngrid: {ipc: 2}\n")
    with pytest.raises(UserError, match="non-empty list"):
        sweep.load_sweep(str(bad))
    bad.write_text("base: {dataset: cifar10, out: x}\ngrid: {ipc: [2]}\n")
    with pytest.raises(UserError, match="'out' is set by the sweep itself"):
        sweep.load_sweep(str(bad))


def test_a_grid_with_a_point_that_cannot_train_is_refused_before_any_image(tmp_path):
    """Every point's preflight (generate, augment and train) runs before the first generation: a point whose
    --image-size does not match the test set is named in one line, and nothing is generated."""
    names = [c.class_id for c in dataset_classes("cifar10")]
    pats = synthetic.patterns(10, 16, seed=0)
    synthetic.write_cifar(str(tmp_path / "test"), *synthetic.sample(pats, 1, seed=2), names, kind="cifar10")
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"base: {{dataset: cifar10, model: sdxl-random, gen-resolution: 64, eval-data: {tmp_path / 'test'}}}\n"
        "grid: {image-size: [16, 32], ipc: [2]}\n"
    )
    root = tmp_path / "sweep"
    with pytest.raises(UserError) as e:
        sweep.sweep(str(spec), str(root))
    msg = str(e.value)
    assert msg.startswith("sweep point imagesize32-ipc2 (") and "32" in msg and "nothing was generated" in msg
    assert not (root / "data").exists() and not (root / "points").exists()  # not one image, not one run.json


def test_leaderboard_numbers_are_rounded_and_the_frontier_holds_non_dominated_points_only():
    from gdd_ray.report_page.sweep_page import frontier, pooled

    # At equal cost the better point is on the frontier, the worse one is not (it used to join it).
    pts = [(1.0, 30.0, "a"), (1.0, 50.0, "b"), (2.0, 40.0, "c"), (3.0, 60.0, "d"), (3.0, 60.0, "e")]
    assert [p[2] for p in frontier(pts)] == ["b", "d"]
    # Error bars pool every run of the points at one (IPC, K): two seeds of one run each at 10 % and 20 %.
    mean, std = pooled([{"accuracy_mean": 0.1, "accuracy_std": 0.0, "runs": 1},
                        {"accuracy_mean": 0.2, "accuracy_std": 0.0, "runs": 1}])  # fmt: skip
    assert (mean, std) == pytest.approx((0.15, 0.05))
    mean, std = pooled([{"accuracy_mean": 0.5, "accuracy_std": 0.1, "runs": 3}])
    assert (mean, std) == pytest.approx((0.5, 0.1))
    assert sweep._round(0.030000000000000006, sweep.ACCURACY_DECIMALS) == 0.03


def test_sweep_page_links_every_point_and_draws_the_plots(tmp_path):
    import re

    from gdd_ray.report_page.sweep_page import write_sweep_page

    rows = [
        {"point": f"ipc{i}-k{k}", "ipc": i, "pda_variants": k, "accuracy_mean": 0.1 * i + 0.01 * k,
         "accuracy_std": 0.01, "images_per_class": i * (k + 1), "generation_gpu_s": 2.0 * i}
        for i in (2, 4) for k in (0, 2)
    ]  # fmt: skip
    write_sweep_page(str(tmp_path), rows)
    page = (tmp_path / "report.html").read_text()
    assert re.findall(r"href='points/([^/]+)/report.html'", page) == [r["point"] for r in rows]
    assert "42.00 ± 1.00 %" in page and page.count("<tr>") == 1 + 4 and "class='sortable'" in page
    for name in ("accuracy_vs_ipc.png", "accuracy_vs_cost.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _point_results(root) -> dict[str, str]:
    """point -> its eval/ files (content hash and mtime) once its results.json exists: a finished point."""
    return {
        d.name: tree_digest(d / "eval") for d in (root / "points").glob("*") if (d / "eval" / "results.json").exists()
    }


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two sweeps of two points: ~1 min on 2 idle cores, far more on a shared machine
def test_tiny_sweep_is_killed_resumes_without_redoing_finished_points_and_reports(tmp_path, tiny_model, local_ray):
    """ipc {2, 4} at K 2 and eval seed 1 on the tiny model, through the real CLI; the first sweep is SIGKILLed once
    a point has finished, and the second does the other. Each point is a Tune trial that trains in its own
    process (a Ray process, with its imports: seconds), so the grid is one axis: the other axis, K, is proven
    below by the rows a K-0 point over the same shared PDA reads (an eval-seed axis adds trainings and proves
    nothing these do not: each point's seed is checked).

    Both sweeps run on the session's Ray, as sweeps submitted to a running cluster do (a Ray fewer to start for
    each): the first as a driver process of its own (to be killed: Ray then ends its job's actors and trials,
    as it does for a killed `ray job submit` driver), the second as the same CLI in this process."""
    names = [c.class_id for c in dataset_classes("cifar10")]
    pats = synthetic.patterns(10, 16, seed=0)
    synthetic.write_cifar(str(tmp_path / "test"), *synthetic.sample(pats, 2, seed=2), names, kind="cifar10")
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"base: {{dataset: cifar10, model: tiny, gen-resolution: 32, image-size: 16, unit-size: 4, batch-size: 4,"
        f" eval-data: {tmp_path / 'test'}, epochs: 1, eval-runs: 1, eval-workers: 1, net-width: 8, eval-seed: 1,"
        " pda-variants: 2}\n"
        "grid: {ipc: [2, 4]}\n"
    )
    root = tmp_path / "sweep"
    # One trial at a time: the kill comes when the first point is done and the second is still to do.
    cmd = [sys.executable, str(REPO / "jobs" / "sweep.py"), "--config", str(spec), "--out", str(root)]
    log = open(tmp_path / "first.log", "w")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 900  # a safety net: the loop ends on an event (a finished point, or the exit)
        while time.time() < deadline and not _point_results(root) and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)  # the driver and Tune's controller in it: no clean-up of any kind
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        log.close()
    finished = _point_results(root)
    assert len(finished) == 1, sorted(finished)  # killed mid-way
    (data,) = (root / "data").iterdir()  # one generation folder...
    (pda,) = data.glob("pda-*")  # ...holding one PDA
    gen_sum = json.loads((data / "generated" / "_summary.json").read_text())
    aug_sum = json.loads((pda / "augmented" / "_summary.json").read_text())
    assert gen_sum["totals"]["images"] == gen_sum["totals"]["images_made"] == 10 * 4  # one generation at IPC 4
    assert aug_sum["totals"]["images"] == 10 * 4 * 3  # one PDA at K 2
    shared = {"generated": tree_digest(data / "generated"), "augmented": tree_digest(pda / "augmented")}

    from gdd_ray.cli import main as cli_main

    second = io.StringIO()
    with contextlib.redirect_stdout(second):
        code = cli_main(["sweep", "--config", str(spec), "--out", str(root), "--track", "mlflow"])
    second = second.getvalue()
    assert code == 0, second[-3000:]
    assert "resuming the Tune experiment" in second and "2 points, 1 generation(s), 1 PDA(s)" in second
    # The shared data was neither regenerated nor re-augmented, and the finished point was not trained again.
    assert {"generated": tree_digest(data / "generated"), "augmented": tree_digest(pda / "augmented")} == shared
    after = _point_results(root)
    assert len(after) == 2 and {name: after[name] for name in finished} == finished

    board = (root / "leaderboard.md").read_text()
    assert second.endswith(board)  # the CLI prints the leaderboard it wrote
    with open(root / "leaderboard.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and board.count("\n") == 2 + 2
    assert {r["ipc"]: r["images_per_class"] for r in rows} == {"2": str(2 * 3), "4": str(4 * 3)}  # IPC x (K + 1)
    assert all(r["accuracy_mean"] and r["runs"] == "1" for r in rows)
    for r in rows:  # each point trained with its own eval seed, on its prefix of the shared PDA
        res = json.loads((root / "points" / r["point"] / "eval" / "results.json").read_text())
        assert res["config"]["eval_seed"] == 1
        # trained in the trial's own process: one worker, and no Ray Train job (whose storage is eval/_ray_train)
        assert res["workers"] == 1 and not (root / "points" / r["point"] / "eval" / "_ray_train").exists()
    page = (root / "report.html").read_text()
    assert page.count("href='points/") == 2
    for plot in ("accuracy_vs_ipc.png", "accuracy_vs_cost.png"):
        assert (root / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Worst classes" in (root / "points" / rows[0]["point"] / "report.html").read_text()
    _check_points_speak_of_themselves(root, rows)
    _check_a_k0_point_reads_the_variant_prefix(spec, root, pda)
    _check_sweep_in_mlflow(root, rows)


def _check_points_speak_of_themselves(root, rows):
    """The ipc-2 point's run.json, page and status say IPC 2 and K 2, and its share of the generation;
    `compare` reads the two points."""
    from gdd_ray.cli import main as cli_main
    from gdd_ray.status import format_status, run_status

    name = "ipc2"
    point = root / "points" / name
    record = json.loads((point / "run.json").read_text())
    assert record["sweep_point"] == {"sweep": str(root), "name": name, "values": {"ipc": 2}}
    assert record["config"]["ipc"] == 4 and record["config"]["train"]["train_ipc"] == 2  # a prefix of the shared one
    assert record["config"]["train"]["train_variants"] == 2
    page = (point / "report.html").read_text()
    assert f"<title>gdd-ray sweep point {name}: cifar10, IPC 2, K 2</title>" in page
    row = next(r for r in rows if r["point"] == name)
    assert f"<b>{float(row['generation_gpu_s']):.3f} render GPU-s</b>, its share" in page
    assert "20 of the 40 images" in page
    st = run_status(str(point))
    text = format_status(st)
    assert st["ipc"] == 2 and ": cifar10, 10 classes, IPC 2, K 2 (" in text.splitlines()[0]
    assert f"sweep point {name} of {root}" in text and "a generation at IPC 4" in text
    for r in rows:  # numbers as measured, cost columns of one meaning each
        assert all(len(r[k].split(".")[-1]) <= 4 for k in ("accuracy_mean", "accuracy_std", "generation_gpu_s"))
        assert r["generation_images_per_gpu_s"] and r["shared_generation_wall_s"]
    out = io.StringIO()  # the command in this process: a python of its own costs seconds of imports
    with contextlib.redirect_stdout(out):
        code = cli_main(["compare", str(point), str(root / "points" / "ipc4"), "--html", str(root / "compare.html")])
    assert code == 0, out.getvalue()
    assert re.search(r"trained IPC\s+2\s+4", out.getvalue()) and "trained K" not in out.getvalue()  # differences only
    assert (root / "compare.html").read_text().startswith("<!DOCTYPE html>")


def _check_a_k0_point_reads_the_variant_prefix(spec, root, pda):
    """The K axis, without a training: a K-0 point planned over the same root reads this sweep's PDA (made at
    K 2), and its train stage loads variant 0 only, every image of its IPC (what a K-0 point trains on)."""
    from gdd_ray import lifecycle
    from gdd_ray.train import stage as train_stage

    base, _ = sweep.load_sweep(str(spec))
    planned = sweep.plan_sweep({**base, "ipc": 4}, {"pda_variants": [0, 2]}, str(root))
    k0 = next(p for p in planned if p["values"] == {"pda_variants": 0})
    assert k0["stage_dirs"]["augment"] == str(pda / "augmented") and k0["run"]["train_variants"] == 0
    ctx = pipeline.checked_context(build_config(k0["run"]), sweep.point_run_dir(k0, str(root)))[0]
    distilled, _, _ = train_stage.load_data(ctx, lifecycle.read_source(ctx, "train"))
    assert distilled.variant.tolist() == [0] * 40 and distilled.per_class == [4] * 10
    assert not (root / "points" / k0["name"]).exists()  # read only


def _check_sweep_in_mlflow(root, rows):
    """--track mlflow: one parent run for the sweep, one child per point, read back from the local store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "gdd-ray"]
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.params["sweep.grid.ipc"] == "[2, 4]"
    assert "leaderboard.csv" in {f.path for f in client.list_artifacts(parents[0].info.run_id)}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(c.info.run_name for c in children) == sorted(r["point"] for r in rows)
    for c in children:
        res = json.loads((root / "points" / c.info.run_name / "eval" / "results.json").read_text())
        assert c.data.params["trained.ipc"] == str(res["train_set"]["selection"]["index_below"])
        assert c.data.metrics["accuracy_mean"] == pytest.approx(res["accuracy_mean"])
        assert c.data.tags["train_set.digest"] == res["train_set"]["digest"]
        assert {"report.html", "results.json"} <= {f.path for f in client.list_artifacts(c.info.run_id)}


def test_networks_labels_and_baselines_are_axes_and_points_of_one_protocol_share_their_baselines(tmp_path):
    base = {"dataset": "cifar10", "model": "sdxl-random", "ipc": 4, "eval_data": "test", "real_train_data": "train",
            "eval_full_data": True}  # fmt: skip
    grid = {"eval_nets": ["convnet", "convnet,resnet18"], "pda_variants": [0, 1]}
    planned = sweep.plan_sweep(base, grid, str(tmp_path))
    assert {p["run"]["baselines_dir"] for p in planned} == {os.path.join(str(tmp_path), "baselines")}
    assert len({p["group"] for p in planned}) == 1  # networks decide no pixels: one generation
    keys = {tuple(p["values"].values()): sweep.baseline_keys(build_config(p["run"])) for p in planned}
    # Another K is another IPC of random images (4 x (K + 1)); the full set is the same: shared.
    assert len(keys[("convnet", 0)]) == 2 and keys[("convnet", 0)] & keys[("convnet", 1)]
    assert keys[("convnet", 0)] != keys[("convnet", 1)]
    # Adding ResNet-18 adds its own baselines and shares ConvNet's.
    assert keys[("convnet", 0)] < keys[("convnet,resnet18", 0)] and len(keys[("convnet,resnet18", 0)]) == 4


def test_leaderboard_columns_of_the_protocols(tmp_path):
    def ev(data, net, name, labels, acc):
        return {"data": data, "net": net, "net_name": name, "labels": labels, "accuracy_mean": acc}

    res = {
        "evaluations": [ev("distilled", "convnet", "ConvNet-3", "hard", 0.5), ev("distilled", "resnet18", "ResNet-18",
               "hard", 0.4), ev("random", "convnet", "ConvNet-3", "hard", 0.3), ev("full", "convnet", "ConvNet-3",
               "hard", 0.9)],
        "scores": [{"net": "convnet", "labels": "hard", "ior": {"mean": 0.2}, "hlr": {"mean": 0.4}, "lrs": {"mean": 0.33}}],
    }  # fmt: skip
    cols = sweep.protocol_columns(res)
    assert cols == {"ResNet-18 hard": 0.4, "random_real": 0.3, "full_data": 0.9, "ior": 0.2, "hlr": 0.4, "lrs": 0.33}
    rows = [{"point": "a", "accuracy_mean": 0.5, "accuracy_std": 0.0, **cols}, {"point": "b", "accuracy_mean": 0.4,
            "accuracy_std": 0.0}]  # fmt: skip
    sweep.write_leaderboard(str(tmp_path), rows)
    md = (tmp_path / "leaderboard.md").read_text()
    assert "| ResNet-18 hard |" in md.splitlines()[0] and "| 40.00 % |" in md and "| 20.00 % |" in md
    with open(tmp_path / "leaderboard.csv") as fh:
        assert [r["ior"] for r in csv.DictReader(fh)] == ["0.2", ""]


def test_shared_baselines_are_trained_once_before_the_points(tmp_path, monkeypatch):
    base = {"dataset": "cifar10", "model": "sdxl-random", "ipc": 4, "eval_data": "test", "real_train_data": "train"}
    grid = {"eval_seed": [0, 1], "eval_every": [5, 10]}  # --eval-every decides no number: shared baselines
    planned = sweep.plan_sweep(base, grid, str(tmp_path))
    ran = []
    monkeypatch.setattr(
        pipeline, "run", lambda cfg, run_dir=None: ran.append((cfg.train.eval_seed, cfg.train.eval_every))
    )
    assert sweep.run_shared_baselines(planned) == 2
    # The first point of each seed's baselines, once; the other point of that seed finds them done (in Tune).
    assert ran == [(0, 5), (1, 5)]
    plain = sweep.plan_sweep({k: v for k, v in base.items() if k != "real_train_data"}, grid, str(tmp_path / "p"))
    assert sweep.run_shared_baselines(plain) == 0  # no baselines: nothing runs before Tune

"""Sweeps: the plan shares one generation and one PDA; a tiny sweep end to end, rerun without redoing work."""

from __future__ import annotations

import csv
import json

import pytest
import ray
from gen_helpers import tree_digest

from gdd_ray import sweep, synthetic
from gdd_ray.classes import dataset_classes
from gdd_ray.errors import UserError


def test_plan_shares_generation_at_the_largest_ipc_and_k(tmp_path):
    base = {"dataset": "cifar10", "model": "tiny"}
    grid = {"ipc": [2, 4], "pda_variants": [0, 2], "eval_seed": [0, 1], "steps": [1, 2]}
    planned = sweep.plan_sweep(base, grid, str(tmp_path))
    assert len(planned) == 16 and len({p["run"]["out"] for p in planned}) == 16
    groups = {p["group"]: p["data"] for p in planned}
    assert len(groups) == 2  # steps decides pixels: two generations, nothing else does
    assert all(d["ipc"] == 4 and d["pda_variants"] == 2 for d in groups.values())
    p = next(p for p in planned if p["values"] == {"ipc": 2, "pda_variants": 0, "eval_seed": 1, "steps": 2})
    assert (p["run"]["ipc"], p["run"]["train_ipc"], p["run"]["pda_variants"], p["run"]["train_variants"]) == (
        4,
        2,
        2,
        0,
    )
    assert p["stage_dirs"]["generate"] == groups[p["group"]]["out"] + "/generated"


def test_sweep_file_refusals(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("base: {dataset: cifar10}\ngrid: {ipc: 2}\n")
    with pytest.raises(UserError, match="non-empty list"):
        sweep.load_sweep(str(bad))
    bad.write_text("base: {dataset: cifar10, out: x}\ngrid: {ipc: [2]}\n")
    with pytest.raises(UserError, match="'out' is set by the sweep itself"):
        sweep.load_sweep(str(bad))


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


@pytest.mark.slow
def test_tiny_sweep_one_generation_one_pda_leaderboard_and_resume(tmp_path, tiny_model):
    names = [c.class_id for c in dataset_classes("cifar10")]
    pats = synthetic.patterns(10, 16, seed=0)
    synthetic.write_cifar(str(tmp_path / "test"), *synthetic.sample(pats, 2, seed=2), names, kind="cifar10")
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"base: {{dataset: cifar10, model: tiny, gen-resolution: 64, image-size: 16, unit-size: 2, batch-size: 2,"
        f" eval-data: {tmp_path / 'test'}, epochs: 1, eval-runs: 1, eval-workers: 1, net-width: 8}}\n"
        "grid: {ipc: [2, 4], pda-variants: [0, 2]}\n"
    )
    root = tmp_path / "sweep"
    rows = sweep.sweep(str(spec), str(root))
    assert not ray.is_initialized()  # the sweep started Ray, so it shut it down (nothing left for the next test)
    data = list((root / "data").iterdir())
    assert len(data) == 1  # one generation and one PDA served the four points
    gen = json.loads((data[0] / "generated" / "_summary.json").read_text())
    aug = json.loads((data[0] / "augmented" / "_summary.json").read_text())
    assert gen["totals"]["images"] == 40 and aug["totals"]["images"] == 40 * 3
    per_class = {(r["ipc"], r["pda_variants"]): r["images_per_class"] for r in rows}
    assert per_class == {(2, 0): 2, (2, 2): 6, (4, 0): 4, (4, 2): 12}
    assert all(r["accuracy_mean"] is not None and r["runs"] == 1 for r in rows)
    with open(root / "leaderboard.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert (root / "leaderboard.md").read_text().count("\n") == 2 + 4
    assert (root / "report.html").read_text().count("href='points/") == 4
    point = root / "points" / rows[0]["point"]
    assert "Worst classes" in (point / "report.html").read_text()

    # Rerun: nothing is generated, augmented or trained again.
    before = {stage: tree_digest(data[0] / stage) for stage in ("generated", "augmented")}
    finished = {
        r["point"]: json.loads((root / "points" / r["point"] / "eval" / "results.json").read_text())["finished"]
        for r in rows
    }
    again = sweep.sweep(str(spec), str(root))
    assert [r["accuracy_mean"] for r in again] == [r["accuracy_mean"] for r in rows]
    assert {stage: tree_digest(data[0] / stage) for stage in ("generated", "augmented")} == before
    for name, when in finished.items():
        assert json.loads((root / "points" / name / "eval" / "results.json").read_text())["finished"] == when

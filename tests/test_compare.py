"""Research tools on finished runs: `compare` (text table + compare.html) and MLflow tracking read back from a
real local store. The runs are small real ones: the train stage's pieces in-process (gen_helpers.trained_run)."""

from __future__ import annotations

import json
import re

import pytest
from gen_helpers import trained_run

from gdd_ray import compare, tracking
from gdd_ray.cli import main as cli_main
from gdd_ray.config_loader import build_config
from gdd_ray.errors import UserError


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A (eval seed 0, 2 epochs) and B (eval seed 1, 3 epochs): the same images, trained differently."""
    root = tmp_path_factory.mktemp("runs")
    a = trained_run(root / "a", root / "test")
    b = trained_run(root / "b", root / "test", eval_seed=1, epochs=3)
    return root, a, b


@pytest.mark.slow  # two trained runs (the module's `two_runs`): ~5 s
def test_compare_prints_the_table_and_writes_a_self_contained_page(two_runs, tmp_path, capsys):
    root, a, b = two_runs
    html = tmp_path / "compare.html"
    assert cli_main(["compare", a.uri, b.uri, "--html", str(html), "--classes", "2"]) == 0
    out = capsys.readouterr().out
    res_a, res_b = (json.loads((root / r / "eval" / "results.json").read_text()) for r in ("a", "b"))
    delta = 100 * (res_b["accuracy_mean"] - res_a["accuracy_mean"])
    assert f"{100 * res_a['accuracy_mean']:.2f} ± {100 * res_a['accuracy_std']:.2f}" in out and f"{delta:+.2f}" in out
    assert re.search(r"train\.epochs\s+2\s+3", out) and re.search(r"train\.eval_seed\s+0\s+1", out)
    assert "train.eval_data" not in out and "out " not in out  # only what differs (never --out itself)
    assert res_a["train_set"]["digest"] in out and "every run trained on the same set (equal digests)" in out
    moved = {c["label"]: c["accuracy"] for c in res_b["per_class"]}
    for c in res_a["per_class"]:  # each class that moved is named with its prompt and both accuracies
        if c["accuracy"] != moved[c["label"]]:
            assert f"{c['name']}" in out and f"prompt: '{c['prompt']}'" in out
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "gdd-ray compare: a vs b" in page
    assert "Config keys that differ" in page and "Training curves" in page and "data:image/png;base64," in page
    assert not re.search(r"(src|href)=['\"](https?:|//)", page)  # self-contained: nothing fetched
    # errors: one line each
    assert cli_main(["compare", a.uri]) == 2 and "two or more runs" in capsys.readouterr().err
    assert cli_main(["compare", a.uri, str(tmp_path / "none")]) == 2
    assert "no run was started" in capsys.readouterr().err


@pytest.mark.slow  # a third trained run
def test_compare_of_runs_with_other_classes_skips_the_per_class_table(two_runs, tmp_path):
    root, a, _ = two_runs
    other = trained_run(tmp_path / "four", tmp_path / "test4", num_classes=4)
    runs = [compare.load(a.uri), compare.load(other.uri)]
    assert compare.class_changes(*runs, 5) is None
    assert "not comparable (another class list" in compare.text_report(runs, 5)


@pytest.mark.slow  # over 2 s on 2 cores: `make test` runs it, test-fast does not
def test_track_a_run_to_mlflow_and_read_it_back(two_runs, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    root, a, _ = two_runs
    store = tmp_path / "store"
    run_id = tracking.track_run(a.uri, str(store), "gdd-ray-test")
    assert run_id and f"logged run {run_id}" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    got = client.get_run(run_id)
    res = json.loads((root / "a" / "eval" / "results.json").read_text())
    record = json.loads((root / "a" / "run.json").read_text())
    p, m, t = got.data.params, got.data.metrics, got.data.tags
    assert got.info.status == "FINISHED" and got.info.run_name == "a"
    assert p["train.epochs"] == "2" and p["dataset"] == "cifar10" and p["augment.pda_variants"] == "1"
    assert p["trained.ipc"] == "2" and p["train.eval_data"] == record["config"]["train"]["eval_data"]
    assert m["accuracy_mean"] == pytest.approx(res["accuracy_mean"]) and m["accuracy.run1"] == res["accuracies"][1]
    for c in res["per_class"]:
        assert m[f"class_acc.{c['label']:04d}.{c['name']}"] == pytest.approx(c["accuracy"])
    losses = client.get_metric_history(run_id, "run0.train_loss")
    assert sorted(x.step for x in losses) == [1, 2]  # per epoch, counted from 1
    assert {x.step for x in client.get_metric_history(run_id, "run1.test_acc")} == {2}
    assert t["fingerprint.train"] == record["fingerprints"]["train"] and t["official"] == "false"
    assert t["train_set.digest"] == res["train_set"]["digest"] and t["lr_drop_epoch"] == "2"
    arts = {f.path for f in client.list_artifacts(run_id)}
    assert {"report.html", "results.json", "curve.png", "samples.png"} <= arts
    back = client.download_artifacts(run_id, "results.json", str(tmp_path / "dl"))
    assert json.loads(open(back).read()) == res

    # A store that cannot be written: one line, no exception, the run stands.
    assert tracking.track_run(a.uri, "sqlite:////proc/no/mlflow.db", "x") is None
    line = capsys.readouterr().out.strip()
    assert line.startswith("[track] not logged to sqlite:////proc/no/mlflow.db") and "\n" not in line


def test_tracking_options_need_track_mlflow(tmp_path):
    with pytest.raises(UserError, match="add --track mlflow"):
        build_config({"out": str(tmp_path), "dataset": "cifar10", "ipc": 2, "track_uri": "http://x"})
    cfg = build_config({"out": str(tmp_path), "dataset": "cifar10", "ipc": 2, "track": "mlflow"})
    assert tracking.resolve_uri(cfg.track_uri, cfg.out) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.resolve_uri(str(tmp_path / "s"), cfg.out) == f"sqlite:///{tmp_path}/s/mlflow.db"
    assert tracking.resolve_uri("http://mlflow:5000", cfg.out) == "http://mlflow:5000"
    assert tracking.resolve_uri(None, "s3://bucket/run").endswith("/mlflow.db")

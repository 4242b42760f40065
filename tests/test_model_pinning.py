"""Models pinned to a revision (resolved once on the driver, in the fingerprint, passed to the workers), the
watermarker off whatever is installed, and a bug that is not the user's ending as exit 1 with its traceback."""

from __future__ import annotations

import pytest
from gen_helpers import tiny_config

from gdd_ray import pipeline
from gdd_ray.cli import guarded
from gdd_ray.errors import UserError
from gdd_ray.generate import model as gen_model
from gdd_ray.generate import stage as gen_stage
from gdd_ray.generate.driver import UnitFailed, unit_failed

SHA_A = "a" * 40
SHA_B = "b" * 40


@pytest.fixture
def fake_hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache layout holding `org/model` with refs/main -> a commit; the hub is offline."""
    cache = tmp_path / "hub"
    refs = cache / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(SHA_A)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gen_model.resolve_revision.cache_clear()
    yield refs
    gen_model.resolve_revision.cache_clear()


def test_a_hub_model_is_pinned_to_the_commit_its_ref_points_to(fake_hub_cache):
    assert gen_model.resolve_revision("org/model", None) == SHA_A
    assert gen_model.resolve_revision("org/model", SHA_B) == SHA_B  # a commit is taken as given
    with pytest.raises(UserError, match="cannot pin revision 'v2' offline"):
        gen_model.resolve_revision("org/model", "v2")
    (fake_hub_cache / "v2").write_text(SHA_B)
    assert gen_model.resolve_revision("org/model", "v2") == SHA_B


def test_local_models_take_no_revision(tiny_model):
    assert gen_model.resolve_revision("tiny", None) is None
    assert gen_model.resolve_revision(str(tiny_model), None) is None
    with pytest.raises(UserError, match="applies to a hub id"):
        gen_model.resolve_revision("tiny", "main")


def test_the_revision_is_in_the_fingerprint_and_the_job(fake_hub_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(gen_stage, "resolve_model", lambda m: m)  # the model's files are not needed here
    cfg = tiny_config(tmp_path / "run", model="org/model")
    assert gen_stage.resolved_inputs(cfg)["model_revision"] == SHA_A
    fp_a = pipeline.stage_inputs(cfg, [], None)[0]["generate"]
    job = gen_stage.make_job(cfg, [], "fp", str(tmp_path))
    assert job.model_revision == SHA_A
    # The branch moves on: a new driver resolves the new commit, and the fingerprint changes with it, so a
    # resume refuses to mix the two snapshots (the run-folder rule that refuses a changed fingerprint).
    (fake_hub_cache / "main").write_text(SHA_B)
    gen_model.resolve_revision.cache_clear()
    assert pipeline.stage_inputs(cfg, [], None)[0]["generate"] != fp_a


def test_the_watermarker_stays_off_even_when_installed(tiny_model, monkeypatch):
    """Pretend `invisible-watermark` is installed (diffusers then adds a watermarker by default)."""
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl as sdxl

    class FakeWatermarker:
        def apply_watermark(self, images):
            raise AssertionError("the watermarker ran")

    monkeypatch.setattr(sdxl, "is_invisible_watermark_available", lambda: True)
    monkeypatch.setattr(sdxl, "StableDiffusionXLWatermarker", FakeWatermarker, raising=False)
    pipe = gen_model.load_pipeline("tiny", device="cpu")
    assert pipe.watermark is None


def test_a_bug_exits_1_with_its_traceback_and_a_summary_last(capsys):
    def buggy():
        raise KeyError("oops")

    assert guarded(buggy) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("Traceback") and err[-1].startswith("internal error: KeyError: 'oops'")


def test_a_unit_failing_from_a_bug_is_not_a_user_error(capsys):
    try:
        {}["x"]
    except KeyError as e:
        failed = unit_failed("work unit u failed 3 times", e)
    assert isinstance(failed, UnitFailed) and not isinstance(failed, UserError)
    assert "KeyError" in failed.details and "Traceback" in capsys.readouterr().out  # printed to the job log
    assert isinstance(unit_failed("work unit u failed 3 times", UserError("bad")), UserError)

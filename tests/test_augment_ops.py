"""PDA ops: recipe parsing, determinism, and what each op does to the pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gdd_ray.augment import ops
from gdd_ray.augment import recipe as recipes
from gdd_ray.config_loader import build_config
from gdd_ray.errors import UserError
from gdd_ray.plan import variant_seed
from gdd_ray.synthetic import pattern_image


def batch(n: int = 6, size: int = 16) -> torch.Tensor:
    return torch.from_numpy(np.stack([pattern_image(i, size) for i in range(n)])).permute(0, 3, 1, 2).contiguous()


def test_default_recipe_is_the_papers():
    recipe = dict(recipes.resolve_ops(None))
    assert list(recipe) == ["hflip", "vflip", "brightness_contrast", "rotate", "gamma"]
    assert recipe["hflip"]["p"] == recipe["vflip"]["p"] == 0.8
    assert recipe["brightness_contrast"] == {"p": 0.5, "brightness": 0.2, "contrast": 0.2}
    assert recipe["rotate"] == {"p": 0.8, "degrees": 60.0, "border": "reflect"}
    assert recipe["gamma"] == {"p": 0.5, "low": 0.8, "high": 1.2}


def test_custom_recipe_keeps_order_and_fills_defaults():
    recipe = recipes.resolve_ops({"rotate": {"degrees": 10}, "hflip": None})
    assert recipe == [("rotate", {"p": 0.8, "degrees": 10, "border": "reflect"}), ("hflip", {"p": 0.8})]


@pytest.mark.parametrize(
    "pda_ops, words",
    [
        ({"blur": {}}, "unknown op 'blur'"),
        ({"hflip": {"prob": 0.5}}, "no parameter(s) prob"),
        ({"hflip": {"p": 1.5}}, "hflip.p must be a number in [0.0, 1.0]"),
        ({"rotate": {"border": "wrap"}}, "rotate.border must be one of"),
        ({"gamma": {"low": 1.3, "high": 1.1}}, "gamma.low (1.3) must not exceed"),
        ({"hflip": 0.5}, "'hflip' takes a mapping"),
    ],
)
def test_bad_recipes_say_what_is_wrong(pda_ops, words):
    with pytest.raises(UserError) as e:
        recipes.resolve_ops(pda_ops)
    assert words in str(e.value)


def test_config_takes_ops_from_yaml_and_rejects_negative_k(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("out: /tmp/x\ndataset: cifar10\nipc: 2\npda-variants: 2\npda-ops:\n  vflip: {p: 1.0}\n  gamma: {}\n")
    cfg = build_config({}, str(y))
    assert [n for n, _ in recipes.resolve_ops(cfg.augment.pda_ops)] == ["vflip", "gamma"]
    from gdd_ray.config_loader import config_from_args

    flags = ["--out", "/tmp/x", "--dataset", "cifar10", "--ipc", "2"]
    cli = config_from_args([*flags, "--pda-ops", '{"rotate": {"degrees": 30}, "hflip": {}}'])
    assert recipes.resolve_ops(cli.augment.pda_ops)[0] == ("rotate", {"p": 0.8, "degrees": 30, "border": "reflect"})
    with pytest.raises(UserError, match="--pda-ops is not valid JSON"):
        config_from_args([*flags, "--pda-ops", "{rotate"])
    with pytest.raises(UserError, match="--pda-variants must be at least 0"):
        build_config({"out": "/tmp/x", "dataset": "cifar10", "ipc": 2, "pda_variants": -1})


def test_variant_seeds():
    assert variant_seed(123, 0) == 123
    seeds = {variant_seed(s, v) for s in range(50) for v in range(1, 5)}
    assert len(seeds) == 200  # no collisions between images or variants
    assert variant_seed(7, 1) == variant_seed(7, 1)


def test_same_seed_same_pixels_whatever_the_batch():
    x, recipe = batch(8), recipes.resolve_ops(None)
    seeds = [variant_seed(1000 + i, 1) for i in range(8)]
    whole = ops.augment(x, seeds, recipe)
    assert torch.equal(whole, ops.augment(x, seeds, recipe))
    one_by_one = torch.cat([ops.augment(x[i : i + 1], seeds[i : i + 1], recipe) for i in range(8)])
    assert torch.equal(whole, one_by_one)
    shuffled = [3, 1, 7, 0, 5, 2, 6, 4]
    assert torch.equal(ops.augment(x[shuffled], [seeds[i] for i in shuffled], recipe), whole[shuffled])
    other = ops.augment(x, [variant_seed(1000 + i, 2) for i in range(8)], recipe)
    assert not torch.equal(whole, other)
    assert whole.dtype == torch.uint8 and whole.shape == x.shape


def test_probabilities_zero_and_one():
    x = batch(5)
    seeds = list(range(5))
    off = recipes.resolve_ops({k: {"p": 0.0} for k in recipes.DEFAULT_OPS})
    assert torch.equal(ops.augment(x, seeds, off), x)
    assert torch.equal(ops.augment(x, seeds, recipes.resolve_ops({"hflip": {"p": 1.0}})), x.flip(-1))
    assert torch.equal(ops.augment(x, seeds, recipes.resolve_ops({"vflip": {"p": 1.0}})), x.flip(-2))
    no_turn = recipes.resolve_ops({"rotate": {"p": 1.0, "degrees": 0.0}})
    assert torch.equal(ops.augment(x, seeds, no_turn), x)
    flat_gamma = recipes.resolve_ops({"gamma": {"p": 1.0, "low": 1.0, "high": 1.0}})
    assert torch.equal(ops.augment(x, seeds, flat_gamma), x)


def test_flip_rate_follows_p():
    x = batch(1).repeat(400, 1, 1, 1)
    out = ops.augment(x, [variant_seed(s, 1) for s in range(400)], recipes.resolve_ops({"hflip": {"p": 0.8}}))
    flipped = (out == x.flip(-1)).flatten(1).all(1).float().mean().item()
    assert 0.72 < flipped < 0.88


def test_rotation_reflects_borders_and_keeps_centre():
    x = torch.full((1, 3, 32, 32), 200, dtype=torch.uint8)
    x[..., 14:18, 14:18] = 10  # a dark centre square: stays in the middle whatever the angle
    turned = ops.augment(x, [5], recipes.resolve_ops({"rotate": {"p": 1.0, "degrees": 45.0}}))
    assert turned[..., 15:17, 15:17].max() < 60
    assert turned[..., :3, :3].min() > 150  # reflected, not zero-filled corners
    zeros = ops.augment(x, [5], recipes.resolve_ops({"rotate": {"p": 1.0, "degrees": 45.0, "border": "zeros"}}))
    assert zeros[..., 0, 0].max() < 100


def test_brightness_contrast_and_gamma_move_intensities_within_limits():
    x = torch.full((200, 3, 8, 8), 128, dtype=torch.uint8)
    seeds = list(range(200))
    bc = ops.augment(x, seeds, recipes.resolve_ops({"brightness_contrast": {"p": 1.0}})).float()
    # 128/255 * [0.8, 1.2] + [-0.2, 0.2] -> about [51, 205]
    assert 45 < bc.min() and bc.max() < 210 and bc.std() > 10
    g = ops.augment(x, seeds, recipes.resolve_ops({"gamma": {"p": 1.0}})).float()
    lo, hi = 255 * (128 / 255) ** 1.2, 255 * (128 / 255) ** 0.8
    assert lo - 1 <= g.min() and g.max() <= hi + 1 and g.std() > 2


def test_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        ops.augment(torch.zeros(1, 3, 4, 4), [0], recipes.resolve_ops(None))
    with pytest.raises(ValueError, match="seeds"):
        ops.augment(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), [0], recipes.resolve_ops(None))


@pytest.mark.slow  # over 2 s on 2 cores: `make test` runs it, test-fast does not
def test_fingerprint_follows_what_decides_the_pixels():
    from gdd_ray.classes import load_classes
    from gdd_ray.pipeline import stage_inputs
    from gdd_ray.run import RunDir

    def fp(cfg=None, **kw):
        cfg = cfg or build_config({"out": "/tmp/x", "dataset": "cifar10", "ipc": 2, "stages": "augment", **kw})
        return stage_inputs(cfg, load_classes("cifar10", None), RunDir(cfg.out))[0]["augment"]

    cfg = build_config({"out": "/tmp/x", "dataset": "cifar10", "ipc": 2, "stages": "augment"})
    base = fp()
    assert base == fp(ipc=5)  # more images, same recipe: resumable
    assert base != fp(pda_variants=3)
    assert base != fp(seed=3)  # other generated images
    assert base == fp(cfg.replace(**{"augment.pda_ops": dict(recipes.DEFAULT_OPS)}))  # the defaults, written out
    assert base != fp(cfg.replace(**{"augment.pda_ops": {"hflip": {}, "vflip": {}}}))
    swapped = {"vflip": {}, "hflip": {}}  # same ops, other order: other pixels
    assert fp(cfg.replace(**{"augment.pda_ops": swapped})) != fp(
        cfg.replace(**{"augment.pda_ops": {"hflip": {}, "vflip": {}}})
    )
    k0 = cfg.replace(**{"augment.pda_variants": 0})
    assert fp(k0) == fp(k0.replace(**{"augment.pda_ops": {"gamma": {}}}))  # pass-through: the recipe decides nothing


def _generated_table(n: int, size: int = 12):
    """One generated shard's rows (class 0, images 0..n-1) of pattern pictures, as the generate stage writes them."""
    from gdd_ray import shards, synthetic
    from gdd_ray.plan import WorkUnit, image_seed

    unit = WorkUnit(0, n, 1)  # a grid one class wide: images 0..n-1 of class 0
    seeds = [image_seed(0, 0, i) for i in range(n)]
    pngs = [shards.encode_png(synthetic.pattern_image(s, size)) for s in seeds]
    return shards.generated_table(unit, ["c0"] * n, ["zero"] * n, ["zero"] * n, seeds, pngs)


def _variants(table):
    from gdd_ray import shards

    out: dict[int, list] = {}
    for img, i in zip(table.column("image").to_pylist(), table.column("index").to_pylist()):
        out.setdefault(i, []).append(shards.decode_png(img["bytes"]))
    return out


def test_no_variant_repeats_its_image_and_the_redraw_is_deterministic():
    """A draw that leaves an image unchanged (here: p = 0.5 flips and a 0.5 chance of a turn, so 1 draw in 8
    changes nothing) or equal to an earlier variant is drawn again from a derived seed; the shard records it."""
    from gdd_ray import shards
    from gdd_ray.augment import shard as aug_shard

    recipe = recipes.resolve_ops({"hflip": {"p": 0.5}, "vflip": {"p": 0.5}, "rotate": {"p": 0.5, "degrees": 30}})
    table = _generated_table(24)
    first = ops.augment(
        torch.from_numpy(np.stack([v[0] for v in _variants(table).values()])).permute(0, 3, 1, 2),
        [variant_seed(s, 1) for s in table.column("seed").to_pylist()],
        recipe,
    )
    originals = torch.from_numpy(np.stack([v[0] for v in _variants(table).values()])).permute(0, 3, 1, 2)
    assert (first == originals).flatten(1).all(1).any()  # without the redraw some variant 1 is its original

    out = aug_shard.augment_table(table, 3, recipe)
    for i, imgs in _variants(out).items():
        assert len(imgs) == 4
        for a in range(4):
            for b in range(a):
                assert not np.array_equal(imgs[a], imgs[b]), (i, a, b)
    assert aug_shard.augment_table(table, 3, recipe).equals(out)  # deterministic
    small = aug_shard.augment_table(table, 1, recipe)  # a smaller K is still a prefix of a larger one
    rows = [r for r in out.to_pylist() if r["variant"] <= 1]
    assert [r["image"]["bytes"] for r in rows] == [r["image"]["bytes"] for r in small.to_pylist()]
    # variant_seed is the seed each variant was drawn from: redrawing it from there gives its pixels
    seeds, variants = out.column("variant_seed").to_pylist(), out.column("variant").to_pylist()
    firsts = {variant_seed(x, v) for x in table.column("seed").to_pylist() for v in (1, 2, 3)}
    assert any(v and s not in firsts for s, v in zip(seeds, variants))  # some variants came from a redraw
    drawn = [r for r in out.to_pylist() if r["variant"]]
    src = originals[[r["index"] for r in drawn]]
    again = ops.augment(src, [r["variant_seed"] for r in drawn], recipe).permute(0, 2, 3, 1).numpy()
    for r, img in zip(drawn, again):
        assert np.array_equal(img, shards.decode_png(r["image"]["bytes"]))


def test_a_recipe_that_changes_nothing_keeps_its_repeats():
    from gdd_ray.augment import shard as aug_shard

    table = _generated_table(3)
    out = aug_shard.augment_table(table, 2, recipes.resolve_ops({"rotate": {"p": 1.0, "degrees": 0.0}}))
    imgs = _variants(out)
    assert all(np.array_equal(v[0], v[k]) for v in imgs.values() for k in (1, 2))  # no endless redraw

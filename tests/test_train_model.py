"""ConvNet shapes and parameter counts; each DSA op does what it says and is reproducible from its seed."""

from __future__ import annotations

import pytest
import torch

from gdd_ray.train import dsa
from gdd_ray.train.convnet import ConvNet, num_parameters


@pytest.mark.parametrize(
    "classes,size,expected",
    [(100, 32, 504_420), (200, 64, 1_938_120), (10, 32, 320_010)],
)
def test_convnetd3_parameter_counts(classes, size, expected):
    model = ConvNet(classes, size)
    assert num_parameters(model) == expected
    # Instance norm is GroupNorm with one group per channel, affine (as in the DC codebase).
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 3 and all(n.num_groups == n.num_channels == 128 and n.affine for n in norms)
    assert model(torch.zeros(2, 3, size, size)).shape == (2, classes)


@pytest.mark.parametrize("norm", ["instance", "batch", "group", "none"])
@pytest.mark.parametrize("act,pool", [("relu", "avg"), ("leakyrelu", "max"), ("sigmoid", "none")])
def test_convnet_options(norm, act, pool):
    model = ConvNet(7, 16, depth=2, width=8, norm=norm, act=act, pool=pool)
    out = model(torch.randn(4, 3, 16, 16))
    assert out.shape == (4, 7)
    feat = 8 * (4 * 4 if pool != "none" else 16 * 16)
    assert model.classifier.in_features == feat


def test_convnet_rejects_too_deep():
    with pytest.raises(ValueError, match="pools"):
        ConvNet(10, 4, depth=3)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _img(n=16, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=_g(seed)) * 2 - 1


def test_flip_flips_with_its_probability():
    x = _img()
    assert torch.equal(dsa.flip(x, dsa.DSAParams(prob_flip=1.0), _g()), x.flip(3))
    assert torch.equal(dsa.flip(x, dsa.DSAParams(prob_flip=0.0), _g()), x)
    y = dsa.flip(_img(400, 4), dsa.DSAParams(), _g())
    flipped = (y == _img(400, 4).flip(3)).flatten(1).all(1).float().mean().item()
    assert 0.4 < flipped < 0.6


def test_crop_is_a_translation_with_zero_fill():
    size, p = 16, dsa.DSAParams()
    x = _img(12, size) + 3  # no zero pixels: any zero in the output is padding
    y = dsa.crop(x, p, _g(1))
    s = int(size * p.ratio_crop_pad + 0.5)
    padded = torch.nn.functional.pad(x, [s + 1] * 4)
    for yi, pi in zip(y, padded):
        # The reference pads one zero pixel and clamps: the output is a window of the zero-padded image.
        hits = [
            (dx, dy)
            for dx in range(-s, s + 1)
            for dy in range(-s, s + 1)
            if torch.equal(yi, pi[:, s + 1 + dx : s + 1 + dx + size, s + 1 + dy : s + 1 + dy + size])
        ]
        assert hits, "crop output is not a shifted copy of its input"
    assert not torch.equal(y, x)


def test_cutout_zeroes_one_square_of_half_the_side():
    size, p = 16, dsa.DSAParams()
    x = torch.ones(64, 3, size, size)
    y = dsa.cutout(x, p, _g(2))
    side = int(size * p.ratio_cutout + 0.5)
    zeros = y[:, 0] == 0
    assert torch.equal(zeros.unsqueeze(1).expand_as(y), y == 0)  # the same pixels in every channel
    for z in zeros:
        rows, cols = z.any(1).nonzero().flatten(), z.any(0).nonzero().flatten()
        assert 0 < len(rows) <= side and 0 < len(cols) <= side
        assert z.sum() == len(rows) * len(cols)  # a (clipped) rectangle, nothing else
    assert (zeros.flatten(1).sum(1) == side * side).any()  # unclipped squares exist


def test_color_ops():
    x, p = _img(), dsa.DSAParams()
    b = dsa.brightness(x, p, _g()) - x
    per_image = b.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image))  # one shift per image
    assert per_image.abs().max() <= p.brightness / 2
    s = dsa.saturation(x, p, _g())
    assert torch.allclose(s.mean(1), x.mean(1), atol=1e-5)  # grey level kept, colour scaled
    c = dsa.contrast(x, p, _g())
    assert torch.allclose(c.mean([1, 2, 3]), x.mean([1, 2, 3]), atol=1e-5)  # image mean kept, spread scaled
    assert not torch.allclose(c, x)


@pytest.mark.parametrize(
    "op,neutral", [("scale", dsa.DSAParams(ratio_scale=1.0)), ("rotate", dsa.DSAParams(ratio_rotate=0.0))]
)
def test_geometric_ops(op, neutral):
    x = _img(8, 33)
    fn = dsa.FUNCTIONS[op]
    assert torch.allclose(fn(x, neutral, _g()), x, atol=1e-5)  # neutral parameter = identity
    y = fn(x, dsa.DSAParams(), _g())
    assert not torch.allclose(y, x, atol=1e-3)
    # Both transforms are about the image centre: its pixel stays put.
    assert torch.allclose(y[:, :, 16, 16], x[:, :, 16, 16], atol=1e-5)


def test_rotate_angle_bounded():
    # A ray from the centre, rotated by at most 15 degrees, stays in a 15-degree wedge (+ the blur of bilinear
    # sampling: 1.5 px at radius >= 20 is under 5 degrees).
    size = 65
    x = torch.zeros(32, 1, size, size)
    x[:, :, 32, 32:] = 1  # a horizontal ray from the centre
    y = dsa.rotate(x, dsa.DSAParams(), _g(3))
    ys, xs = torch.meshgrid(torch.arange(size) - 32.0, torch.arange(size) - 32.0, indexing="ij")
    angle = torch.rad2deg(torch.atan2(ys, xs)).abs()
    far = (ys**2 + xs**2) >= 400
    mass_outside = (y[:, 0] * ((angle > 20) & far)).sum()
    assert mass_outside.item() < 1e-3
    assert (y[:, 0] * ((angle > 5) & far)).sum() > 0  # and it does rotate


def test_dsa_reproducible_and_one_op_per_batch():
    x = _img(8, 16) + 3
    a, b = dsa.DSA(dsa.STANDARD_STRATEGY, "cpu", seed=5), dsa.DSA(dsa.STANDARD_STRATEGY, "cpu", seed=5)
    outs_a, outs_b = [a(x) for _ in range(12)], [b(x) for _ in range(12)]
    assert all(torch.equal(u, v) for u, v in zip(outs_a, outs_b))
    c = dsa.DSA(dsa.STANDARD_STRATEGY, "cpu", seed=6)
    assert not all(torch.equal(u, c(x)) for u in outs_a)

    # flip (prob 1) or cutout, never both: each batch is either all flipped or has zeros and is not flipped.
    d = dsa.DSA("flip_cutout", "cpu", seed=0, params=dsa.DSAParams(prob_flip=1.0))
    kinds = set()
    for _ in range(20):
        y = d(x)
        if torch.equal(y, x.flip(3)):
            kinds.add("flip")
        else:
            assert (y == 0).any() and torch.equal(y[y != 0], x[y != 0])
            kinds.add("cutout")
    assert kinds == {"flip", "cutout"}


def test_dsa_state_roundtrip_and_none():
    x = _img(4, 16)
    aug = dsa.DSA(dsa.STANDARD_STRATEGY, "cpu", seed=1)
    aug(x)
    state = aug.state()
    first = [aug(x) for _ in range(5)]
    aug.load_state(state)
    assert all(torch.equal(u, aug(x)) for u in first)
    assert dsa.DSA("none", "cpu", 0)(x) is x
    with pytest.raises(ValueError, match="unknown DSA"):
        dsa.DSA("color_blur", "cpu", 0)

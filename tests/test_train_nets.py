"""Cross-architecture networks: parameter counts from the reference definitions (DC/DSA/MTT `networks.py`:
AlexNet, AlexNetBN, VGG11, VGG11BN, ResNet18, ResNet18BN at 32 px), and --eval-nets end to end with its table."""

from __future__ import annotations

import pytest
import torch
from gen_helpers import write_generated

from gdd_ray import pipeline, synthetic
from gdd_ray.classes import dataset_classes
from gdd_ray.config import TrainConfig
from gdd_ray.config_loader import build_config
from gdd_ray.report_page import write_run_page
from gdd_ray.run import RunDir
from gdd_ray.train import stage
from gdd_ray.train.convnet import num_parameters
from gdd_ray.train.nets import build


# The reference layers, counted by hand: conv = cin*cout*k*k (+ cout with a bias), a norm (GroupNorm with one
# group per channel, or BatchNorm2d) = 2c affine parameters, linear = in*out + out.
def conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def linear(i, o):
    return i * o + o


def alexnet(k, bn):  # features: 5x5 128, 5x5 192, 3x3 256, 192, 192; fc 192*4*4 -> k
    chans = [(3, 128, 5), (128, 192, 5), (192, 256, 3), (256, 192, 3), (192, 192, 3)]
    return sum(conv(a, b, s) + (2 * b if bn else 0) for a, b, s in chans) + linear(192 * 4 * 4, k)


def vgg11(k):  # [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M], conv-norm-relu; classifier 512 -> k
    cin, total = 3, 0
    for v in (64, 128, 256, 256, 512, 512, 512, 512):
        total += conv(cin, v, 3) + 2 * v
        cin = v
    return total + linear(512, k)


def resnet18(k):  # 3x3 stem without bias + norm; BasicBlock x [2, 2, 2, 2]; shortcut 1x1 + norm on a change
    total, cin = conv(3, 64, 3, False) + 2 * 64, 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for s in (stride, 1):
            total += conv(cin, planes, 3, False) + 2 * planes + conv(planes, planes, 3, False) + 2 * planes
            if s != 1 or cin != planes:
                total += conv(cin, planes, 1, False) + 2 * planes
            cin = planes
    return total + linear(512, k)


@pytest.mark.parametrize("classes", [10, 100])
def test_parameter_counts_match_the_reference_definitions(classes):
    t = TrainConfig()
    expected = {
        "alexnet": alexnet(classes, False), "alexnet-bn": alexnet(classes, True),
        "vgg11": vgg11(classes), "vgg11-bn": vgg11(classes),
        "resnet18": resnet18(classes), "resnet18-bn": resnet18(classes),
        "convnet": {10: 320_010, 100: 504_420}[classes],  # ConvNetD3, as test_train_model states
    }  # fmt: skip
    for name, count in expected.items():
        model = build(name, t, classes, 32)
        assert num_parameters(model) == count, name
        if classes == 10:  # one forward pass per network is enough to show the shapes fit
            assert model(torch.zeros(1, 3, 32, 32)).shape == (1, classes)
        bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert bn == name.endswith("-bn"), name
    # Known totals, as a check on the hand counts: ResNet-18 (CIFAR, 10 classes) has 11,173,962 parameters.
    assert resnet18(10) == 11_173_962


@pytest.mark.slow
def test_eval_nets_trains_all_four_and_the_page_shows_the_table(trains_here, tmp_path):
    classes = dataset_classes("cifar10")
    pats = synthetic.patterns(10, 32, seed=0)
    synthetic.write_cifar(str(tmp_path / "test"), *synthetic.sample(pats, 1, seed=2), [c.class_id for c in classes])
    cfg = build_config(dict(
        dataset="cifar10", ipc=1, out=str(tmp_path / "run"), stages="train", image_size=32, eval_runs=1,
        eval_data=str(tmp_path / "test"), epochs=1, net_width=8, train_batch_size=16, eval_workers=1,
        eval_nets="convnet,resnet18,vgg11,alexnet",
    ))  # fmt: skip
    write_generated(cfg, classes, *synthetic.sample(pats, 1, seed=1))
    res = stage.run(pipeline.check(cfg))
    nets = [c["net_name"] for c in res["cross_architecture"]]
    assert nets == ["ConvNet-3", "ResNet-18", "VGG-11", "AlexNet"]
    assert all(c["hard"]["mean"] is not None for c in res["cross_architecture"])
    assert [c["parameters"] for c in res["cross_architecture"][1:]] == [resnet18(10), vgg11(10), alexnet(10, False)]
    write_run_page(RunDir.open(cfg.out))
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Cross-architecture and baselines" in page and "ResNet-18" in page and "11,173,962" in page

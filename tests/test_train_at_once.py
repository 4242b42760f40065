"""Runs at once on one device (train.at_once): each run equals itself alone within float rounding, resumes from
its own checkpoint in or out of a group; soft labels: the teacher works on the training device and its outputs
are never read back on the host per batch; a teacher state dict is loaded weights-only."""

from __future__ import annotations

import pickle

import pytest
import torch

from gdd_ray import synthetic
from gdd_ray.config import TrainConfig
from gdd_ray.errors import UserError
from gdd_ray.train.at_once import train_runs_at_once
from gdd_ray.train.data import mean_std
from gdd_ray.train.loop import Checkpointer, to_device_images, train_run, train_runs
from gdd_ray.train.teacher import load_teacher

SIZE, CLASSES = 8, 4
# Stated tolerance: a run trained with others computes the same batches and augmentations; only the order of
# float additions in grouped kernels differs, so per-epoch train losses agree to 1e-4 over a few epochs and the
# test predictions are the same.
LOSS_TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    pats = synthetic.patterns(CLASSES, SIZE, seed=0)
    x, y = synthetic.sample(pats, 8, seed=1)
    tx, ty = synthetic.sample(pats, 5, seed=2)
    return x, y, tx, ty


def _kw(data, **config):
    x, y, tx, ty = data
    m, s = mean_std("cifar10")
    cfg = TrainConfig(**{"net_width": 8, "epochs": 4, "train_batch_size": 8, "eval_every": 2, **config})
    return dict(
        train_x=to_device_images(x, m, s, "cpu"), train_y=torch.as_tensor(y), test_x_u8=torch.as_tensor(tx),
        test_y=torch.as_tensor(ty), config=cfg, num_classes=CLASSES, mean=m, std=s,
    )  # fmt: skip


def _same(a, b):
    assert len(a["history"]) == len(b["history"])
    for ra, rb in zip(a["history"], b["history"]):
        assert abs(ra["train_loss"] - rb["train_loss"]) < LOSS_TOL
        assert ra.get("test_acc") == rb.get("test_acc")
    assert a["confusion"] == b["confusion"]


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_three_runs_at_once_equal_each_run_alone(data, norm):
    kw = _kw(data, net_norm=norm)
    alone = [train_run(seed=s, **kw) for s in (1, 2, 3)]
    x, y = kw.pop("train_x"), kw.pop("train_y")
    together = train_runs(train_x=[x] * 3, train_y=[y] * 3, seeds=[1, 2, 3], **kw)
    assert [r["trained_with"] for r in together] == [3, 3, 3]
    for a, b in zip(alone, together):
        _same(a, b)
    assert together[0]["history"][-1]["train_loss"] != together[1]["history"][-1]["train_loss"]  # own seeds


class Memory(Checkpointer):
    def __init__(self):
        self.state = None

    def load(self):
        return self.state

    def save(self, state):
        self.state = pickle.loads(pickle.dumps(state))


def test_a_group_checkpoints_each_run_and_resumes_alone_or_together(data):
    kw = _kw(data, checkpoint_every=2)
    x, y = kw.pop("train_x"), kw.pop("train_y")
    ckpts = [Memory(), Memory()]

    def crash(row):
        if row["epoch"] == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        train_runs(train_x=[x] * 2, train_y=[y] * 2, seeds=[5, 6], checkpointers=ckpts, on_epoch=crash, **kw)
    assert [c.state["epoch"] for c in ckpts] == [2, 2]
    whole = train_run(train_x=x, train_y=y, seed=6, **kw)
    alone = train_run(train_x=x, train_y=y, seed=6, checkpointer=ckpts[1], **kw)  # run 6 out of its group
    assert alone["resumed_from_epoch"] == 2
    _same(whole, alone)
    together = train_runs(train_x=[x], train_y=[y], seeds=[5], checkpointers=[ckpts[0]], **kw)[0]
    _same(train_run(train_x=x, train_y=y, seed=5, **kw), together)


def test_train_runs_at_once_without_ray(data):
    from gdd_ray.plan import eval_run_seed

    x, y, tx, ty = data
    m, s = mean_std("cifar10")
    cfg = TrainConfig(net_width=8, epochs=2, train_batch_size=8, eval_every=2, eval_seed=3)
    res = train_runs_at_once(x, y, tx, ty, cfg, CLASSES, [0, 1, 2], m, s)
    assert [r["seed"] for r in res] == [eval_run_seed(3, r) for r in range(3)]  # the train stage's seeds
    _same(res[2], train_run(seed=eval_run_seed(3, 2), **_kw(data, epochs=2, eval_seed=3)))


class HostReads(torch.Tensor):
    """A teacher output that counts every read back to the host (item, tolist, cpu, numpy) of it or of anything
    computed from it."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy):
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


class Teacher(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, CLASSES)
        self.devices = set()

    def forward(self, x):
        self.devices.add(x.device)
        return self.fc(x.mean((2, 3))).as_subclass(HostReads)


@pytest.mark.parametrize("runs", [1, 2])
def test_soft_labels_keep_teacher_outputs_on_the_device(data, runs):
    kw = _kw(data, labels="soft", teacher="t", soft_epochs=3)
    x, y = kw.pop("train_x"), kw.pop("train_y")
    teacher = Teacher()
    HostReads.reads = 0
    res = train_runs(train_x=[x] * runs, train_y=[y] * runs, seeds=list(range(runs)), labels="soft", teacher=teacher,
                     **kw)  # fmt: skip
    batches = 4  # 32 images, batches of 8
    assert teacher.devices == {x.device}
    # One read per epoch (every run's summed loss at once), not one per batch (3 epochs x 4 batches).
    assert HostReads.reads == 3 < 3 * batches
    assert [h["lr"] for h in res[0]["history"]][0] == pytest.approx(0.001)  # AdamW, cosine from --soft-lr
    assert res[0]["history"][-1]["lr"] < res[0]["history"][1]["lr"] < 0.001


def test_teacher_state_dict_is_loaded_weights_only(tmp_path):
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=CLASSES)
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    torch.save(net.state_dict(), tmp_path / "resnet.pt")
    teacher = load_teacher(str(tmp_path / "resnet.pt"), "cpu")
    assert isinstance(teacher.maxpool, torch.nn.Identity) and not teacher.training
    x = torch.randn(2, 3, SIZE, SIZE)
    net.maxpool = torch.nn.Identity()
    assert torch.equal(teacher(x), net.eval()(x))

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled",))

    torch.save({"fc.weight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="--teacher .*evil.pt: not a weights-only torch file"):
        load_teacher(str(tmp_path / "evil.pt"), "cpu")

"""Benchmark: seconds per training epoch of our evaluation loop vs a plain PyTorch loop, same data and model.

    ours      the whole distilled set normalised once in device memory; batches are slices of a device-side
              permutation; DSA (one op per batch) vectorised on the device from a device generator
    baseline  the DC/DSA/MTT/challenge evaluator's way: DataLoader(TensorDataset) over CPU tensors, shuffle,
              batch 256, each batch copied to the device, DSA as in the reference code (affine matrices built
              in Python lists on the host, per batch)

Both train the same ConvNet (same init) with SGD; epochs are interleaved (ours, baseline, ours, ...) so that
load from other processes hits both alike. The first epoch of each is a warm-up and not counted.

    python jobs/bench_train.py --smoke-test                      # seconds, CPU: checks it runs
    python jobs/bench_train.py                                   # CPU default: CIFAR-100 shape, IPC 3
    python jobs/bench_train.py --device cuda --ipc 50 --epochs 10  # a GPU: CIFAR-100 IPC 50

Runs at once (--runs-at-once N): N evaluation runs of one ConvNet trained together on one device
(train.at_once.train_runs_at_once: grouped convolutions, each run with its own seed, shuffling and DSA draws)
vs the same N runs one after another (train.loop.train_run), whole protocol runs (DSA, lr drop, test at the
end), timed alternately; the JSON says how far each run's numbers are from its run alone.

    python jobs/bench_train.py --runs-at-once 3 --smoke-test
    python jobs/bench_train.py --runs-at-once 3 --append [--classes C --ipc I --image-size S --width W --epochs E]
                                                                 # CPU: one row of bench_results/train_at_once.json
    python jobs/bench_train.py --runs-at-once 3 --device cuda --classes 100 --ipc 10 --width 128 --epochs 1001
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gdd_ray import synthetic  # noqa: E402
from gdd_ray.train.convnet import ConvNet, num_parameters  # noqa: E402
from gdd_ray.train.data import mean_std  # noqa: E402
from gdd_ray.train.dsa import DSA, FUNCTIONS, OPS, DSAParams  # noqa: E402
from gdd_ray.train.loop import to_device_images  # noqa: E402

# ---- the reference DSA, per batch, as the DC/DSA/MTT code writes it ------------------------------


def _ref_scale(x, p):
    r = p.ratio_scale
    sx = torch.rand(x.shape[0]) * (r - 1.0 / r) + 1.0 / r
    sy = torch.rand(x.shape[0]) * (r - 1.0 / r) + 1.0 / r
    theta = torch.tensor([[[sx[i], 0, 0], [0, sy[i], 0]] for i in range(x.shape[0])], dtype=torch.float)
    grid = F.affine_grid(theta, x.shape, align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def _ref_rotate(x, p):
    t = (torch.rand(x.shape[0]) - 0.5) * 2 * p.ratio_rotate / 180 * float(np.pi)
    theta = torch.tensor(
        [[[torch.cos(t[i]), torch.sin(-t[i]), 0], [torch.sin(t[i]), torch.cos(t[i]), 0]] for i in range(x.shape[0])],
        dtype=torch.float,
    )
    grid = F.affine_grid(theta, x.shape, align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def _ref_flip(x, p):
    return torch.where(torch.rand(x.size(0), 1, 1, 1, device=x.device) < p.prob_flip, x.flip(3), x)


def _ref_color(x, p):
    x = x + (torch.rand(x.size(0), 1, 1, 1, device=x.device) - 0.5) * p.brightness
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (torch.rand(x.size(0), 1, 1, 1, device=x.device) * p.saturation) + m
    m = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - m) * (torch.rand(x.size(0), 1, 1, 1, device=x.device) + p.contrast) + m


def _ref_crop(x, p):
    sx, sy = int(x.size(2) * p.ratio_crop_pad + 0.5), int(x.size(3) * p.ratio_crop_pad + 0.5)
    tx = torch.randint(-sx, sx + 1, size=[x.size(0), 1, 1], device=x.device)
    ty = torch.randint(-sy, sy + 1, size=[x.size(0), 1, 1], device=x.device)
    gb, gx, gy = torch.meshgrid(
        torch.arange(x.size(0), dtype=torch.long, device=x.device),
        torch.arange(x.size(2), dtype=torch.long, device=x.device),
        torch.arange(x.size(3), dtype=torch.long, device=x.device),
        indexing="ij",
    )
    gx = torch.clamp(gx + tx + 1, 0, x.size(2) + 1)
    gy = torch.clamp(gy + ty + 1, 0, x.size(3) + 1)
    xp = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return xp.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def _ref_cutout(x, p):
    cs = int(x.size(2) * p.ratio_cutout + 0.5), int(x.size(3) * p.ratio_cutout + 0.5)
    ox = torch.randint(0, x.size(2) + (1 - cs[0] % 2), size=[x.size(0), 1, 1], device=x.device)
    oy = torch.randint(0, x.size(3) + (1 - cs[1] % 2), size=[x.size(0), 1, 1], device=x.device)
    gb, gx, gy = torch.meshgrid(
        torch.arange(x.size(0), dtype=torch.long, device=x.device),
        torch.arange(cs[0], dtype=torch.long, device=x.device),
        torch.arange(cs[1], dtype=torch.long, device=x.device),
        indexing="ij",
    )
    gx = torch.clamp(gx + ox - cs[0] // 2, min=0, max=x.size(2) - 1)
    gy = torch.clamp(gy + oy - cs[1] // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


REF_OPS = {"color": _ref_color, "crop": _ref_crop, "cutout": _ref_cutout, "flip": _ref_flip, "scale": _ref_scale}
REF_OPS["rotate"] = _ref_rotate


# ---- the two epochs -------------------------------------------------------------------------------


# Both loops apply the same op to their k-th batch (the op decides most of the augmentation's cost): the
# difference measured is the loop's, not the luck of the draw. model=None times the data path alone.


def epoch_ours(model, opt, x, y, dsa, shuffle, batch, ops):
    loss_sum = torch.zeros((), device=x.device)
    perm = torch.randperm(len(y), device=x.device, generator=shuffle)
    for k, i in enumerate(range(0, len(y), batch)):
        idx = perm[i : i + batch]
        xb = FUNCTIONS[ops[k]](x[idx], dsa.params, dsa.generator)
        if model is None:
            loss_sum += xb.sum() * 0
            continue
        out = model(xb)
        loss = F.cross_entropy(out, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * len(idx)
    return loss_sum.item() / len(y)


def epoch_baseline(model, opt, loader, device, params, ops):
    loss_sum, n = 0.0, 0
    for k, (xb, yb) in enumerate(loader):
        xb, yb = xb.to(device), yb.to(device)
        xb = REF_OPS[ops[k]](xb, params).contiguous()
        if model is None:
            loss_sum += xb.sum().item() * 0
            n += len(yb)
            continue
        out = model(xb)
        loss = F.cross_entropy(out, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(yb)  # the reference reads the loss back every batch
        n += len(yb)
    return loss_sum / n


def machine_facts(device) -> dict:
    """What the figures were measured on, written into each result."""
    return {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        # Other processes on the machine: on a shared CPU the per-epoch spread says more than the median.
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
    }


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=100, help="Classes (100 = CIFAR-100's shape).")
    p.add_argument(
        "--ipc", type=int, default=3, help="Images per class; 3 = two batches, a few seconds an epoch on a CPU."
    )
    p.add_argument("--image-size", type=int, default=32, help="Image side (32 = CIFAR, 64 = Tiny-ImageNet).")
    p.add_argument("--width", type=int, default=128, help="ConvNet width (128 = the protocol's ConvNetD3).")
    p.add_argument("--batch-size", type=int, default=256, help="Batch size (256 = the protocol's).")
    p.add_argument("--epochs", type=int, default=6, help="Timed epochs of each loop (after one warm-up epoch each).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (1: stable timings on a shared box).")
    p.add_argument("--out", default="bench_results/train.json", help="Where the JSON results go.")
    p.add_argument("--smoke-test", action="store_true", help="Tiny sizes, 1 epoch: checks the script runs.")
    p.add_argument(
        "--runs-at-once", type=int, default=0, help="Bench N runs trained together vs one after another instead."
    )
    p.add_argument("--repeats", type=int, default=2, help="Runs at once: timings per mode (the fastest is kept).")
    p.add_argument("--figure", default="docs/train_at_once.png", help="Runs at once: the bar chart (empty: none).")
    p.add_argument("--append", action="store_true", help="Runs at once: add a row to --out's rows (one per size).")
    return p.parse_args(argv)


def bench_at_once(a) -> dict:
    """N runs at once vs one after another: wall seconds of each (best of --repeats) and the numbers' agreement."""
    from gdd_ray.config import TrainConfig
    from gdd_ray.plan import eval_run_seed
    from gdd_ray.train.at_once import train_runs_at_once
    from gdd_ray.train.loop import train_run

    n = a.runs_at_once
    device = torch.device(a.device)
    mean, std = mean_std("cifar100")
    pats = synthetic.patterns(a.classes, a.image_size)
    images, labels = synthetic.sample(pats, a.ipc, seed=0)
    test_images, test_labels = synthetic.sample(pats, 5, seed=1)
    cfg = TrainConfig(
        epochs=a.epochs, net_width=a.width, train_batch_size=a.batch_size, eval_every=a.epochs, protocol="challenge"
    )
    x = to_device_images(images, mean, std, device)
    y = torch.as_tensor(labels, device=device)
    tx, ty = torch.as_tensor(test_images, device=device), torch.as_tensor(test_labels, device=device)

    def one_after_another():
        return [
            train_run(train_x=x, train_y=y, test_x_u8=tx, test_y=ty, config=cfg, num_classes=a.classes,
                      seed=eval_run_seed(cfg.eval_seed, r), mean=mean, std=std)
            for r in range(n)
        ]  # fmt: skip

    def at_once():
        return train_runs_at_once(images, labels, test_images, test_labels, cfg, a.classes, list(range(n)), mean,
                                  std, device)  # fmt: skip

    times: dict[str, list[float]] = {"one_after_another": [], "at_once": []}
    results = {}
    for _ in range(a.repeats):
        for name, fn in (("one_after_another", one_after_another), ("at_once", at_once)):
            _sync(device)
            t0 = time.perf_counter()
            results[name] = fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    seq, together = min(times["one_after_another"]), min(times["at_once"])
    loss_diff = max(
        abs(h1["train_loss"] - h2["train_loss"])
        for r1, r2 in zip(results["one_after_another"], results["at_once"])
        for h1, h2 in zip(r1["history"], r2["history"])
    )
    same_acc = [r1["test_acc"] == r2["test_acc"] for r1, r2 in zip(results["one_after_another"], results["at_once"])]
    return {
        "benchmark": f"{n} evaluation runs at once (grouped ConvNet) vs one after another, same seeds",
        **machine_facts(device),
        "runs": n,
        "images": int(len(labels)),
        "classes": a.classes,
        "ipc": a.ipc,
        "image_size": a.image_size,
        "model": {"depth": 3, "width": a.width},
        "batch_size": a.batch_size,
        "epochs_per_run": cfg.epochs_run,
        "protocol": "challenge (epochs + 1, lr drop, DSA, test after the last epoch)",
        "seconds": {"one_after_another": round(seq, 3), "at_once": round(together, 3)},
        "all_seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "speedup": round(seq / together, 3),
        "same_numbers": {
            "max_train_loss_difference": loss_diff,
            "same_test_accuracy": same_acc,
            "test_acc": {k: [r["test_acc"] for r in v] for k, v in results.items()},
        },
        "smoke_test": a.smoke_test,
    }


def plot_at_once(rows: list[dict], path: str) -> None:
    """One bar per row: how many times faster the runs trained at once were (1 = no gain), with both times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.5 + 0.55 * len(rows)))
    labels = [
        f"{r['classes']} cl. x IPC {r['ipc']}, {r['image_size']} px, width {r['model']['width']}, "
        f"{r['epochs_per_run']} ep."
        for r in rows
    ]
    ys = list(range(len(rows)))
    colors = ["C2" if r["speedup"] >= 1 else "C3" for r in rows]
    ax.barh(ys, [r["speedup"] for r in rows], 0.6, color=colors)
    for y, r in zip(ys, rows):
        s = r["seconds"]
        ax.text(r["speedup"], y, f"  {r['speedup']:.2f}x ({s['one_after_another']:.1f} s -> {s['at_once']:.1f} s)",
                va="center", fontsize=8)  # fmt: skip
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlim(0, max(r["speedup"] for r in rows) * 1.6)
    ax.set_xlabel(f"speed-up of {rows[0]['runs']} runs at once over one after another ({rows[0]['device']})")
    ax.set_title("Evaluation runs at once on one device (same seeds and numbers)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.smoke_test:
        a.classes, a.ipc, a.image_size, a.width, a.epochs = 10, 4, 16, 16, 1
    torch.set_num_threads(a.threads)
    if a.runs_at_once:
        if a.out == "bench_results/train.json":
            a.out = "bench_results/train_at_once.json"
        result = bench_at_once(a)
        rows = []
        if a.append and os.path.exists(a.out):
            with open(a.out) as fh:
                rows = json.load(fh).get("rows", [])
        rows.append(result)
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as fh:
            json.dump({"rows": rows}, fh, indent=2)
        if a.figure:
            plot_at_once(rows, a.figure)
        print(
            f"{a.runs_at_once} runs x {result['epochs_per_run']} epochs on {result['device']}: one after another "
            f"{result['seconds']['one_after_another']:.2f} s, at once {result['seconds']['at_once']:.2f} s "
            f"({result['speedup']:.2f}x); max train-loss difference {result['same_numbers']['max_train_loss_difference']:.2e} -> {a.out}"
        )
        return result
    device = torch.device(a.device)
    mean, std = mean_std("cifar100")
    images, labels = synthetic.sample(synthetic.patterns(a.classes, a.image_size), a.ipc, seed=0)
    torch.manual_seed(0)
    init = ConvNet(a.classes, a.image_size, width=a.width).state_dict()
    models, opts = {}, {}
    for name in ("ours", "baseline"):
        models[name] = ConvNet(a.classes, a.image_size, width=a.width).to(device)
        models[name].load_state_dict(init)
        opts[name] = torch.optim.SGD(models[name].parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    # What "same model" means below: both loops start from these exact weights.
    init_checksum = {k: float(sum(p.detach().double().sum() for p in m.parameters())) for k, m in models.items()}
    x_dev = to_device_images(images, mean, std, device)
    y_dev = torch.as_tensor(labels, device=device)
    dsa = DSA("color_crop_cutout_flip_scale_rotate", device, seed=0)  # its generator and params
    shuffle = torch.Generator(device=device).manual_seed(0)
    x_cpu = to_device_images(images, mean, std, "cpu")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_cpu, torch.as_tensor(labels)),
        batch_size=a.batch_size,
        shuffle=True,
        num_workers=0,
    )

    batches = math.ceil(len(labels) / a.batch_size)
    op_draw = torch.Generator().manual_seed(1)

    def timed(with_model: bool, epochs: int) -> tuple[dict[str, list[float]], dict[str, float]]:
        times: dict[str, list[float]] = {"ours": [], "baseline": []}
        losses: dict[str, float] = {}
        for e in range(epochs + 1):
            ops = [OPS[int(i)] for i in torch.randint(len(OPS), (batches,), generator=op_draw)]
            for name in ("ours", "baseline"):
                model = models[name] if with_model else None
                _sync(device)
                t0 = time.perf_counter()
                if name == "ours":
                    losses[name] = epoch_ours(model, opts[name], x_dev, y_dev, dsa, shuffle, a.batch_size, ops)
                else:
                    losses[name] = epoch_baseline(model, opts[name], loader, device, DSAParams(), ops)
                _sync(device)
                if e > 0:  # epoch 0 is the warm-up (allocator, kernels, caches)
                    times[name].append(time.perf_counter() - t0)
        return times, losses

    times, losses = timed(True, a.epochs)
    data_times, _ = timed(False, max(a.epochs, 10))
    ours, base = statistics.median(times["ours"]), statistics.median(times["baseline"])
    d_ours, d_base = statistics.median(data_times["ours"]), statistics.median(data_times["baseline"])
    result = {
        "benchmark": "train epoch: in-device-memory loop vs DataLoader loop",
        **machine_facts(device),
        "images": int(len(labels)),
        "classes": a.classes,
        "ipc": a.ipc,
        "image_size": a.image_size,
        "model": {"depth": 3, "width": a.width, "parameters": num_parameters(models["ours"])},
        "batch_size": a.batch_size,
        "timed_epochs": a.epochs,
        "seconds_per_epoch": {"ours": round(ours, 4), "baseline": round(base, 4)},
        "all_epoch_seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "ratio_ours_over_baseline": round(ours / base, 3),
        "data_path_only": {
            "what": "the same epochs without the model: batching + copies + DSA, i.e. what the loops differ in",
            "seconds_per_epoch": {"ours": round(d_ours, 5), "baseline": round(d_base, 5)},
            "ratio_ours_over_baseline": round(d_ours / d_base, 3),
        },
        "init_checksum": init_checksum,
        "final_loss": {k: round(v, 4) for k, v in losses.items()},
        "smoke_test": a.smoke_test,
    }
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(
        f"{len(labels)} images {a.image_size}px on {result['device']}: ours {ours:.3f} s/epoch, "
        f"baseline {base:.3f} s/epoch, ratio {ours / base:.3f}; data path alone: ours {d_ours:.4f}, "
        f"baseline {d_base:.4f} s/epoch, ratio {d_ours / d_base:.3f} -> {a.out}"
    )
    return result


if __name__ == "__main__":
    main()

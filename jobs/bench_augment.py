"""Benchmark: the Ray Data PDA stage vs the paper's way (one process, one image at a time), same images.

    python jobs/bench_augment.py                                  # CIFAR-100 size, 20 per class, K=4
    python jobs/bench_augment.py --dataset tiny-imagenet --ipc 10 # 64 px images
    python jobs/bench_augment.py --smoke-test                     # seconds, CPU, checks the plumbing

Run it on an otherwise idle machine: the contenders share the CPUs with whatever else runs.

The inputs are stand-in generated shards (patterned images, gdd_ray.synthetic) written in the
generate stage's format; every contender reads the same shards, decodes, augments with the same recipe
and seeds, encodes PNG and writes one Parquet shard per input. Three contenders:
    per_image_loop   one process on one core, the ops called per image and per variant (the paper's way)
    serial_batched   one process on one core, the stage's own per-shard worker (batched ops), no Ray
    ray_data         the augment stage itself on the local Ray, from an empty OUT/augmented (Ray's workers
                     warmed up first: the time is the steady state, not Ray's start)
All three must produce byte-identical shards; images/s counts the images written (originals included).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from jobs.bench_common import interleaved_rounds, start_ray, write_results  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar100", help="Whose class count and image size to mimic.")
    p.add_argument("--ipc", type=int, default=20, help="Generated images per class (the paper: 20 for CIFAR-100).")
    p.add_argument("--variants", type=int, default=4, help="PDA variants per image (the paper: 4, i.e. x5).")
    p.add_argument("--unit-size", type=int, default=10, help="Images per generated shard (distill.py's default).")
    p.add_argument("--out", default="/tmp/gdd-bench-augment", help="Scratch folder (deleted first).")
    p.add_argument("--results", default="bench_results/augment.json", help="Where to write the results JSON.")
    p.add_argument("--cpus", type=int, default=None, help="CPUs for the local Ray (default: all).")
    p.add_argument("--repeats", type=int, default=3, help="Rounds per contender; the best is reported.")
    p.add_argument("--smoke-test", action="store_true", help="10 classes x 2 images: checks the plumbing only.")
    return p.parse_args(argv)


def per_image_loop(src, dst, names, variants, recipe, fp) -> None:
    """The paper's way: decode, augment and encode one image and one variant at a time, in one process."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from gdd_ray import shards
    from gdd_ray.augment import ops
    from gdd_ray.augment.shard import MAX_REDRAWS, redraw_seed, variant_path
    from gdd_ray.plan import variant_seed
    from gdd_ray.storage import footer_metadata

    for name in names:
        pf = pq.ParquetFile(pa.BufferReader(src.read_bytes(name)))
        kv = footer_metadata(pf.metadata)
        rows = pf.read().replace_schema_metadata(None).to_pylist()
        out = []
        for row in rows:
            pixels = torch.from_numpy(shards.decode_png(row["image"]["bytes"])).permute(2, 0, 1)[None]
            seeds = [variant_seed(row["seed"], v) for v in range(variants + 1)]
            drawn = [pixels[0].permute(1, 2, 0).numpy()]  # variant 0: the generated image itself
            for v in range(1, variants + 1):
                # the stage's rule, one image at a time: a variant that repeats the original or an earlier
                # variant is drawn again from redraw_seed(seed, attempt)
                img = ops.augment(pixels, [seeds[v]], recipe)[0].permute(1, 2, 0).contiguous().numpy()
                for attempt in range(1, MAX_REDRAWS + 1):
                    if not any(np.array_equal(img, d) for d in drawn):
                        break
                    seeds[v] = redraw_seed(variant_seed(row["seed"], v), attempt)
                    img = ops.augment(pixels, [seeds[v]], recipe)[0].permute(1, 2, 0).contiguous().numpy()
                drawn.append(img)
            for v in range(variants + 1):
                data = row["image"]["bytes"] if v == 0 else shards.encode_png(drawn[v])
                out.append(
                    {
                        **row,
                        "image": {"bytes": data, "path": variant_path(row["image"]["path"], v)},
                        "variant": v,
                        "variant_seed": seeds[v],
                    }
                )
        footer = {
            shards.FINGERPRINT: fp,
            shards.SOURCE: name,
            shards.SOURCE_ROWS: str(len(rows)),
            shards.SOURCE_FINGERPRINT: kv.get(shards.FINGERPRINT, ""),
            shards.VARIANTS: str(variants),
            shards.IMAGE_SIZE: kv.get(shards.IMAGE_SIZE, ""),
            shards.UNIT: kv.get(shards.UNIT, ""),
        }
        shards.write_shard(dst, name, pa.Table.from_pylist(out, schema=shards.AUGMENTED_SCHEMA), footer)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke_test:
        args.dataset, args.ipc, args.unit_size, args.repeats = "cifar10", 2, 1, 1

    import ray
    import torch

    from gdd_ray import pipeline, storage, synthetic
    from gdd_ray.augment import stage
    from gdd_ray.augment.recipe import resolve_ops
    from gdd_ray.augment.shard import augment_shard
    from gdd_ray.classes import load_classes
    from gdd_ray.config_loader import build_config

    shutil.rmtree(args.out, ignore_errors=True)
    cfg = build_config(
        {
            "out": os.path.join(args.out, "run"),
            "dataset": args.dataset,
            "ipc": args.ipc,
            "unit_size": args.unit_size,
            "pda_variants": args.variants,
            "stages": "augment",
        }
    )
    classes = load_classes(cfg.dataset, None)
    names = synthetic.write_generated(cfg, classes, fingerprint=pipeline.generation_fingerprint(cfg, classes))
    ctx = pipeline.check(cfg)
    run_dir, fps = ctx.run_dir, ctx.fingerprints
    recipe = resolve_ops(cfg.augment.pda_ops)
    images_in = len(classes) * cfg.ipc
    images_out = images_in * (args.variants + 1)
    print(f"[bench] {images_in} images of {cfg.image_size} px in {len(names)} shards -> {images_out}", flush=True)

    # The single-process contenders get one core, like each Ray worker (Ray sets OMP_NUM_THREADS=1 per
    # 1-CPU task); torch's intra-op threads on tiny images only spin on a shared machine.
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    started_ray = start_ray(args.cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # Warm-up on a copy: starts the Ray workers and imports torch in them, which a long run pays once. A smoke
    # test times nothing worth keeping: it skips it.
    if not args.smoke_test:
        warm_cfg = cfg.replace(out=os.path.join(args.out, "warmup"))
        fingerprint = pipeline.generation_fingerprint(warm_cfg, classes)
        synthetic.write_generated(warm_cfg, classes, fingerprint=fingerprint)
        stage.run(pipeline.check(warm_cfg))

    loop_dst = storage.Location(os.path.join(args.out, "per_image_loop"))
    serial_dst = storage.Location(os.path.join(args.out, "serial_batched"))

    def run_loop() -> None:
        per_image_loop(run_dir.generated, loop_dst, names, args.variants, recipe, fps["augment"])

    def run_serial() -> None:
        for n in names:
            augment_shard(run_dir.generated, serial_dst, n, args.variants, recipe, fps["augment"])

    ray_map_s: list[float] = []

    def run_ray() -> None:
        run_dir.augmented.delete_tree()  # a cold stage every time, not a skip
        ray_map_s.append(stage.run(ctx)["totals"]["work_s"])

    contenders = {"per_image_loop": run_loop, "serial_batched": run_serial, "ray_data": run_ray}
    results = interleaved_rounds(contenders, args.repeats, images_out)
    # the Ray Data part alone (the rest of the stage: footers of inputs and outputs, sample grid, run.json)
    results["ray_data"]["map_only_s"] = [round(t, 3) for t in ray_map_s]
    summary = run_dir.read_summary("augment")
    if started_ray:
        ray.shutdown()

    same = all(run_dir.augmented.read_bytes(n) == serial_dst.read_bytes(n) == loop_dst.read_bytes(n) for n in names)
    out = {
        "benchmark": "PDA stage (Ray Data, batched ops) vs per-image single-process loop",
        "dataset": cfg.dataset,
        "classes": len(classes),
        "ipc": cfg.ipc,
        "image_size": cfg.image_size,
        "variants": args.variants,
        "shards": len(names),
        "images_in": images_in,
        "images_out": images_out,
        "ray_cpus": cpus,
        "torch_threads_single_process": torch.get_num_threads(),
        "load_average_before": [round(v, 2) for v in load_before],
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"ray": ray.__version__, "torch": torch.__version__},
        **results,
        "ratio_ray_data_vs_per_image_loop": round(
            results["per_image_loop"]["seconds"] / results["ray_data"]["seconds"], 2
        ),
        "ratio_serial_batched_vs_per_image_loop": round(
            results["per_image_loop"]["seconds"] / results["serial_batched"]["seconds"], 2
        ),
        "identical_outputs": same,
        # the driver's peak over all three contenders: one shard at a time, never the dataset
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "stage_summary_images_out": summary["totals"]["images"],
        "repeats": args.repeats,
        "smoke_test": args.smoke_test,
    }
    if not same:
        print("[bench] ERROR: the contenders wrote different bytes", flush=True)
    write_results(out, args.results, keep=not args.smoke_test or args.results != parse_args([]).results)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

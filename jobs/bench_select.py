"""Benchmark: the select stage's images/s vs a per-image CLIP loop, same images, same CLIP, same machine.

    python jobs/bench_select.py                          # CIFAR-100 size: 100 classes x 20 candidates, tiny CLIP
    python jobs/bench_select.py --clip-model openai/clip-vit-base-patch32 --device cuda   # on a GPU node
    python jobs/bench_select.py --clip-model b32-random --dataset cifar10   # CLIP ViT-B/32's size, random weights
    python jobs/bench_select.py --smoke-test             # seconds, CPU, checks the plumbing

Run it on an otherwise idle machine: the contenders share the CPUs with whatever else runs.

The inputs are stand-in generated shards (patterned images, gdd_ray.synthetic) in the generate stage's
format: IPC x --overgenerate candidates per class. Three contenders score every candidate against its class
prompt and against every class's prompt (the zero-shot top-1):
    per_image_loop   one process, one image at a time the way CLIP's model card shows it: PIL decode,
                     transformers' CLIPProcessor, CLIPModel.get_image_features (class prompts embedded once)
    serial_scorer    one process, the stage's own ShardScorer (fixed-shape batches, preprocessing on the
                     device), committing its score files, no Ray
    select_stage     the select stage itself on the local Ray from an empty OUT/selected: score (actor pool)
                     + choose the IPC best per class + write the kept shards, the stats and the manifest
                     (Ray's workers warmed up first: the time is the steady state, not Ray's start)
images/s counts candidates scored. The per-image loop's scores are compared with the stage's (same model,
same pixels; only the preprocessing path and the batch shape differ).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar100", help="Whose classes and image size to mimic.")
    p.add_argument("--ipc", type=int, default=10, help="Images kept per class.")
    p.add_argument("--overgenerate", type=float, default=2.0, help="Candidates per class = ceil(F x IPC).")
    p.add_argument("--unit-size", type=int, default=10, help="Images per generated shard (distill.py's default).")
    p.add_argument(
        "--clip-model",
        default="tiny",
        help="CLIP for every contender: 'tiny' (random weights, offline), 'b32-random' (openai/clip-vit-base-patch32's "
        "architecture and preprocessing, 224 px, random weights, built offline), or a hub id / folder.",
    )
    p.add_argument("--clip-batch-size", type=int, default=64, help="The stage's fixed CLIP batch.")
    p.add_argument("--device", default="cpu", help="Device of the single-process contenders (cpu or cuda).")
    p.add_argument("--out", default="/tmp/gdd-bench-select", help="Scratch folder (deleted first).")
    p.add_argument("--results", default="bench_results/select.json", help="Where to write the results JSON.")
    p.add_argument("--cpus", type=int, default=None, help="CPUs for the local Ray (default: all).")
    p.add_argument("--repeats", type=int, default=3, help="Rounds per contender; the best is reported.")
    p.add_argument(
        "--ray-worker-niceness", type=int, default=0,
        help="Niceness of the stage's Ray workers (Ray's default 15 starves them on a shared machine; 0 = the "
        "contenders' own priority).",
    )  # fmt: skip
    p.add_argument("--smoke-test", action="store_true", help="10 classes x 4 candidates: checks the plumbing only.")
    return p.parse_args(argv)


def per_image_loop(source: str, texts: list[str], loc, names: list[str], device: str) -> dict[tuple[int, int], tuple]:
    """(label, index) -> (score, top1): one image at a time through transformers' own processor and model."""
    import io

    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    from gdd_ray import shards

    model = CLIPModel.from_pretrained(source).float().eval().to(device)
    processor = CLIPProcessor.from_pretrained(source)
    with torch.inference_mode():
        tok = processor(text=texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        text = torch.nn.functional.normalize(features(model.get_text_features(**tok.to(device))), dim=-1)
        out = {}
        for name in names:
            t = shards.read_shard(loc, name, ["image", "label", "index"])
            for img, label, index in zip(shards.png_bytes(t), t["label"].to_pylist(), t["index"].to_pylist()):
                pixels = processor(images=Image.open(io.BytesIO(img)).convert("RGB"), return_tensors="pt")
                emb = model.get_image_features(pixel_values=pixels["pixel_values"].to(device))
                sims = text @ torch.nn.functional.normalize(features(emb), dim=-1)[0]
                out[(label, index)] = (float(sims[label]), bool(int(sims.argmax()) == label))
    return out


B32_RANDOM = "b32-random"


def b32_random_clip(cache: str) -> str:
    """A folder holding CLIP ViT-B/32's architecture (transformers' CLIPConfig defaults: 224 px, patch 32, widths
    512/768, 12 layers each) with random weights, the real CLIP tokenizer and the OpenAI preprocessing: the
    compute of the default --clip-model without a download (scores are noise)."""
    from importlib import resources
    from pathlib import Path

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(cache) / "bench-clip-b32-random"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        tokenizer = CLIPTokenizer.from_pretrained(
            str(resources.files("gdd_ray").joinpath("data", "sdxl_tokenizer", "tokenizer"))
        )
        CLIPModel(CLIPConfig()).save_pretrained(folder, safe_serialization=True)
        CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def features(out):
    """get_*_features' result: a tensor (transformers 4) or an output whose pooler_output is projected (5)."""
    return (out if hasattr(out, "float") else out.pooler_output).float()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke_test:
        args.dataset, args.ipc, args.overgenerate, args.unit_size, args.repeats = "cifar10", 2, 2.0, 2, 1

    import numpy as np
    import ray
    import torch

    from gdd_ray import pipeline, storage, synthetic
    from gdd_ray.classes import load_classes
    from gdd_ray.config_loader import build_config
    from gdd_ray.select import clip, stage
    from gdd_ray.select.scorer import ScoreJob, ShardScorer, read_scores, score_calls
    from jobs.bench_common import interleaved_rounds, start_ray, write_results

    shutil.rmtree(args.out, ignore_errors=True)
    clip_label = args.clip_model
    if args.clip_model == B32_RANDOM:
        args.clip_model = b32_random_clip(os.environ.get("GDD_RAY_CACHE", os.path.expanduser("~/.cache/gdd_ray")))
    values = {
        "out": os.path.join(args.out, "run"), "dataset": args.dataset, "ipc": args.ipc, "unit_size": args.unit_size,
        "select_by": "clip", "clip_model": args.clip_model, "overgenerate": args.overgenerate,
        "clip_batch_size": args.clip_batch_size, "stages": "select",
    }  # fmt: skip
    if args.smoke_test:
        values["select_workers"] = 1  # plumbing only: a CLIP actor per CPU would only add start-ups
    cfg = build_config(values)
    classes = load_classes(cfg.dataset, None)
    names = synthetic.write_generated(cfg, classes, fingerprint=pipeline.generation_fingerprint(cfg, classes))
    ctx = pipeline.check(cfg)
    run_dir = ctx.run_dir
    texts = [c.prompt(cfg.generate.prompt_template) for c in classes]
    source = clip.resolve_clip_model(args.clip_model)
    candidates = sum(u.size for u in ctx.plan.units)
    print(f"[bench] {candidates} candidates of {cfg.image_size} px in {len(names)} shards, CLIP {args.clip_model}")

    # The single-process contenders get one core, like each of the stage's CPU actors (Ray sets
    # OMP_NUM_THREADS=1 per 1-CPU actor); a GPU run uses the device instead.
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    # Ray starts its workers at niceness 15 (RAY_worker_niceness): on a machine shared with other jobs the
    # stage's actors would then get a sliver of the CPU the in-process contenders get. The same priority for all.
    os.environ["RAY_worker_niceness"] = str(args.ray_worker_niceness)
    started_ray = start_ray(args.cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # Warm-up on a small copy (one candidate of each of 10 classes): starts Ray and its first workers, brings
    # torch/transformers and the CLIP weights into the page cache; paid once per run, not by any contender.
    # A smoke test times nothing worth keeping: it skips it (a stage run of its own, with its CLIP actors).
    if not args.smoke_test:
        warm = build_config({**values, "out": os.path.join(args.out, "warmup"), "dataset": "cifar10", "ipc": 1,
                             "overgenerate": 1.0, "unit_size": 1})  # fmt: skip
        warm_classes = load_classes(warm.dataset, None)
        fingerprint = pipeline.generation_fingerprint(warm, warm_classes)
        synthetic.write_generated(warm, warm_classes, fingerprint=fingerprint)
        stage.run(pipeline.check(warm))

    serial_dst = storage.Location(os.path.join(args.out, "serial_scores"))
    b = cfg.select.clip_batch_size
    job = ScoreJob(source, tuple(texts), run_dir.generated.uri, serial_dst.uri, "bench", b, ctx.plan.units)
    calls = score_calls(ctx.plan.units, b, names)  # as the stage groups shards into calls
    loop_scores: dict = {}
    stage_work_s: list[float] = []

    def run_loop() -> None:
        loop_scores.update(per_image_loop(source, texts, run_dir.generated, names, args.device))

    def run_serial() -> None:
        serial_dst.delete_tree()
        scorer = ShardScorer(job, device=args.device)
        for call in calls:
            scorer.score(call)

    def run_stage() -> None:
        run_dir.selected.delete_tree()  # a cold stage every time, not a skip
        stage_work_s.append(stage.run(ctx)["totals"]["work_s"])

    # Model loading is inside every contender's time (the loop's from_pretrained, the scorer's load, the
    # stage's actors): each pays it once per run.
    contenders = {"per_image_loop": run_loop, "serial_scorer": run_serial, "select_stage": run_stage}
    results = interleaved_rounds(contenders, args.repeats, candidates)
    # the scoring part of the stage alone (its summary's work_s: the actor pool, without choose and finish)
    results["select_stage"]["score_only_s"] = [round(t, 3) for t in stage_work_s]
    results["select_stage"]["score_only_images_per_s"] = round(candidates / min(stage_work_s), 1)
    summary = run_dir.read_summary("select")
    if started_ray:
        ray.shutdown()

    # Agreement: the stage's score files vs the per-image loop (and the serial scorer vs the stage: same code).
    staged, serial = {}, {}
    for folder, into in ((run_dir.selected.child(stage.SCORES_DIR), staged), (serial_dst, serial)):
        for name in names:
            t = read_scores(folder, name)
            for row in zip(t["label"].to_pylist(), t["index"].to_pylist(), t["clip_score"].to_pylist(),
                           t["clip_top1"].to_pylist()):  # fmt: skip
                into[row[:2]] = (row[2], row[3])
    keys = sorted(loop_scores)
    diff = np.array([abs(loop_scores[k][0] - staged[k][0]) for k in keys])
    out = {
        "benchmark": "select stage (Ray Data CLIP actors, fixed-shape batches) vs per-image CLIP loop",
        "dataset": cfg.dataset,
        "classes": len(classes),
        "ipc": cfg.ipc,
        "overgenerate": args.overgenerate,
        "candidates": candidates,
        "image_size": cfg.image_size,
        "clip_model": clip_label,
        "clip_batch_size": cfg.select.clip_batch_size,
        "shards": len(names),
        "device_single_process": args.device,
        "ray_cpus": cpus,
        "ray_worker_niceness": args.ray_worker_niceness,
        "stage_workers": summary.get("workers"),
        "torch_threads_single_process": torch.get_num_threads(),
        "load_average_before": [round(v, 2) for v in load_before],
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"ray": ray.__version__, "torch": torch.__version__},
        **results,
        "ratio_select_stage_vs_per_image_loop": round(
            results["per_image_loop"]["seconds"] / results["select_stage"]["seconds"], 2
        ),
        "ratio_serial_scorer_vs_per_image_loop": round(
            results["per_image_loop"]["seconds"] / results["serial_scorer"]["seconds"], 2
        ),
        "scores_vs_per_image_loop": {
            "compared": len(keys),
            "max_abs_diff": float(diff.max()) if len(diff) else None,
            "top1_agreement": float(np.mean([loop_scores[k][1] == staged[k][1] for k in keys])) if keys else None,
        },
        "serial_scorer_equals_stage": serial == staged,
        "stage_summary_images_scored": summary["totals"]["images_made"],
        "repeats": args.repeats,
        "smoke_test": args.smoke_test,
    }
    ok = serial == staged and len(keys) == candidates == summary["totals"]["images_made"]
    if not ok:
        print("[bench] ERROR: the contenders did not score the same images to the same values", flush=True)
    write_results(out, args.results, keep=not args.smoke_test or args.results != parse_args([]).results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

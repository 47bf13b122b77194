"""Speed and memory benchmark of the pipeline. Prints a table per part and writes JSON.

    python benchmarks/benchmark.py profile  --data-root ../shared/mvtec --category bottle \\
        --backbone mobilenet_v2 --weights ../shared/weights/mobilenet_v2_imagenet_features.pth
    python benchmarks/benchmark.py scaling  (same flags) --sizes 25 50 100 200 400
    python benchmarks/benchmark.py synthetic --synthetic-root /tmp/mvtec_synth --backbone ...

1. profile: seconds per stage on one category, and end-to-end / backbone-forward-only on the same
   images (the forward pass is the floor; the ratio says what the rest costs).
2. scaling: memory-bank build time (embed + coreset) and peak memory against the number of
   training images (resampled from the category), each size in a fresh process.
3. synthetic: a generated dataset with MVTec AD's shape (15 categories, 3,629 train and 1,725 test
   images at their real sizes, planted defects with masks), then the whole main.py loop, timed.
4. coreset: the greedy coreset alone on random patches (--sizes are patch counts), each
   evaluation order on the device, against the bandwidth floor of one pick.
5. decode: the decode libraries on the category's PNGs, speed and difference to the reference.
6. fill: a cold decode cache filled by loader batches against decoding ahead, no model.
7. read: a warm cache read item by item and through the read-ahead thread, no model.
8. knn: PatchCore's nearest-neighbour indexes on one category: the bank fitted once per
   --fractions, the test split scored with each index, its metrics beside the exact index's.
9. table: the README's table on one category: each of its rows (--rows) run cold, with a decode
   cache of its own emptied first, then warm; metrics and fit + test seconds of both runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

if __name__ != "__mp_main__":
    # As in main.py: a spawned drawing process of an in-process run runs this file as
    # __mp_main__, and a benchmark of the run must not pay torch's import in every such process
    # when main.py does not. Worker functions of this file import what they use themselves.
    import torch  # noqa: E402

    import pipeline  # noqa: E402
    from config import resolve_config, resolve_device  # noqa: E402
    from datasets.loader import ImageBatches, default_workers  # noqa: E402
    from datasets import MVTecCategory  # noqa: E402
    from models.backbone import FeatureExtractor  # noqa: E402
    from models.base import synchronize, timed  # noqa: E402
    from models.patchcore import PatchCore  # noqa: E402
    from utils.errors import UserError  # noqa: E402
    from utils.parse import flag_names  # noqa: E402
    from utils.report import markdown_table  # noqa: E402

# MVTec AD's shape: category -> (train images, test good, test defective, image side in px)
MVTEC_SHAPE = {
    "bottle": (209, 20, 63, 900), "cable": (224, 58, 92, 1024), "capsule": (219, 23, 109, 1000),
    "carpet": (280, 28, 89, 1024), "grid": (264, 21, 57, 1024), "hazelnut": (391, 40, 70, 1024),
    "leather": (245, 32, 92, 1024), "metal_nut": (220, 22, 93, 700), "pill": (267, 26, 141, 800),
    "screw": (320, 41, 119, 1024), "tile": (230, 33, 84, 840), "toothbrush": (60, 12, 30, 1024),
    "transistor": (213, 60, 40, 1024), "wood": (247, 19, 60, 1024), "zipper": (240, 32, 119, 1024),
}


def machine(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {torch.get_num_threads()} CPU threads"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """A part's result as a titled markdown table (what RESULTS.md quotes)."""
    print(f"\n## {title}")
    print("\n".join(markdown_table(headers, rows)))


def method_settings(args) -> dict:
    """--coreset for the PatchCore methods, then every --set NAME=VALUE, parsed as main.py would."""
    from models.registry import METHODS
    method = METHODS[args.method]
    parsers = {s.name: s.parse for s in method.settings}
    settings = {"coreset_fraction": args.coreset} if "coreset_fraction" in parsers else {}
    for item in args.set or []:
        name, _, value = item.partition("=")
        if name not in parsers:
            raise SystemExit(f"--set {item}: {args.method} has no setting {name!r} "
                             f"(it has {', '.join(parsers)})")
        settings[name] = parsers[name](value)
    return settings


def run_pipeline(args, method: str | None = None, settings: dict | None = None,
                 **options) -> float:
    """One whole run through the library pipeline (what main.py runs), timed end to end, into an
    emptied ``result_dir``: a run into a folder holding an earlier one (the last invocation's)
    first moves that to ``previous/``, which would be timed with it and pile up there. ``method``
    and ``settings`` (library names) replace --method and --coreset/--set."""
    shutil.rmtree(options["result_dir"], ignore_errors=True)
    start = time.perf_counter()
    pipeline.run(resolve_config(
        method=method or args.method, backbone=args.backbone,
        method_settings=method_settings(args) if settings is None else settings,
        device=args.device, precision=args.precision, no_cache=args.no_cache,
        cache_dir=cache_dir(args), weights=args.weights, progress=False, **options))
    return time.perf_counter() - start


def cache_dir(args) -> Path | None:
    """The benchmark's own decode cache (never inside the shared data folder)."""
    return None if args.no_cache else Path(args.work_dir) / "cache"


# Stages that partition a category's wall time (embed_train, coreset and index lie inside fit).
TOP_STAGES = ("data", "fit", "test", "metrics", "plots", "write", "report")


def unattributed(total: float, payload: dict) -> float:
    """Wall seconds of a run that no recorded stage accounts for."""
    recorded = sum(m["timings"].get(stage, 0.0) for m in payload["categories"].values()
                   for stage in TOP_STAGES)
    return total - recorded - sum(payload.get("run_timings", {}).values())


def precision(args, device) -> str:
    """The run's precision for a bare extractor: auto is fp16 on a GPU, fp32 on a CPU."""
    return resolve_config(device=str(device), precision=args.precision,
                          result_dir=Path(args.work_dir)).precision


FLOOR_PASSES = 3


def backbone_floor(args, device) -> dict:
    """Forward-only seconds over the category's train+test images, already decoded, on device:
    the same extractor main.py builds (BatchNorm folded, channels_last), best of 3 passes."""
    category_dir = Path(args.data_root) / args.category
    images = []
    start = time.perf_counter()
    for split in ("train", "test"):
        dataset = MVTecCategory(category_dir, split)
        images += [dataset[i]["image"] for i in range(len(dataset))]
    decode = time.perf_counter() - start
    batch = torch.stack(images).to(device)
    extractor = FeatureExtractor(args.backbone, PatchCore.layers, weights=args.weights,
                                 precision=precision(args, device)).to(device)
    size = args.batch_size or (32 if device.type == "cuda" else 8)
    for chunk in batch[:size].split(size):  # warm-up: cuDNN autotune, allocator
        extractor(chunk)
    passes = []
    for _ in range(FLOOR_PASSES):  # the fastest pass: a shared machine only ever adds time
        synchronize(device)
        start = time.perf_counter()
        for chunk in batch.split(size):
            extractor(chunk)
        synchronize(device)
        passes.append(time.perf_counter() - start)
    return {"images": len(batch), "decode_serial_seconds": decode,
            "backbone_forward_seconds": min(passes), "backbone_forward_passes": passes}


def profile(args, device) -> dict:
    """main.py on one category: the first run fills the decode cache (cold), then ``--runs``
    runs (default 2) read it (warm, the target's condition), of which the fastest is reported
    beside the fastest forward pass; with --no-cache every run decodes every image."""
    floor = backbone_floor(args, device)
    if cache_dir(args) is not None:
        shutil.rmtree(cache_dir(args), ignore_errors=True)  # start cold
    runs = []
    for run in ["cold"] + ["warm"] * (args.runs or 2):
        out = Path(args.work_dir) / f"profile_{run}"
        end_to_end = run_pipeline(args, data_root=Path(args.data_root),
                                  categories=[args.category], custom=True, result_dir=out,
                                  plots=0)
        payload = json.loads((out / "metrics.json").read_text())
        metrics = payload["categories"][args.category]
        runs.append({"cache": "off" if args.no_cache else run, "end_to_end_seconds": end_to_end,
                     "stages": {**metrics["timings"], **payload.get("run_timings", {}),
                                "unattributed": unattributed(end_to_end, payload)},
                     "ratio_end_to_end_over_forward": end_to_end / floor["backbone_forward_seconds"],
                     "image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"]})
    warm = [r for r in runs if r["cache"] == "warm"]
    if warm:  # report the fastest warm run only
        runs = [r for r in runs if r["cache"] != "warm"] + \
            [min(warm, key=lambda r: r["end_to_end_seconds"])]
    print_table(f"profile: {args.category}, {args.backbone}, coreset {args.coreset}, "
                f"precision {args.precision}",
                ["stage", *(f"cache {r['cache']}" for r in runs)],
                [[f"{key.replace('_seconds', '')} ({floor['images']} images)",
                  f"{floor[key]:.2f}", *[""] * (len(runs) - 1)]
                 for key in ("decode_serial_seconds", "backbone_forward_seconds")]
                + [[stage, *(f"{r['stages'][stage]:.2f}" for r in runs)]
                   for stage in runs[0]["stages"]]
                + [["end-to-end (main.py, plots off)",
                    *(f"{r['end_to_end_seconds']:.2f}" for r in runs)]])
    print("ratio end-to-end / backbone forward: " +
          ", ".join(f"{r['ratio_end_to_end_over_forward']:.2f} (cache {r['cache']})" for r in runs))
    return {**floor, "runs": runs}


def _scale_one(args) -> None:
    """One scaling point, in its own process so that its peak memory is its own: PatchCore fitted
    on ``--n`` training images (the category's resampled: image i is file i mod N), then the
    category's real test split scored against that bank, as a run does."""
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    category_dir = Path(args.data_root) / args.category
    dataset = MVTecCategory(category_dir, "train", cache_dir=cache_dir(args))
    originals = list(dataset.samples)
    dataset.samples = [originals[i % len(originals)] for i in range(args.n)]
    extractor = FeatureExtractor(args.backbone, PatchCore.layers, weights=args.weights,
                                 precision=precision(args, device)).to(device)
    options = {"coreset_shard_size": args.shard_size} if args.shard_size else {}
    model = PatchCore(extractor, coreset_fraction=args.coreset, device=device, **options)
    size = 32 if device.type == "cuda" else 8
    workers = min(default_workers(device), len(originals))
    start = time.perf_counter()
    model.fit(ImageBatches(dataset, size, device, workers=workers))
    synchronize(device)
    seconds = time.perf_counter() - start
    test = MVTecCategory(category_dir, "test", cache_dir=cache_dir(args))
    start = time.perf_counter()
    scores = pipeline.score(model, ImageBatches(test, size, device, workers=workers))
    test_seconds = time.perf_counter() - start
    metrics, _ = pipeline.evaluate(test, scores, device)
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    patches = args.n * model.patches_per_image(224)
    print(json.dumps({"train_images": args.n, "patches": patches,
                      "bank": model.memory_summary()["bank_patches"],
                      "shards": model.shard_plan(args.n, patches // args.n)[1],
                      "seconds": seconds, **model.timings, "test_seconds": test_seconds,
                      "image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_rss_loader_processes_mb":
                          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "peak_gpu_mb": peak_gpu}))


def scaling(args, device) -> list[dict]:
    rows = []
    for n in args.sizes:
        command = [sys.executable, __file__, "_scale_one", "--n", str(n), "--data-root",
                   str(args.data_root), "--category", args.category, "--backbone", args.backbone,
                   "--coreset", str(args.coreset), "--device", args.device,
                   "--precision", args.precision, "--work-dir", str(args.work_dir)]
        if args.no_cache:
            command.append("--no-cache")
        if args.weights:
            command += ["--weights", str(args.weights)]
        if args.shard_size:
            command += ["--shard-size", str(args.shard_size)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print_table(f"scaling: memory bank of {args.category}, {args.backbone}, coreset {args.coreset}",
                ["train images", "patches", "shards", "bank", "embed s", "coreset s", "fit s",
                 "fit s per image", "test s", "image / pixel AUROC", "peak RSS MB", "peak GPU MB"],
                [[str(r["train_images"]), str(r["patches"]), str(r["shards"]), str(r["bank"]),
                  f"{r['embed_train']:.2f}", f"{r['coreset']:.2f}", f"{r['seconds']:.2f}",
                  f"{r['seconds'] / r['train_images']:.4f}", f"{r['test_seconds']:.2f}",
                  f"{r['image_auroc']:.3f} / {r['pixel_auroc']:.3f}", f"{r['peak_rss_mb']:.0f}",
                  f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "-"]
                 for r in rows])
    return rows


def decode(args, device) -> list[dict]:
    """Decode + resize + crop of the category's PNGs with each library, one image at a time in
    this process: images per second, and how far each crop is from the reference pipeline's
    (PIL bilinear with antialias, what PatchCore's code and the decode cache use) in grey levels.
    A library's path may replace the reference only within 1 grey level everywhere."""
    import cv2
    import numpy as np
    import torchvision
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    from datasets.mvtec import decode_image, preprocess, preprocess_image

    paths = sorted((Path(args.data_root) / args.category).rglob("*.png"))
    paths = [p for p in paths if "ground_truth" not in p.parts]
    resize, crop = 256, 224

    def centre(image):  # H, W, 3 with the shorter side == resize
        top, left = (round((image.shape[0] - crop) / 2), round((image.shape[1] - crop) / 2))
        return image[top:top + crop, left:left + crop]

    def size_of(height, width):
        return (resize, int(resize * width / height)) if height <= width else \
            (int(resize * height / width), resize)

    def pil(path):
        return preprocess_image(np.asarray(Image.open(path).convert("RGB")), resize, crop)

    def cv2_decode_rgb_pil_resize(path):  # colour converted (grey repeated) at full size
        image = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        return preprocess_image(image, resize, crop)

    def this_project(path):  # cv2 decodes, PIL swaps BGR while copying and resizes
        return preprocess(decode_image(path), resize, crop)

    def cv2_area(path):
        image = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        height, width = size_of(*image.shape[:2])
        return centre(cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA))

    def torchvision_antialias(path):
        image = torchvision.io.decode_image(torchvision.io.read_file(str(path)),
                                            mode=torchvision.io.ImageReadMode.RGB)
        resized = TF.resize(image, list(size_of(*image.shape[1:])), antialias=True,
                            interpolation=TF.InterpolationMode.BILINEAR)
        return centre(resized.permute(1, 2, 0).numpy())

    paths_of = {"PIL decode + PIL resize": pil,
                "cv2 decode, RGB at full size, PIL resize": cv2_decode_rgb_pil_resize,
                "cv2 decode, BGR swapped by PIL, PIL resize (datasets.mvtec)": this_project,
                "cv2 decode + cv2 INTER_AREA": cv2_area,
                "torchvision.io decode + resize (antialias)": torchvision_antialias}
    reference = [pil(p) for p in paths]
    rows = []
    for name, function in paths_of.items():
        start = time.perf_counter()
        crops = [function(p) for p in paths]
        seconds = time.perf_counter() - start
        differences = [np.abs(a.astype(int) - b.astype(int)) for a, b in zip(crops, reference)]
        rows.append({"path": name, "images": len(paths), "seconds": seconds,
                     "images_per_second": len(paths) / seconds,
                     "max_grey_level_difference": int(max(d.max() for d in differences)),
                     "share_of_pixels_off_by_more_than_1": float(np.mean(
                         [np.mean(d > 1) for d in differences]))})
    print_table(f"decode: {len(paths)} PNGs of {args.category}, resize {resize}, crop {crop}, "
                f"one process, torch threads {torch.get_num_threads()}",
                ["path", "images/s", "max difference to PIL (grey levels)", "pixels off by > 1"],
                [[r["path"], f"{r['images_per_second']:.1f}", str(r["max_grey_level_difference"]),
                  f"{100 * r['share_of_pixels_off_by_more_than_1']:.2f} %"] for r in rows])
    return rows


def fill(args, device) -> list[dict]:
    """A cold decode cache filled for --categories (default --category) under --data-root, from
    an empty cache each time: (a) as a cold run's loaders fill it, DataLoader processes each
    decoding whole batches, split after split; (b) as decoding ahead fills it, single images
    handed to a process pool in run order (datasets/decode_ahead.py). No model runs: this is the
    decode side of a cold run alone. --processes for both (default: decode-ahead's default)."""
    from datasets.decode_ahead import DecodeAhead, default_processes

    processes = args.processes or default_processes()
    batch_size = args.batch_size or (32 if device.type == "cuda" else 8)
    names = args.categories or [args.category]
    rows = []
    for way in ("loader batches", "decode ahead"):
        cache = Path(args.work_dir) / "fill_cache"
        shutil.rmtree(cache, ignore_errors=True)
        splits = {name: [MVTecCategory(Path(args.data_root) / name, split, cache_dir=cache)
                         for split in ("train", "test")] for name in names}
        n_images = sum(len(split) for parts in splits.values() for split in parts)
        start = time.perf_counter()
        if way == "loader batches":
            for parts in splits.values():
                for split in parts:
                    for _ in ImageBatches(split, batch_size, device, workers=processes):
                        pass
        else:
            ahead = DecodeAhead(splits, processes)
            for name in names:
                ahead.wait(name)
            ahead.close()
        seconds = time.perf_counter() - start
        rows.append({"way": way, "processes": processes, "batch_size": batch_size,
                     "images": n_images, "seconds": seconds,
                     "images_per_second": n_images / seconds})
    print_table(f"cold cache fill: {', '.join(names)}, {processes} processes, {machine(device)}",
                ["way", "images", "seconds", "images/s"],
                [[f"{r['way']} (batch {r['batch_size']})", str(r["images"]), f"{r['seconds']:.2f}",
                  f"{r['images_per_second']:.1f}"] for r in rows])
    return rows


def read(args, device) -> list[dict]:
    """A warm run's image reading, no model: --category's train split from a filled decode cache,
    (a) item by item in this thread, (b) in batches through the read-ahead thread that a fully
    cached split gets (datasets/loader.py). Images per second, median and best of --runs
    (default 7) passes: the ceiling this reading puts on a run's images per second."""
    split = MVTecCategory(Path(args.data_root) / args.category, "train",
                          cache_dir=Path(args.work_dir) / "cache")
    for index in range(len(split)):  # fill the cache (a no-op when it is warm)
        split.load(index)
    batches = ImageBatches(split, args.batch_size or 32, device)

    def items():
        for index in range(len(split)):
            split[index]

    def through_thread():
        for _ in batches:
            pass

    rows = []
    for way, read_all in (("items in this thread", items), ("read-ahead thread, batches",
                                                            through_thread)):
        rates = []
        for _ in range(args.runs or 7):
            start = time.perf_counter()
            read_all()
            rates.append(len(split) / (time.perf_counter() - start))
        rows.append({"way": way, "images": len(split), "median_images_per_second":
                     statistics.median(rates), "best_images_per_second": max(rates)})
    print_table(f"warm reading: {args.category} train, {machine(device)}",
                ["way", "images", "images/s median", "images/s best"],
                [[r["way"], str(r["images"]), f"{r['median_images_per_second']:.0f}",
                  f"{r['best_images_per_second']:.0f}"] for r in rows])
    return rows


def coreset(args, device) -> list[dict]:
    """The greedy coreset alone on random 1,536-d patches (WRN-50's embedding width): each
    evaluation order that exists on ``device``, seconds per pick against the bandwidth floor of
    one pick (one read of the N x 132 float32 augmented projection), whether all float32 orders
    pick the same patches, and what share of the float16 path's picks they share. --sizes are
    patch counts."""
    from models.coreset import ApproximateGreedyCoreset

    orders = ({"candidates": dict(order="candidates"), "eager": dict(order="eager"),
               "eager fp16": dict(precision="fp16")} if device.type == "cpu" else
              {"steps": dict(graph_steps=0), "graph 64": dict(graph_steps=64),
               "graph 256": dict(graph_steps=256),
               "graph 64 fp16": dict(graph_steps=64, precision="fp16"),
               "candidates graph 64": dict(graph_steps=64, order="candidates")})
    rows = []
    for n in args.sizes:
        generator = torch.Generator().manual_seed(n)
        features = torch.randn(n, 1536, generator=generator).to(device)
        picks, row = {}, {"patches": n, "picks": max(1, int(n * args.coreset))}
        for name, options in orders.items():
            sampler = ApproximateGreedyCoreset(args.coreset, progress=False, **options)
            sampler.run(features[:4096])  # warm-up: cuBLAS handles, allocator
            synchronize(device)
            start = time.perf_counter()
            picks[name] = sampler.run(features).cpu()
            synchronize(device)
            row[name] = time.perf_counter() - start
            if sampler.updates is not None:  # the candidates order ran: what its time depends on
                row["candidate_updates"] = sampler.updates
                row["candidate_products_share"] = sampler.updated_products / (n * row["picks"])
        first = next(iter(picks.values()))
        exact = {name: p for name, p in picks.items() if "fp16" not in name}
        row["same_picks"] = all(torch.equal(first, other) for other in exact.values())
        half = next(p for name, p in picks.items() if "fp16" in name)
        row["fp16_same_set_share"] = len(set(half.tolist()) & set(first.tolist())) / len(first)
        # ~3.0 TB/s: a device-to-device copy on the lent H100 (read + write counted)
        row["floor_us_per_pick"] = n * 132 * 4 / 3.0e12 * 1e6 if device.type == "cuda" else None
        # fp16: the N x 128 half copy, and on average half the float32 block of chosen centres
        row["fp16_floor_us_per_pick"] = (n * 128 * 2 + row["picks"] / 2 * 128 * 4) / 3.0e12 * 1e6 \
            if device.type == "cuda" else None
        rows.append(row)
    print_table(f"coreset alone: random 1536-d patches, fraction {args.coreset}, {machine(device)}",
                ["patches", "picks", *(f"{o} s (us/pick)" for o in orders),
                 "floor us/pick fp32 / fp16", "same picks (fp32 orders)", "fp16: same patches",
                 "candidates: updates, products / eager's"],
                [[str(r["patches"]), str(r["picks"]),
                  *(f"{r[o]:.2f} ({r[o] / r['picks'] * 1e6:.0f})" for o in orders),
                  "-" if r["floor_us_per_pick"] is None else
                  f"{r['floor_us_per_pick']:.0f} / {r['fp16_floor_us_per_pick']:.0f}",
                  str(r["same_picks"]), f"{100 * r['fp16_same_set_share']:.2f} %",
                  f"{r['candidate_updates']}, {r['candidate_products_share']:.2f}"]
                 for r in rows])
    return rows


def knn(args, device) -> list[dict]:
    """PatchCore's nearest-neighbour indexes on --category: the bank fitted once per --fractions
    (coreset fractions), then the test split scored with each of --indexes (``hnsw@40``: hnsw
    built with that efConstruction, 40 being faiss's default) -- the index's build and the
    scoring timed, image / pixel AUROC and AUPRO, and the index's loss against exact search on
    the first test batch's patches (recall@1, distance excess), as a run reports it."""
    from models import knn as knn_module

    rows = []
    for fraction in args.fractions:
        config = resolve_config(
            method="patchcore", method_settings={"coreset_fraction": fraction},
            categories=[args.category], data_root=Path(args.data_root), custom=True,
            backbone=args.backbone, weights=args.weights, device=str(device),
            precision=args.precision, no_cache=args.no_cache, cache_dir=cache_dir(args),
            result_dir=Path(args.work_dir) / "knn", plots=0, progress=False)
        data = pipeline.load_category(config, args.category)
        model = pipeline.fit(config, pipeline.build_extractor(config), data.train)
        first = next(iter(pipeline.image_batches(config, data.test, "queries")))
        queries = model.in_parts(model.embed, first.images.to(model.device)).flatten(0, 2)
        for name in args.indexes:
            kind, _, effort = name.partition("@")
            default_effort = knn_module.HNSW_BUILD
            knn_module.HNSW_BUILD = int(effort) if effort else default_effort
            try:
                model.knn = knn_module.NearestNeighbours(model.device, index=kind)
                build = timed(device, model.knn.fit, model.memory_bank)
            finally:
                knn_module.HNSW_BUILD = default_effort
            start = time.perf_counter()
            scores = pipeline.score(model, pipeline.image_batches(config, data.test, "test"))
            test = time.perf_counter() - start
            metrics, _ = pipeline.evaluate(data.test, scores, config.device)
            rows.append({"coreset": fraction, "bank_patches": len(model.memory_bank),
                         "index": name, "build_seconds": build, "test_seconds": test,
                         **{key: metrics[key] for key in ("image_auroc", "pixel_auroc",
                                                          "pixel_aupro")},
                         **model.knn.search_quality(queries), "queries": len(queries)})
    print_table(f"nearest-neighbour indexes: {args.category}, {args.backbone}, {machine(device)}",
                ["coreset", "bank patches", "index", "build s", "test s", "image AUROC %",
                 "pixel AUROC %", "AUPRO %", "recall@1", "distance excess mean / max"],
                [[f"{r['coreset']:g}", f"{r['bank_patches']:,}", r["index"],
                  f"{r['build_seconds']:.2f}", f"{r['test_seconds']:.2f}",
                  *(f"{100 * r[key]:.2f}" for key in ("image_auroc", "pixel_auroc",
                                                       "pixel_aupro")),
                  f"{r['recall_at_1']:.4f}",
                  f"{100 * r['distance_excess_mean']:.3f} % / "
                  f"{100 * r['distance_excess_max']:.1f} %"]
                 for r in rows])
    return rows


# The README's bottle table, row by row: the method and its settings by their library names (the
# flags in the README's first column). Every other flag is the default.
README_ROWS = {
    "pc1": ("patchcore", {"coreset_fraction": 0.01}),
    "pc10": ("patchcore", {"coreset_fraction": 0.1}),
    "spade5": ("spade", {"k": 5}),
    "spade50": ("spade", {"k": 50}),
    "padim": ("padim", {"dims": 100}),
    "sa1": ("sa_patchcore", {"coreset_fraction": 0.01}),
}
TABLE_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_f1_max")


def table(args, device) -> dict:
    """The README's table on ``--category`` of ``--data-root`` (MVTec AD's layout, never
    downloaded): each row run twice into one decode cache, emptied before the row (cold: the
    decode is paid in fit and test), then filled (warm). A row's two runs must give the same
    metrics: a difference would mean the cache changes what is measured."""
    rows = {}
    for key in args.rows or README_ROWS:
        method, settings = README_ROWS[key]
        if cache_dir(args) is not None:
            shutil.rmtree(cache_dir(args), ignore_errors=True)
        row = {"method": method, "settings": settings}
        for run in ("cold", "warm"):
            out = Path(args.work_dir) / f"table_{key}_{run}"
            run_pipeline(args, method=method, settings=settings, data_root=Path(args.data_root),
                         categories=[args.category], download=False, result_dir=out)
            payload = json.loads((out / "metrics.json").read_text())
            metrics = payload["categories"][args.category]
            row[run] = {**{name: metrics[name] for name in TABLE_METRICS},
                        "fit_seconds": metrics["timings"]["fit"],
                        "test_seconds": metrics["timings"]["test"], "timings": metrics["timings"]}
        # the two runs' alike: every setting, resolved, and the environment
        rows[key] = {**row, "method_settings": payload["config"]["method_settings"],
                     "environment": payload["environment"]}
    print_table(f"table: {args.category}, {args.backbone}, device {device}",
                ["row", "image / pixel AUROC", "AUPRO", "fit + test, warm (cold)"],
                [[f"{row['method']} {row['settings']}",
                  f"{row['warm']['image_auroc']:.3f} / {row['warm']['pixel_auroc']:.3f}",
                  f"{row['warm']['pixel_aupro']:.3f}",
                  f"{row['warm']['fit_seconds']:.1f} s + {row['warm']['test_seconds']:.1f} s "
                  f"({row['cold']['fit_seconds']:.1f} s + {row['cold']['test_seconds']:.1f} s)"]
                 for row in rows.values()])
    apart = [key for key, row in rows.items()
             if any(row["cold"][name] != row["warm"][name] for name in TABLE_METRICS)]
    if apart:
        print(f"the cold and warm runs' metrics differ for: {', '.join(apart)}")
    return {"rows": rows, "cold_and_warm_metrics_differ": apart}


def _make_one(task) -> str:
    from datasets.synthetic import make_category

    root, name, (n_train, n_good, n_bad, size), seed = task
    make_category(root, name, n_train=n_train, n_test_good=n_good, size=size, seed=seed,
                  defects={"blob": n_bad - n_bad // 2, "scratch": n_bad // 2}, noise=0.01)
    return name


def synthetic(args, device) -> dict:
    root = Path(args.synthetic_root)
    names = args.categories or list(MVTEC_SHAPE)
    missing = [(root, name, shape, i) for i, (name, shape) in enumerate(MVTEC_SHAPE.items())
               if name in names and not (root / name / "train" / "good").is_dir()]
    start = time.perf_counter()
    if missing:
        with ProcessPoolExecutor(max_workers=args.generate_workers) as pool:
            list(pool.map(_make_one, missing))
    generate = time.perf_counter() - start
    if cache_dir(args) is not None:
        shutil.rmtree(cache_dir(args), ignore_errors=True)  # the first run starts cold
    runs = []
    for run in range(args.runs or 1):
        out = Path(args.work_dir) / f"synthetic_{run}"
        total = run_pipeline(args, data_root=Path(root), custom=True, result_dir=out,
                             plots=args.plots, plot_workers=args.plot_workers,
                             categories=names)
        payload = json.loads((out / "metrics.json").read_text())
        stages: dict[str, float] = {}
        for m in payload["categories"].values():
            for stage, seconds in m["timings"].items():
                stages[stage] = stages.get(stage, 0.0) + seconds
        n_test = sum(m["n_test"] for m in payload["categories"].values())
        stages.update(payload.get("run_timings", {}))
        stages["unattributed"] = unattributed(total, payload)
        runs.append({"cache": "off" if args.no_cache else ("cold" if run == 0 else "warm"),
                     "total_seconds": total, "stages_summed": stages,
                     "n_train": sum(m["n_train"] for m in payload["categories"].values()),
                     "n_test": n_test, "test_images_per_second": n_test / stages["test"],
                     "mean_image_auroc": payload["mean"]["image_auroc"],
                     "mean_pixel_auroc": payload["mean"]["pixel_auroc"]})
    first = runs[0]
    print_table(f"synthetic MVTec-shaped run: {first['n_train']} train / {first['n_test']} test "
                f"images, {args.method} {method_settings(args)}, {args.backbone}, plots "
                f"{args.plots} (drawing processes: {args.plot_workers or 'default'}), precision "
                f"{args.precision}",
                [f"stage (summed over {len(names)} categories)",
                 *(f"cache {r['cache']}" for r in runs)],
                [[stage, *(f"{r['stages_summed'][stage]:.2f}" for r in runs)]
                 for stage in first["stages_summed"]]
                + [["**total, main.py**", *(f"**{r['total_seconds']:.2f}**" for r in runs)]])
    print("test throughput (decode + forward + kNN + map), images/s: "
          + ", ".join(f"{r['test_images_per_second']:.0f} (cache {r['cache']})" for r in runs)
          + f"; data generation took {generate:.0f} s (not counted)")
    result = {"generate_seconds": generate, "runs": runs}
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("profile", "scaling", "synthetic", "coreset", "decode",
                                           "fill", "read", "knn", "table", "_scale_one"))
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "mvtec")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--categories", nargs="+", default=None,
                        help="fill: these categories under --data-root; synthetic: only these "
                             "of the 15 (default all)")
    parser.add_argument("--processes", type=int, default=None,
                        help="fill: decoding processes (default: decode-ahead's)")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--coreset", type=float, default=0.01)
    parser.add_argument("--method", default="patchcore",
                        help="profile, synthetic: the method run (default patchcore)")
    parser.add_argument("--set", nargs="+", metavar="NAME=VALUE",
                        help="profile, synthetic: method settings by their library names, e.g. "
                             "k=50 coreset_precision=fp16 knn_index=flat-fp16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--no-cache", action="store_true", help="decode every image every time")
    parser.add_argument("--runs", type=int, default=None,
                        help="synthetic: run main.py this many times (the first fills the cache; "
                             "default 1); profile: warm runs after the cold one, the fastest is "
                             "reported (default 2)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200, 400])
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0],
                        help="knn: coreset fractions whose banks are searched (default 0.1 1.0)")
    parser.add_argument("--indexes", nargs="+", default=["flat", "ivf-flat", "hnsw", "hnsw@40"],
                        help="knn: the --knn-index values compared; hnsw@N: built with "
                             "efConstruction N (default flat ivf-flat hnsw hnsw@40)")
    parser.add_argument("--rows", nargs="+", choices=list(README_ROWS), default=None,
                        help="table: these of the README's rows (default all)")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="PatchCore coreset_shard_size (default: the model's)")
    parser.add_argument("--synthetic-root", type=Path, default=Path("/tmp/mvtec_synthetic"))
    parser.add_argument("--generate-workers", type=int, default=None)
    parser.add_argument("--plots", type=int, default=3)
    parser.add_argument("--plot-workers", type=int, default=None,
                        help="synthetic: processes drawing figures (default: main.py's)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/anomaly_benchmark"))
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.part == "_scale_one":
        return _scale_one(args)
    device = torch.device(resolve_device(args.device))
    result = {"part": args.part, "machine": machine(device), "device": str(device),
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "config": {k: str(v) for k, v in vars(args).items()}}
    result["result"] = {"profile": profile, "scaling": scaling, "synthetic": synthetic,
                        "coreset": coreset, "decode": decode, "fill": fill,
                        "read": read, "knn": knn, "table": table}[args.part](
        args, device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # bad input (a weights file, a data folder): one line, as main.py
        # named by this script's flags where it has the setting; it never downloads, main.py does
        names = flag_names(build_parser(), sys.argv[1:])
        names["download"] = "--no-download in a main.py run first (benchmark.py reads local data)"
        print(f"error: {error.render(names)}", file=sys.stderr)
        sys.exit(2)

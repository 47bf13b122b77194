"""Industrial anomaly detection on MVTec AD: SPADE, PaDiM, PatchCore behind one CLI.

For every category: fit a memory of normal features on train/good (SPADE: the training features
themselves, PaDiM: a Gaussian per position, PatchCore: a coreset of patches), score every test
image and pixel, then write metrics, ROC curves, score distributions and localization figures.

    python main.py --method patchcore --k 1 --coreset 0.1
    python main.py --method patchcore --save-models            # + result/models/<category>.pt
    python main.py --predict new_images/ --model result/models/bottle.pt
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from datasets import MVTEC_CATEGORIES, MVTecCategory, ensure_category, find_categories
from datasets.mvtec import ImageFiles, collect_images
from datasets.prefetch import ThreadPrefetcher
from models.backbone import BACKBONES, FeatureExtractor, resolve_precision
from models.padim import PaDiM
from models.patchcore import PatchCore
from models.sa_patchcore import SAPatchCore
from models.saved_model import load_model, save_model
from models.spade import SPADE
from utils.anomaly_map import anomaly_map
from utils.errors import UserError
from utils.explain import Explainer
from utils.metrics import f1_optimal_threshold, image_auroc, image_roc, pixel_metrics
from utils.plots import (FigureQueue, plot_localization, plot_roc_curves,
                         plot_score_distribution, write_overlay)
from utils.report import Report

METHODS = {"patchcore": PatchCore, "sa_patchcore": SAPatchCore, "spade": SPADE, "padim": PaDiM}
DEFAULT_K = {"patchcore": 1, "sa_patchcore": 1, "spade": 50, "padim": None}  # PaDiM: no kNN
# Image resampling of each method's reference code: PatchCore's torchvision default (bilinear),
# SPADE's, PaDiM's and SA-PatchCore's PIL ANTIALIAS (Lanczos).
DEFAULT_RESAMPLE = {"patchcore": "bilinear", "sa_patchcore": "lanczos", "spade": "lanczos",
                    "padim": "lanczos"}
DEFAULT_CORESET = {"patchcore": 0.1, "sa_patchcore": 0.01}  # the papers' main settings


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}; e.g. 0.1 keeps 10%")
    return value


def holdout_fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}; e.g. 0.1 holds out 10%")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--method", choices=tuple(METHODS), default="patchcore")
    parser.add_argument("--k", type=positive_int, default=None,
                        help="nearest neighbours averaged into a score (default: patchcore 1, "
                             "spade 50 as in the papers)")
    parser.add_argument("--coreset", type=fraction, default=None,
                        help="PatchCore / SA-PatchCore: fraction of training patches kept in the "
                             "memory bank (default: patchcore 0.1, sa_patchcore 0.01)")
    parser.add_argument("--reweight", type=positive_int, default=None, metavar="B",
                        help="PatchCore: paper Eq. 7 image-score reweighting over B neighbours "
                             "(off, as in the official code)")
    parser.add_argument("--padim-dims", type=positive_int, default=None,
                        help="PaDiM: random channels kept (default: paper's 100 for resnet18, "
                             "550 otherwise, at most all)")
    parser.add_argument("--padim-eps", type=float, default=0.01,
                        help="PaDiM: covariance regulariser eps * I")
    parser.add_argument("--backbone", choices=tuple(BACKBONES), default=None,
                        help="ImageNet CNN (default: wide_resnet50_2; with --predict: the model's)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="local state dict of the backbone (offline); default: torchvision's "
                             "ImageNet weights, downloaded once")
    parser.add_argument("--data-root", type=Path, default=Path("mvtec_anomaly_detection"))
    parser.add_argument("--categories", nargs="+", default=None, metavar="NAME",
                        help="MVTec categories (default: all 15); with --custom any folder names")
    parser.add_argument("--custom", action="store_true",
                        help="data root holds custom categories in MVTec layout (masks optional)")
    parser.add_argument("--result-dir", type=Path, default=Path("result"))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--resize", type=positive_int, default=256)
    parser.add_argument("--crop", type=positive_int, default=224)
    parser.add_argument("--resample", choices=("bilinear", "lanczos"), default=None,
                        help="image resize filter (default: the method's reference code: "
                             "patchcore bilinear, spade/padim lanczos)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images per forward pass (default: 32 on GPU, 8 on CPU)")
    parser.add_argument("--workers", type=nonnegative_int, default=None,
                        help="DataLoader processes decoding images (default: none when every "
                             "image of a split is in the cache, else up to 8 with a GPU and up to "
                             "2 on CPU, where more starve the compute threads)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="backbone forward precision (auto: fp16 autocast on GPU, fp32 on "
                             "CPU; bf16 moved bottle pixel AUROC by 0.4 points, so only on "
                             "request); features are always used in fp32")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where resized images are cached (default: <data-root>/.cache)")
    parser.add_argument("--no-cache", action="store_true",
                        help="decode every image from its original file on every run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-download", action="store_true",
                        help="never download; fail if a category is missing")
    parser.add_argument("--plots", type=int, default=3, metavar="N",
                        help="localization figures per defect type (0 disables)")
    parser.add_argument("--plot-workers", type=nonnegative_int, default=None, metavar="N",
                        help="processes drawing figures while the next category runs (default: "
                             "4 with a GPU and >= 8 CPU cores, else 0: drawn in turn)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="skip unreadable images with a warning instead of stopping")
    parser.add_argument("--explain", action="store_true",
                        help="PatchCore / SA-PatchCore: add to each localization figure the image "
                             "rebuilt from its nearest normal patches and the nearest normal "
                             "patch of the highest-scoring patch")
    parser.add_argument("--save-models", action="store_true",
                        help="write <result-dir>/models/<category>.pt for --predict")
    parser.add_argument("--calibration-fraction", type=holdout_fraction, default=None,
                        help="part of train/good kept out of the memory and scored to set the "
                             "image threshold (default: 0.1 with --save-models, else 0 as in the "
                             "papers)")
    parser.add_argument("--calibration-quantile", type=fraction, default=0.99,
                        help="image threshold = this quantile of the held-out normal scores")
    parser.add_argument("--predict", nargs="+", default=None, metavar="PATH",
                        help="score these images / folders with --model instead of fitting")
    parser.add_argument("--model", type=Path, default=None,
                        help="a model file from --save-models, for --predict")
    parser.add_argument("--verbose", action="store_true", help="print a torchinfo backbone summary")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)

    if args.categories and not args.custom:
        unknown = [c for c in args.categories if c not in MVTEC_CATEGORIES]
        if unknown:
            parser.error(f"unknown categories {unknown}; MVTec AD has {', '.join(MVTEC_CATEGORIES)} "
                         "(use --custom for your own folders)")
    if args.crop > args.resize:
        parser.error(f"--crop {args.crop} is larger than --resize {args.resize}")
    if args.predict is not None and args.model is None:
        parser.error("--predict needs --model FILE (saved by a run with --save-models)")
    if args.model is not None and args.predict is None:
        parser.error("--model is only used with --predict PATH...")
    if args.predict is None:
        args.backbone = args.backbone or "wide_resnet50_2"
    if args.calibration_fraction is None:
        args.calibration_fraction = 0.1 if args.save_models else 0.0
    if args.k is None:
        args.k = DEFAULT_K[args.method]
    if args.coreset is None:
        args.coreset = DEFAULT_CORESET.get(args.method, 0.1)
    if args.explain and args.method not in ("patchcore", "sa_patchcore"):
        parser.error(f"--explain works with --method patchcore or sa_patchcore, not {args.method}")
    if args.resample is None:
        args.resample = DEFAULT_RESAMPLE[args.method]
    return args


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def check_writable(result_dir: Path) -> None:
    """Fail before any heavy work if results could not be saved."""
    try:
        result_dir.mkdir(parents=True, exist_ok=True)
        probe = result_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"--result-dir {result_dir} is not writable ({error.strerror}); "
                        "choose a folder you can write to") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(args, extractor, device):
    common = dict(device=device, progress=not args.no_progress)
    if args.method == "spade":
        return SPADE(extractor, k=args.k, **common)
    if args.method == "padim":
        return PaDiM(extractor, dims=args.padim_dims, eps=args.padim_eps, seed=args.seed, **common)
    # PatchCore and SA-PatchCore take the same settings
    return METHODS[args.method](extractor, coreset_fraction=args.coreset, k=args.k,
                                reweight=args.reweight, seed=args.seed, **common)


def make_loader(dataset, args, device):
    def loader(workers: int):
        return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                           num_workers=workers, pin_memory=device.type == "cuda")

    if args.workers is not None:
        return loader(args.workers)
    if getattr(dataset, "fully_cached", lambda: False)():
        # A cached image is a ~150 KB file read (~0.5 ms): one thread reads ahead, because
        # starting loader processes costs 0.15-0.4 s per loader, twice per category (H100
        # machine: a cached test split of 110 images scored in 0.48 s with 8 workers, 0.19 s
        # read in turn; read in turn, the larger train splits lost their overlap with the GPU).
        return ThreadPrefetcher(loader(0))
    return loader(min(8 if device.type == "cuda" else 2, os.cpu_count() or 1))


@torch.no_grad()
def score_test_set(model, loader, crop: int, keep_maps: bool = True):
    """Image scores [N], anomaly maps [N, crop, crop] and ground-truth masks [N, crop, crop] of
    every test image, in dataset order (masks come with the batches: no second decode). With
    ``keep_maps`` False: (image scores, None, None), and maps are only built where the image score
    is read from them (PaDiM)."""
    image_scores, maps, masks = [], [], []
    for images, batch in model.batches(loader, "score test"):
        scores, grid = model.predict(images)
        if keep_maps or model.image_score_from_map:
            batch_maps = anomaly_map(grid, crop)
        image_scores.append(batch_maps.max(axis=(1, 2)) if model.image_score_from_map
                            else scores.float().cpu().numpy())
        if keep_maps:
            maps.append(batch_maps)
            masks.append(batch["mask"][:, 0].numpy())
    if not keep_maps:
        return np.concatenate(image_scores), None, None
    return np.concatenate(image_scores), np.concatenate(maps), np.concatenate(masks)


def evaluate(test: MVTecCategory, image_scores, maps, masks,
             device: torch.device | str = "cpu") -> tuple[dict, dict]:
    """(metrics, ROC curves) of one category; pixel metrics only where every defect has a mask
    (their sort over all pixels runs on ``device``)."""
    labels = test.labels
    metrics = {"image_auroc": image_auroc(labels, image_scores)}
    best = f1_optimal_threshold(labels, image_scores)
    metrics["image_f1_max"], metrics["image_threshold"] = best if best else (None, None)
    pixel = pixel_metrics(masks, maps, device=device) if test.has_masks else {}
    for key in ("pixel_auroc", "pixel_aupro", "pixel_f1_max", "pixel_threshold"):
        metrics[key] = pixel.get(key)
    curves = {"image": None, "pixel": None}
    roc = image_roc(labels, image_scores)
    if roc is not None:
        curves["image"] = (*roc, metrics["image_auroc"])
    if pixel.get("pixel_roc") is not None:
        curves["pixel"] = (*pixel["pixel_roc"], metrics["pixel_auroc"])
    return metrics, curves


def write_figures(args, figures, test, category, image_scores, maps, metrics,
                  explainer=None) -> None:
    out = args.result_dir
    figures.submit(plot_score_distribution, test.labels, image_scores,
                   out / "pred_dist" / f"{category}.png", f"{category}: image scores ({args.method})")
    if args.plots <= 0:
        return
    # Segmentation threshold: pixel F1-optimal when masks exist, else the image-level one.
    threshold = metrics["pixel_threshold"] or metrics["image_threshold"] or float(np.max(maps))
    value_range = (float(maps.min()), float(maps.max()))
    shown: dict[str, int] = {}
    for index, sample in enumerate(test.samples):
        if shown.get(sample.defect_type, 0) >= args.plots:
            continue
        shown[sample.defect_type] = shown.get(sample.defect_type, 0) + 1
        image, mask = test.load(index)
        name = f"{sample.defect_type.replace('/', '-')}_{sample.path.stem}.png"
        figures.submit(plot_localization, image, mask if test.has_masks else None, maps[index],
                       threshold, value_range, out / "localization" / category / name,
                       f"{category}/{sample.defect_type}/{sample.path.name}  "
                       f"score {image_scores[index]:.3f}",
                       extra_panels=explainer.panels(image) if explainer else ())


def run_category(args, category, extractor, device, report, curves, figures) -> dict:
    category_dir = ensure_category(args.data_root, category, download=not args.no_download)
    cache_dir = None if args.no_cache else (args.cache_dir or args.data_root / ".cache")
    train, test = (MVTecCategory(category_dir, split, args.resize, args.crop, args.skip_bad_images,
                                 args.resample, cache_dir) for split in ("train", "test"))
    if not test.labels.any():
        print(f"warning: {category}: no defective test images; AUROC, F1 and pixel metrics are "
              "not defined (reported as n/a)", file=sys.stderr)
    elif test.types_without_masks:
        print(f"warning: {category}: no masks for {', '.join(test.types_without_masks)}; "
              "pixel metrics skipped", file=sys.stderr)
    seed_everything(args.seed)
    train, calibration = split_calibration(train, args.calibration_fraction, args.seed,
                                           minimum_left=2 if args.method == "padim" else 1)

    # 1. Memory of normal features (train/good only).
    model = build_model(args, extractor, device)
    start = time.perf_counter()
    model.fit(make_loader(train, args, device))
    fit_seconds = time.perf_counter() - start
    if model.k is not None and model.k > model.memory_size:
        raise UserError(f"--k {args.k} is larger than the memory bank ({model.memory_size} "
                        f"entries) of {category}; lower --k or raise --coreset")

    # 2. Score every test image and pixel.
    start = time.perf_counter()
    image_scores, maps, masks = score_test_set(model, make_loader(test, args, device), args.crop)
    test_seconds = time.perf_counter() - start

    # 3. Metrics and figures.
    start = time.perf_counter()
    metrics, curves[category] = evaluate(test, image_scores, maps, masks, device)
    metrics["calibration"] = calibrate(model, calibration, args, device, test.labels,
                                       image_scores)
    timings = {**model.timings, "fit": fit_seconds, "test": test_seconds,
               "metrics": time.perf_counter() - start}
    metrics.update(fit_seconds=fit_seconds, test_seconds=test_seconds, n_train=len(train),
                   n_test=len(test), memory_size=model.memory_size,
                   test_images_per_second=len(test) / test_seconds, timings=timings)
    start = time.perf_counter()  # with background figure workers: the time to queue them
    figures.submit(plot_roc_curves, dict(curves), args.result_dir / "roc_curve.png",
                   roc_title(args))
    write_figures(args, figures, test, category, image_scores, maps, metrics,
                  Explainer(model, train) if args.explain else None)
    timings["plots"] = time.perf_counter() - start
    write_scores(args.result_dir / "scores" / f"{category}.csv", test, image_scores)
    if args.save_models:
        save_model(args.result_dir / "models" / f"{category}.pt", model, args.method, category,
                   preprocessing=dict(resize=args.resize, crop=args.crop, resample=args.resample),
                   thresholds=decision_thresholds(metrics, maps))
    report.add(category, metrics)
    return metrics


def roc_title(args) -> str:
    return f"{args.method} ({args.backbone}) on MVTec AD"


def split_calibration(train: MVTecCategory, fraction: float, seed: int, minimum_left: int):
    """(images for the memory, held-out normal images for the threshold); seeded, disjoint."""
    n_held = 0 if fraction <= 0 else max(1, round(len(train) * fraction))
    if n_held and len(train) - n_held < minimum_left:
        raise UserError(f"--calibration-fraction {fraction} leaves {len(train) - n_held} of "
                        f"{len(train)} training images in {train.category_dir / 'train'}; lower "
                        "it or add normal images")
    if not n_held:
        return train, None
    order = np.random.default_rng(seed).permutation(len(train))
    held = sorted(order[:n_held].tolist())
    kept = sorted(order[n_held:].tolist())
    return train.subset(kept), train.subset(held)


def calibrate(model, calibration, args, device, test_labels, test_scores) -> dict | None:
    """Image threshold from normal images only: the ``--calibration-quantile`` of the scores of
    held-out train/good images (never seen by the memory). Also reports what that threshold does
    on the test set: the share of normal test images flagged and of defective ones caught."""
    if calibration is None:
        return None
    scores, _, _ = score_test_set(model, make_loader(calibration, args, device), args.crop,
                                  keep_maps=False)
    threshold = float(np.quantile(scores, args.calibration_quantile))
    flagged = test_scores >= threshold
    normal, defective = test_labels == 0, test_labels == 1
    return {"image_threshold": threshold, "quantile": args.calibration_quantile,
            "n_images": len(calibration), "fraction": args.calibration_fraction,
            "test_false_positive_rate": float(flagged[normal].mean()) if normal.any() else None,
            "test_true_positive_rate": float(flagged[defective].mean()) if defective.any()
            else None}


def decision_thresholds(metrics: dict, maps: np.ndarray) -> dict:
    """What a saved model decides with: the calibrated image threshold when there is one, else
    the test set's F1-optimal one (labelled as such: it was tuned on labelled test images)."""
    calibrated = (metrics.get("calibration") or {}).get("image_threshold")
    image, source = ((calibrated, "calibration") if calibrated is not None else
                     (metrics["image_threshold"], "test_f1" if metrics["image_threshold"]
                      is not None else None))
    return {"image": image, "image_source": source, "image_test_f1": metrics["image_threshold"],
            "pixel_test_f1": metrics["pixel_threshold"],
            "map_range": [float(maps.min()), float(maps.max())]}


def write_scores(path: Path, test: MVTecCategory, image_scores: np.ndarray) -> None:
    """Every test image's score, so results can be re-analysed without re-running."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "defect_type", "label", "image_score"])
        for sample, score in zip(test.samples, image_scores):
            writer.writerow([sample.path.relative_to(test.category_dir).as_posix(),
                             sample.defect_type, sample.label, f"{float(score):.9g}"])


def run_predict(args, device) -> int:
    """Score new images with a saved model: predictions.csv and one overlay per image."""
    model, saved = load_model(args.model, METHODS, args.weights, device,
                              precision=args.precision, backbone=args.backbone,
                              progress=not args.no_progress)
    prep = saved["preprocessing"]
    paths = collect_images(args.predict)
    if args.skip_bad_images:
        kept = []
        for path in paths:
            try:
                ImageFiles([path], **prep).load(0)
                kept.append(path)
            except UserError as error:
                print(f"warning: skipping {path}: {error}", file=sys.stderr)
        paths = kept
    files = ImageFiles(paths, **prep)
    image_scores, maps, _ = score_test_set(model, make_loader(files, args, device), prep["crop"])
    thresholds = saved["thresholds"]
    threshold = thresholds["image"]
    out = args.result_dir
    names = unique_stems(paths)
    with open(out / "predictions.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "image_score", "threshold", "threshold_source", "anomalous",
                         "overlay"])
        for index, (path, score) in enumerate(zip(paths, image_scores)):
            decision = "" if threshold is None else int(score >= threshold)
            overlay = ""
            if args.plots > 0:
                overlay = out / "predictions" / f"{names[index]}.png"
                verdict = "" if threshold is None else ("ANOMALOUS" if decision else "normal")
                write_overlay(files.load(index), maps[index], tuple(thresholds["map_range"]),
                              overlay, f"{path.name}  score {score:.3f}  {verdict}")
            writer.writerow([str(path), f"{float(score):.9g}",
                             "" if threshold is None else f"{threshold:.9g}",
                             thresholds["image_source"] or "", decision, str(overlay)])
    flagged = "" if threshold is None else \
        f", {int((image_scores >= threshold).sum())} above the threshold {threshold:.3f}"
    print(f"{saved['category']} ({saved['method']}, {saved['backbone']}): scored {len(paths)} "
          f"images{flagged}; {out / 'predictions.csv'}")
    return 0


def unique_stems(paths: list[Path]) -> list[str]:
    """File stems for the overlays, numbered where two inputs share a name."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        names.append(path.stem if count == 0 else f"{path.stem}_{count}")
    return names


def format_line(category: str, m: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"
    return (f"{category}: image AUROC {f(m['image_auroc'])} | pixel AUROC {f(m['pixel_auroc'])} | "
            f"AUPRO {f(m['pixel_aupro'])} | pixel F1 {f(m['pixel_f1_max'])} | "
            f"fit {m['fit_seconds']:.1f} s | test {m['test_seconds']:.1f} s | "
            f"memory {m['memory_size']}" + _stage_summary(m.get("timings")))


def _stage_summary(timings: dict | None) -> str:
    if not timings:
        return ""
    return "\n  stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items())


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        args.batch_size = args.batch_size or (32 if device.type == "cuda" else 8)
        if args.plot_workers is None:
            args.plot_workers = 4 if device.type == "cuda" and (os.cpu_count() or 1) >= 8 else 0
        check_writable(args.result_dir)
        args.precision = resolve_precision(args.precision, device)
        if args.predict is not None:
            return run_predict(args, device)
        categories = args.categories or (find_categories(args.data_root) if args.custom
                                         else list(MVTEC_CATEGORIES))
        extractor = FeatureExtractor(args.backbone, METHODS[args.method].layers,
                                     weights=args.weights, precision=args.precision)
        extractor = extractor.to(device)
        if args.verbose:
            print(extractor.summary(args.crop))
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                  if k not in ("no_progress", "verbose")}
        config.update(device=str(device), weights_id=extractor.weights_id)
        report = Report(args.result_dir, args.method, args.backbone, config)
        curves: dict[str, dict] = {}
        figures = FigureQueue(args.plot_workers)
        try:
            for category in categories:
                metrics = run_category(args, category, extractor, device, report, curves,
                                       figures)
                print(format_line(category, metrics), flush=True)
            start = time.perf_counter()
            figures.wait()
            if figures.background and curves:
                # Background ROC figures of earlier categories may finish in any order; this
                # last one, drawn after all of them, holds every category.
                plot_roc_curves(curves, args.result_dir / "roc_curve.png", roc_title(args))
            if figures.background:
                print(f"figures: {time.perf_counter() - start:.2f} s waiting for "
                      f"{args.plot_workers} drawing processes", flush=True)
        except KeyboardInterrupt:
            figures.close(cancel=True)  # stop now: figures not yet started are dropped
            raise
        finally:
            figures.close()  # on an error too: the finished categories' figures are written
        if len(categories) > 1:
            print(format_line("mean", {**report.payload["mean"], "memory_size": "-"}))
        print(f"results: {args.result_dir / 'metrics.json'}, {args.result_dir / 'results.md'}, "
              f"{args.result_dir / 'roc_curve.png'}")
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished categories are in {args.result_dir / 'metrics.json'}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

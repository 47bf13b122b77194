"""The run as a library: data -> fit -> score -> evaluate -> calibrate -> write.

    from config import resolve_config
    from pipeline import run
    payload = run(resolve_config(method="spade", method_settings={"k": 5},
                                 categories=["bottle"], data_root="mvtec_anomaly_detection"))

``run`` fits and evaluates every category of a ``RunConfig`` and writes its outputs (metrics.json
and results.md after each category, figures, scores, saved models); ``predict`` scores new images
with a saved model. Nothing here parses arguments or prints: progress and warnings go to the
``logging`` module, finished categories to the ``on_category`` callback.
"""
from __future__ import annotations

import csv
import logging
import os
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from config import RunConfig, SweepPoint, check_writable
from datasets import MVTecCategory, ensure_category
from datasets.download import check_categories, source_record
from datasets.decode_ahead import DecodeAhead
from datasets.loader import ImageBatches
from datasets.mvtec import (ImageFiles, collect_images, is_category_present, skip_reason,
                            write_evaluation_maps)
from models.backbone import FeatureExtractor
from models.base import cost_line, timed
from models.knn import NearestNeighbours
from models.registry import METHODS
from models.saved_model import load_model, save_model
from utils.distributed import Group, launched_as_main
from utils.earlier_runs import finished_categories, move_earlier_run
from utils.environment import data_fingerprint, environment, free_memory_bytes
from utils.errors import DataError, SettingError, UserError, full_disk_as_error, non_finite
from utils.explain import Explainer
from utils.files import FolderInUse, FolderLock, names_apart, numbered_apart
from utils.metrics import (f1_optimal_threshold, image_auroc, image_auroc_per_defect_type,
                           image_roc, pixel_metrics)
from utils.parse import user_path
from utils.plots import (FigureQueue, plot_localization, plot_roc_curves,
                         plot_score_distribution, write_overlay)
from utils import sweep_report
from utils.report import Report, counted, dataset_name, write_roc

log = logging.getLogger("pipeline")


def configure_torch(config: RunConfig) -> None:
    """The process-wide torch settings a run depends on, all here. fp32 on a GPU is true fp32:
    PyTorch otherwise allows TF32 matmuls and convolutions, which round like fp16."""
    if config.device == "cuda" and config.precision == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def image_batches(config: RunConfig, dataset, desc: str, indices: list[int] | None = None,
                  on_failed=None) -> ImageBatches:
    return ImageBatches(dataset, config.batch_size, config.device, config.workers,
                        progress=config.progress, desc=desc, indices=indices,
                        on_failed=on_failed)


# -- data -------------------------------------------------------------------------------------

@dataclass
class CategoryData:
    train: MVTecCategory          # the images the memory is built from
    test: MVTecCategory
    calibration: MVTecCategory | None  # held-out normal images that set the threshold
    fingerprint: dict              # file count and hash of the category folder's paths and sizes
    source: dict | None            # the archive it was extracted from, with its MD5 (if known)


def check_data(config: RunConfig) -> None:
    """``check_categories`` for MVTec AD data (custom data was checked with the config), before
    the backbone is loaded, which may be a download of its own."""
    if config.custom:
        return
    try:
        check_categories(config.data_root, config.categories, config.download)
    except UserError as error:
        error.shared = True  # every process finds the same: printed once
        raise


def category_splits(config: RunConfig, category_dir: Path, skip_bad_images: bool,
                    quiet: bool = False) -> list[MVTecCategory]:
    """[train, test] of a category folder, read with the run's preprocessing and cache."""
    return [MVTecCategory(category_dir, split, config.resize, config.crop, skip_bad_images,
                          config.resample, config.cache_dir, quiet) for split in ("train", "test")]


def load_category(config: RunConfig, category: str, splits: list[MVTecCategory] | None = None,
                  quiet: bool = False) -> CategoryData:
    """The category's data; ``splits``: its [train, test] already made with the run's settings
    and every image readable (decoding ahead's), else listed here. ``quiet``: what the data lacks
    is not warned of, as where another process that reads the same category says so."""
    category_dir = ensure_category(config.data_root, category, download=config.download,
                                   mirror=config.mirror, progress=config.progress)
    train, test = splits or category_splits(config, category_dir, config.skip_bad_images, quiet)
    if not quiet:
        _warn_of_missing_labels(category, test)
    train, calibration = split_calibration(train, config.calibration_fraction, config.seed,
                                           config.method_class.min_train_images)
    return CategoryData(train, test, calibration, data_fingerprint(category_dir),
                        source_record(category_dir))


def _warn_of_missing_labels(category: str, test: MVTecCategory) -> None:
    if not test.labels.any():
        log.warning("%s: no defective test images; AUROC, F1 and pixel metrics are not defined "
                    "(reported as n/a)", category)
        return
    if test.labels.all():  # pixel metrics stay: normal pixels surround every defect
        log.warning("%s: no good (normal) test images in test/good; image AUROC and F1 are not "
                    "defined (reported as n/a)", category)
    if test.types_without_masks:
        log.warning("%s: defective images without a mask: %d of %d (%s; e.g. no %s); pixel "
                    "metrics skipped", category, test.unmasked_count, test.defective_count,
                    ", ".join(test.types_without_masks), test.missing_mask)


def split_calibration(train: MVTecCategory, fraction: float, seed: int, minimum_left: int):
    """(images for the memory, held-out normal images for the threshold); seeded, disjoint."""
    n_held = 0 if fraction <= 0 else max(1, round(len(train) * fraction))
    if n_held and len(train) - n_held < minimum_left:
        raise SettingError("calibration_fraction", fraction,
                           f"leaves {len(train) - n_held} of {len(train)} training images in "
                           f"{train.category_dir / 'train'}, and the method needs at least "
                           f"{minimum_left}; lower it ({{calibration_fraction}} 0 holds "
                           "none out, as the papers) or add normal images")
    if not n_held:
        return train, None
    order = np.random.default_rng(seed).permutation(len(train))
    return train.subset(sorted(order[n_held:].tolist())), train.subset(sorted(order[:n_held].tolist()))


# -- fit and score ---------------------------------------------------------------------------

def stages_of(points: list[SweepPoint]) -> tuple[str, ...]:
    """Every stage some point reads: what one backbone serving a sweep (over --layers) taps."""
    return tuple(dict.fromkeys(name for point in points for name in point.config.layers))


def build_extractor(config: RunConfig, layers: tuple[str, ...] | None = None
                    ) -> FeatureExtractor:
    """The run's backbone, tapping ``layers`` (default: the configuration's own)."""
    extractor = FeatureExtractor(config.backbone, layers or config.layers,
                                 weights=config.weights, precision=config.precision,
                                 bn_probe=config.crop if config.official_bn_probe else None)
    return extractor.to(config.device)


def shaped(model, config: RunConfig):
    """``model`` with, on a GPU, every batch padded to the run's batch size: one input shape
    for the whole run (``AnomalyModel.batch_shape``)."""
    if torch.device(config.device).type == "cuda":
        model.batch_shape = config.batch_size
    return model


def fit(config: RunConfig, extractor: FeatureExtractor, train: MVTecCategory,
        group: Group | None = None, categories_at_once: int = 1):
    """The fitted model, the same in every process of ``group``. A PatchCore-like model splits
    its coreset shards over the processes (each reduces the shards ``shard % world == rank``) and
    every process installs all picks in shard order; another method is fitted by rank 0 and its
    memory sent to the others. ``categories_at_once``: the categories torchrun's processes fit
    at the same time, one each (``Run``), for the memory warning."""
    group = group or Group.single()
    model = shaped(config.method_class.from_config(extractor, config, config.device), config)
    model.progress, model.quiet = config.progress and group.is_main, not group.is_main
    if group.is_main:
        warn_if_memory_short(config, model, train, fitting_beside_each_other(
            config, model, train, group, categories_at_once))
    if not group.distributed:
        model.fit(image_batches(config, train, "embed train"))
    elif model.sharded_fit:
        per_shard, _ = model.shard_plan(len(train), model.patches_per_image(config.crop))
        mine = [i for i in range(len(train)) if (i // per_shard) % group.world == group.rank]

        def my_shards() -> dict:
            parts = model.reduce_shards(image_batches(config, train, "embed train", mine)) \
                if mine else {}
            return {shard: (rows.cpu(), origins.cpu()) for shard, (rows, origins) in parts.items()}

        merged = {}
        for gathered in done_together(group, my_shards):
            merged.update(gathered)
        model.install_shards(merged)
    else:
        def fitted() -> dict:
            model.fit(image_batches(config, train, "embed train"))
            return model.memory_state()

        memory = decided_by_main(group, fitted)
        if not group.is_main:
            model.load_memory(memory)
    return model


def fitting_beside_each_other(config: RunConfig, model, train: MVTecCategory, group: Group,
                              categories_at_once: int = 1) -> int:
    """How many processes on this machine (torchrun's LOCAL_WORLD_SIZE) hold a fit's memory at
    once, this one included. On CPUs they share the machine's memory (GPUs: a device each):
    processes fitting a category each, or sharing one category's fit, where a sharded fit reduces
    a shard in every process that has one and another method is fitted by rank 0 alone."""
    here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if here <= 1 or torch.device(config.device).type != "cpu":
        return 1
    if not group.distributed:
        return min(here, categories_at_once)
    if not model.sharded_fit:
        return 1
    _, shards = model.shard_plan(len(train), model.patches_per_image(config.crop))
    return min(here, shards)


def warn_if_memory_short(config: RunConfig, model, train: MVTecCategory,
                         processes: int = 1) -> None:
    """Before a fit: say so when the memory it is estimated to hold (``fit_memory``, in each of
    ``processes`` on this machine) exceeds what the device has free. A fit that runs out is ended
    by the system without a word (a CPU) or stops inside torch (a GPU), often minutes in; this
    line comes first and says what needs less. It does not stop the run: the count is an
    estimate, and swap may still see the fit through."""
    needed = model.fit_memory(len(train), config.crop)
    free = free_memory_bytes(config.device)
    if not needed or free is None:  # a method without an estimate, or a system without a count
        return
    each = sum(needed.values())
    if processes * each <= free:
        return
    blocks = ", ".join(f"{name} {size / 2**30:.1f}" for name, size in needed.items())
    log.warning("%s: the fit is estimated to hold %.1f GiB (%s) beside the process%s, more than "
                "the %.1f GiB of %s free; it may stop for lack of memory. A smaller --crop or "
                "fewer training images%s need less; --dry-run estimates any setting",
                train.category, each / 2**30, blocks,
                f", in each of the {processes} processes fitting on this machine at once "
                f"({processes * each / 2**30:.1f} GiB)" * (processes > 1),
                max(free, 0) / 2**30, "GPU memory" if config.device == "cuda" else "memory",
                " or processes (torchrun --nproc-per-node)" * (processes > 1))


@dataclass
class Scores:
    image_scores: np.ndarray        # [N]
    maps: np.ndarray | None         # [N, H, W] anomaly maps
    masks: np.ndarray | None        # [N, H, W] ground truth


def predicted_batches(model, batches: ImageBatches, with_maps: bool = True):
    """(batch, its image scores, its anomaly maps or None) per batch, as numpy arrays."""
    for batch in batches:
        prediction = model.predict(batch.images.to(model.device, non_blocking=True), with_maps)
        scores = prediction.image_scores.float().cpu().numpy()
        maps = prediction.anomaly_maps.cpu().numpy() if with_maps else None
        # checked here, where they reach the host anyway: no metric or threshold can use them
        finite = np.isfinite(scores)
        if maps is not None:
            finite &= np.isfinite(maps).reshape(len(maps), -1).all(1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise non_finite(f"the scores of {batches.dataset.path(int(batch.indices[bad[0]]))}"
                             + f" and {len(bad) - 1} more of its batch" * (len(bad) > 1))
        yield batch, scores, maps


def score(model, batches: ImageBatches, with_maps: bool = True) -> Scores:
    """Image scores, anomaly maps and ground-truth masks of every image, in dataset order (the
    masks come with the batches: no second decode)."""
    image_scores, maps, masks = [], [], []
    for batch, batch_scores, batch_maps in predicted_batches(model, batches, with_maps):
        image_scores.append(batch_scores)
        if with_maps:
            maps.append(batch_maps)
            masks.append(batch.masks.numpy())
    if not with_maps:
        return Scores(np.concatenate(image_scores), None, None)
    return Scores(np.concatenate(image_scores), np.concatenate(maps), np.concatenate(masks))


def score_together(config: RunConfig, model, dataset, group: Group, desc: str) -> Scores:
    """``score`` with the images split over the processes in contiguous blocks of whole batches
    (so every image is scored in the batch it has in one process), gathered in dataset order."""
    if not group.distributed:
        return score(model, image_batches(config, dataset, desc))
    n_batches = -(-len(dataset) // config.batch_size)
    block = -(-n_batches // group.world) * config.batch_size
    mine = list(range(group.rank * block, min(len(dataset), (group.rank + 1) * block)))
    parts = [p for p in done_together(group, lambda: score(
        model, image_batches(config, dataset, desc, mine)) if mine else None) if p is not None]
    return Scores(*(np.concatenate([getattr(p, f) for p in parts])
                    for f in ("image_scores", "maps", "masks")))


# -- evaluate and calibrate -------------------------------------------------------------------

def evaluate(test: MVTecCategory, scores: Scores,
             device: torch.device | str = "cpu") -> tuple[dict, dict]:
    """(metrics, ROC curves) of one category; pixel metrics only where every defect has a mask
    (their sort over all pixels runs on ``device``)."""
    labels = test.labels
    metrics = {"image_auroc": image_auroc(labels, scores.image_scores)}
    best = f1_optimal_threshold(labels, scores.image_scores)
    metrics["image_f1_max"], metrics["image_threshold"] = best if best else (None, None)
    metrics["defect_types"] = image_auroc_per_defect_type(
        [s.defect_type for s in test.samples], labels, scores.image_scores)
    pixel = pixel_metrics(scores.masks, scores.maps, device=device) if test.has_masks else {}
    if test.has_masks and pixel["pixel_auroc"] is None:  # said, or n/a would look like a bug
        marked = "every pixel" if np.asarray(scores.masks).all() else "no pixel"
        log.warning("%s: the masks mark %s inside the crop as defect; pixel metrics n/a (a mask "
                    "marks its defect with non-zero values)", test.category, marked)
    for key in ("pixel_auroc", "pixel_aupro", "pixel_f1_max", "pixel_threshold"):
        metrics[key] = pixel.get(key)
    curves = {"image": None, "pixel": None}
    roc = image_roc(labels, scores.image_scores)
    if roc is not None:
        curves["image"] = (*roc, metrics["image_auroc"])
    if pixel.get("pixel_roc") is not None:
        curves["pixel"] = (*pixel["pixel_roc"], metrics["pixel_auroc"])
    return metrics, curves


def calibrate(config: RunConfig, model, calibration, test_labels, test_scores) -> dict | None:
    """Image threshold from normal images only: the ``calibration_quantile`` of the scores of
    held-out train/good images (never seen by the memory). Also reports what that threshold does
    on the test set: the share of normal test images flagged and of defective ones caught."""
    if calibration is None:
        return None
    scores = score(model, image_batches(config, calibration, "calibrate"), with_maps=False)
    threshold = float(np.quantile(scores.image_scores, config.calibration_quantile))
    flagged = test_scores >= threshold
    normal, defective = test_labels == 0, test_labels == 1
    return {"image_threshold": threshold, "quantile": config.calibration_quantile,
            "n_images": len(calibration), "fraction": config.calibration_fraction,
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


# -- write ------------------------------------------------------------------------------------

def roc_title(config: RunConfig) -> str:
    return f"{config.method} ({config.backbone}) on {dataset_name(config)}"


def write_scores(path: Path, test: MVTecCategory, image_scores: np.ndarray) -> None:
    """Every test image's score, so results can be re-analysed without re-running."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "defect_type", "label", "image_score"])
        for sample, value in zip(test.samples, image_scores):
            writer.writerow([sample.path.relative_to(test.category_dir).as_posix(),
                             sample.defect_type, sample.label, f"{float(value):.9g}"])


def write_figures(config: RunConfig, figures: FigureQueue, category: str, test: MVTecCategory,
                  scores: Scores, metrics: dict, explainer: Explainer | None = None) -> None:
    out = config.result_dir
    figures.submit(plot_score_distribution, test.labels, scores.image_scores,
                   out / "pred_dist" / f"{category}.png",
                   f"{category}: image scores ({config.method})")
    if config.plots <= 0:
        return
    maps = scores.maps
    # Segmentation threshold: pixel F1-optimal when masks exist, else the image-level one.
    threshold = metrics["pixel_threshold"] or metrics["image_threshold"] or float(np.max(maps))
    value_range = (float(maps.min()), float(maps.max()))
    shown: dict[str, int] = {}
    named: set[str] = set()  # 000.png beside 000.jpg, or folders a-b/ and a/b/: one name each
    for index, sample in enumerate(test.samples):
        if shown.get(sample.defect_type, 0) >= config.plots:
            continue
        shown[sample.defect_type] = shown.get(sample.defect_type, 0) + 1
        image, mask = test.load(index)
        # named by its folder below test/, not its type: good/day1/000 and good/day2/000 differ
        folder = sample.path.parent.relative_to(test.category_dir / "test").as_posix()
        name = numbered_apart(f"{folder.replace('/', '-')}_{sample.path.stem}", named) + ".png"
        figures.submit(plot_localization, image, mask if test.has_masks else None, maps[index],
                       threshold, value_range, out / "localization" / category / name,
                       f"{category}/{folder}/{sample.path.name}  "
                       f"score {scores.image_scores[index]:.3f}",
                       extra_panels=explainer.panels(image) if explainer else ())


# -- the run ----------------------------------------------------------------------------------

class Run:
    """Every category of one configuration; outputs are written as each category finishes.

    With a process ``group`` (torchrun), the work is spread by the data, never by the number of
    processes, so the same flags give the same memory banks and metrics for any number of them:
    - at least as many categories as processes: whole categories go round-robin, each fitted and
      scored by one process, which also writes its figures, scores and model file;
    - fewer: the processes work on each category together (``fit``: coreset shards round-robin;
      ``score_together``: contiguous blocks of whole batches), and rank 0 evaluates and writes.
    Rank 0 gathers every category's metrics and ROC curves and writes metrics.json, results.md
    and roc_curve.png; with several machines the result folder must be one they share.
    """

    def __init__(self, config: RunConfig, extractor: FeatureExtractor | None = None,
                 group: Group | None = None, layers: tuple[str, ...] | None = None):
        """``extractor``: one already built (a sweep's later points); else it is built here,
        tapping ``layers`` when it must serve more configurations than this one."""
        start = time.perf_counter()
        # (result_dir was checked writable when the config was resolved)
        self.config, self.group = config, group or Group.single()
        check_data(config)
        configure_torch(config)
        self.extractor = extractor or build_extractor(config, layers)
        if config.verbose and extractor is None and self.group.is_main:  # once in a sweep
            log.info("%s", self.extractor.summary(config.crop))
        self.report = Report(config.result_dir, config.method, config.backbone,
                             {**config.record(), "weights_id": self.extractor.weights_id},
                             environment(config.device, config.weights))
        self.curves: dict[str, dict] = {}
        # The background redraw of roc_curve.png in flight, and how many categories it holds.
        self.roc_job: tuple[Future | None, int] = (None, 0)
        self.decoding = DecodeAhead({}, 0)  # started by ``all``
        # A setting the backbone cannot serve (PaDiM's dims) fails here, before any data is read
        # and before an earlier run is moved, not at the first category's fit.
        config.method_class.from_config(self.extractor, config, config.device)
        self.lock = hold_result_dir(config.result_dir, self.group)  # released by ``all``
        try:
            # --resume: the categories the earlier run finished, (metrics, curves), kept as is
            found = self._finished_earlier() if config.resume else None
            self.kept: dict[str, tuple[dict, dict]] = found or {}
            # last, so that a setting error moves nothing; resumed, nothing moves, unless there
            # was no run to resume (a sweep's comparison, say, would be overwritten)
            if self.group.is_main and found is None:
                move_earlier_run(config.result_dir)
            self.group.barrier()  # no process writes before an earlier run is out of the way
        except BaseException:
            self.lock.release()
            raise
        # Seconds outside any category (backbone load, final wait for figures): with the
        # categories' stages they add up to the run's wall time.
        self.report.payload["run_timings"] = {"setup": time.perf_counter() - start}

    def _finished_earlier(self) -> dict[str, tuple[dict, dict]] | None:
        """``finished_categories`` of the earlier run in the result folder (None: there is none),
        read by rank 0, which says so once, and sent to the others, with its refusal if any."""
        return decided_by_main(self.group, lambda: finished_categories(
            self.config.result_dir, self.report.payload["config"],
            self.report.payload["environment"], self.config.categories,
            {**RunConfig().record(), "method_settings": self.config.method_class.defaults()}))

    def category(self, category: str, figures: FigureQueue, group: Group | None = None,
                 categories_at_once: int = 1) -> tuple[dict, dict] | None:
        """(metrics, ROC curves) of one category, computed by the processes of ``group``
        together, while other processes compute others (``categories_at_once`` in all); None on
        every process but the group's rank 0, which writes its outputs."""
        config, group = self.config, group or Group.single()
        start = time.perf_counter()                         # 0. the data
        if group.distributed:  # one process fetches a missing category, the others wait
            decided_by_main(group, lambda: ensure_category(
                config.data_root, category, download=config.download, mirror=config.mirror,
                progress=config.progress))
        # decoding ahead's datasets when every image of them is cached: not listed again, and
        # the loader need not check the cache again to choose threads over processes
        data = load_category(config, category, self.decoding.wait(category),
                             quiet=not group.is_main)  # every process reads it: one says so
        seed_everything(config.seed)
        data_seconds = time.perf_counter() - start

        start = time.perf_counter()                         # 1. memory of normal features
        model = fit(config, self.extractor, data.train, group, categories_at_once)
        fit_seconds = time.perf_counter() - start

        start = time.perf_counter()                         # 2. every test image and pixel
        scores = score_together(config, model, data.test, group, "score test")
        test_seconds = time.perf_counter() - start
        if not group.is_main:
            return None

        start = time.perf_counter()                         # 3. metrics
        metrics, curves = evaluate(data.test, scores, config.device)
        metrics["calibration"] = calibrate(config, model, data.calibration, data.test.labels,
                                           scores.image_scores)
        if model.approximate_search:  # what the approximate index loses, measured
            first = next(iter(image_batches(config, data.test, "recall")))
            metrics["knn"] = model.search_quality(first.images.to(model.device))
        timings = {"data": data_seconds, **model.timings, "fit": fit_seconds,
                   "test": test_seconds, "metrics": time.perf_counter() - start}
        metrics.update(fit_seconds=fit_seconds, test_seconds=test_seconds,
                       n_train=len(data.train), n_test=len(data.test),
                       memory=model.memory_summary(), data_fingerprint=data.fingerprint,
                       data_source=data.source,
                       test_images_per_second=len(data.test) / test_seconds, timings=timings)

        start = time.perf_counter()                         # 4. outputs (figures queued)
        write_figures(config, figures, category, data.test, scores, metrics,
                      Explainer(model, data.train) if config.explain else None)
        timings["plots"] = time.perf_counter() - start
        start = time.perf_counter()
        write_scores(config.result_dir / "scores" / f"{category}.csv", data.test,
                     scores.image_scores)
        write_roc(config.result_dir / "roc" / f"{category}.json", curves)
        if config.save_maps:
            write_evaluation_maps(config.result_dir / "anomaly_maps" / category, data.test,
                                  scores.maps)
        if config.save_models:
            save_model(config.result_dir / "models" / f"{category}.pt", model, config.method,
                       category, weights=config.weights,
                       preprocessing=dict(resize=config.resize, crop=config.crop,
                                          resample=config.resample),
                       thresholds=decision_thresholds(metrics, scores.maps))
        timings["write"] = time.perf_counter() - start  # metrics.json: timed in the report
        return metrics, curves

    def _finished(self, category: str, metrics: dict, curves: dict, figures: FigureQueue,
                  on_category) -> None:
        """Rank 0: record a finished category, and with background figures redraw the ROC figure
        with it unless a redraw is still running (one at a time, so the last to write the file
        holds the most categories; a later category's redraw, or ``_draw_roc``, catches up)."""
        start = time.perf_counter()
        self.curves[category] = curves
        job, _ = self.roc_job
        if figures.background and (job is None or job.done()):
            self.roc_job = (figures.submit(plot_roc_curves, dict(self.curves),
                                           self.config.result_dir / "roc_curve.png",
                                           roc_title(self.config)), len(self.curves))
        metrics["timings"]["report"] = time.perf_counter() - start  # + the write below
        self.report.add(category, metrics)
        if on_category:
            on_category(category, metrics)

    def _rounds(self):
        """Lists of (category, group that computes it): one category per process per round when
        there are at least as many categories as processes, else each category by all."""
        categories = [c for c in self.config.categories if c not in self.kept]
        group = self.group
        if group.distributed and len(categories) >= group.world:
            for start in range(0, len(categories), group.world):
                yield [(category, Group.single() if i == group.rank else None)
                       for i, category in enumerate(categories[start:start + group.world])]
        else:
            for category in categories:
                yield [(category, group)]

    def _decode_ahead(self) -> DecodeAhead:
        """Start decoding, in run order, the categories this process computes alone and that are
        on disk already (a category still to download is decoded when it is loaded; categories
        computed by all processes together are read by their loaders as before)."""
        config, splits = self.config, {}
        if config.decode_ahead and config.cache_dir is not None:
            alone = [category for round_ in self._rounds() for category, group in round_
                     if group is not None and not group.distributed]
            for category in alone:
                folder = Path(config.data_root) / category
                if is_category_present(folder):
                    # bad images are the normal load's to skip or report, not this pool's
                    splits[category] = category_splits(config, folder, skip_bad_images=False)
        return DecodeAhead(splits, config.decode_ahead)

    def all(self, on_category: Callable[[str, dict], None] | None = None) -> dict:
        """Every category in turn; returns the report (what metrics.json holds). On an error or
        Ctrl-C the finished categories stay written, and so do their queued figures."""
        # around the clean-up too: a full disk fails the last ROC drawing as well
        with self.lock, full_disk_as_error(self.config.result_dir, " with {resume}"):
            return self._all(on_category)

    def _all(self, on_category: Callable[[str, dict], None] | None) -> dict:
        figures = FigureQueue(self.config.plot_workers)
        start = time.perf_counter()
        self.decoding = self._decode_ahead()
        self.report.payload["run_timings"]["decode_ahead_start"] = time.perf_counter() - start
        try:
            if self.group.is_main:
                for category, (metrics, curves) in self.kept.items():
                    self._finished(category, metrics, curves, figures, on_category)
            for round_ in self._rounds():
                # another process's category has no group here
                results = [(category, _outcome(lambda: self.category(category, figures, group,
                                                                     len(round_))))
                           for category, group in round_ if group is not None]
                # gathered with several processes, also for one category shared by all: rank 0
                # alone went on to write it, and an error there must stop the others too, not
                # leave them waiting in the next category
                gathered = [item for part in self.group.all_gather(results) for item in part] \
                    if self.group.distributed else results
                # the round's finished categories are written before its error is raised: one
                # process's bad image must not cost the categories the others finished
                for category, _ in round_:
                    result = next((r for c, r in gathered if c == category and r is not None),
                                  None)
                    if self.group.is_main and isinstance(result, tuple):
                        self._finished(category, *result, figures, on_category)
                raise_the_first_error([r for _, r in gathered])
            start, background = time.perf_counter(), figures.background
            figures.close()  # every figure written, and the drawing processes ended
            self._draw_roc()
            if self.group.is_main:
                if background:
                    log.info("figures: %.2f s waiting for %d drawing processes",
                             time.perf_counter() - start, self.config.plot_workers)
                self.report.payload["run_timings"]["figures_wait"] = time.perf_counter() - start
                self.report.write()
        except KeyboardInterrupt:
            finish_after_interrupt(figures)
            raise
        finally:
            figures.close()
            self._draw_roc()  # after an error or Ctrl-C too: the finished categories' curves
            self.decoding.close()
        return self.report.payload

    def _draw_roc(self) -> None:
        """roc_curve.png with every finished category, here and now, unless the last background
        redraw (finished: called after the figures are waited for) already holds them all. With
        figures drawn in turn this is the run's only ROC drawing: redrawing it after every
        category would cost the sum of ever larger figures."""
        job, holds = self.roc_job
        if not self.curves or (job is not None and job.done() and not job.cancelled()
                               and job.exception() is None and holds == len(self.curves)):
            return
        plot_roc_curves(self.curves, self.config.result_dir / "roc_curve.png",
                        roc_title(self.config))
        drawn = Future()  # a finished job holding every category: the next call draws nothing
        drawn.set_result(None)
        self.roc_job = (drawn, len(self.curves))


def finish_after_interrupt(figures: FigureQueue) -> None:
    """After Ctrl-C or SIGTERM: draw the finished categories' figures still queued, which
    ``--resume`` would keep missing (the drawing keeps pace with the categories, so it is
    seconds), unless the run is interrupted again. A figure or a drawing process that fails
    (killed on its own: a signal to the whole process group is held there, see
    ``utils.processes.interrupts_held``) drops the rest; the interrupt stays what the run
    reports."""
    if left := figures.undrawn():
        log.info("drawing the %s still queued before stopping (interrupt again to drop them)",
                 counted(left, "figure"))
    try:
        figures.close()
    except BaseException:
        figures.close(cancel=True)


def done_together(group: Group, work: Callable[[], object]) -> list:
    """Every process's ``work()``, in rank order, on every process; a ``UserError`` raised in any
    is raised by every process (printed once). Raised in one alone, as an unreadable image in its
    block of a category that all share, it used to leave the others waiting in the gather until
    the job was torn down around them, each with a traceback."""
    answers = group.all_gather(_outcome(work))
    raise_the_first_error(answers)
    return answers


def decided_by_main(group: Group, work: Callable[[], object]):
    """``work()`` done by rank 0 alone and its answer sent to every process; a ``UserError`` it
    raises is raised by every process (printed once), so none waits for the others forever."""
    answer = group.broadcast(_outcome(work) if group.is_main else None)
    raise_the_first_error([answer])
    return answer


def _outcome(work: Callable[[], object]):
    """``work()``'s answer, or the ``UserError`` it raised: either is sent to the other
    processes, which raise the error with this one (``raise_the_first_error``)."""
    try:
        return work()
    except UserError as error:
        return error


def raise_the_first_error(answers: list) -> None:
    """Raise the first ``UserError`` among what every process received alike: every process
    raises it, so it is marked to be printed once (by rank 0)."""
    failed = next((a for a in answers if isinstance(a, UserError)), None)
    if failed is not None:
        failed.shared = True
        raise failed


def hold_result_dir(folder: Path, group: Group, name: str = ".run.lock") -> FolderLock:
    """``folder`` held for this run (``FolderLock``) by rank 0, which writes it; when another run
    holds it, every process raises the same one-line error."""
    lock = FolderLock(folder, name)

    def hold() -> None:
        try:
            lock.hold()
        except FolderInUse as held:
            raise SettingError("result_dir", folder, f"is in use by another run ({held.holder}); "
                               "wait for it to end, or give another {result_dir}") from None

    decided_by_main(group, hold)
    return lock


def run(config: RunConfig, on_category: Callable[[str, dict], None] | None = None,
        group: Group | None = None) -> dict:
    """Fit, score, evaluate and write every category of ``config``; returns the report (on rank 0
    of a process group; the others return an empty one)."""
    return Run(config, group=group).all(on_category)


def run_sweep(points: list[SweepPoint], result_dir: Path | str | None = None,
              on_category: Callable[[SweepPoint, str, dict], None] | None = None,
              group: Group | None = None) -> dict | None:
    """Every (configuration, seed) of a sweep (``config.resolve_sweep``), each into its own
    folder with its usual outputs; then the comparison at ``result_dir`` (default: the folder
    the points were resolved for): results.md and summary.json (``utils.sweep_report``) and
    roc_curve.png with each configuration's mean ROC.
    The backbone is loaded once: the points differ only in method settings and seed. With a
    process group the points go round-robin over the processes and rank 0 writes the comparison
    (returned there; None elsewhere)."""
    group = group or Group.single()
    result_dir = points[0].sweep_dir if result_dir is None else user_path(result_dir)
    if group.is_main:
        check_writable(result_dir)
    with hold_result_dir(result_dir, group):
        return _run_sweep(points, result_dir, on_category, group)


def _run_sweep(points: list[SweepPoint], result_dir: Path,
               on_category: Callable[[SweepPoint, str, dict], None] | None,
               group: Group) -> dict | None:
    first = points[0].config
    if group.is_main:
        # resumed, each configuration's run keeps what it finished; an earlier plain run (no
        # summary.json) is not a sweep to resume, and its results.md would be overwritten
        if not first.resume or not (result_dir / "summary.json").exists():
            move_earlier_run(result_dir)
    group.barrier()
    extractor, runs, layers = None, [], stages_of(points)
    for number, point in enumerate(points):
        if number % group.world != group.rank:
            continue
        run_ = Run(point.config, extractor, layers=layers)
        extractor = run_.extractor
        report = run_.all(None if on_category is None else
                          lambda category, metrics, point=point: on_category(point, category,
                                                                             metrics))
        runs.append({"number": number, "label": point.label, "seed": point.seed,
                     "report": report, "settings": point.config.method_settings,
                     "result_dir": point.config.result_dir, "curves": dict(run_.curves)})
        if not group.distributed:  # after every point: nothing finished is lost
            sweep_report.write(result_dir, sweep_report.summarize(
                first.method, first.backbone, [{k: v for k, v in r.items() if k != "curves"}
                                               for r in runs]))
    runs = sorted((r for part in group.all_gather(runs) for r in part),
                  key=lambda r: r["number"])
    if not group.is_main:
        return None
    curves: dict[str, list] = {}
    for r in runs:
        curves.setdefault(r["label"], []).append(r.pop("curves"))
        r.pop("number")
    summary = sweep_report.summarize(first.method, first.backbone, runs)
    sweep_report.write(result_dir, summary)
    plot_roc_curves({label: sweep_report.mean_curves(sets) for label, sets in curves.items()},
                    result_dir / "roc_curve.png", f"{roc_title(first)}: mean ROC per setting")
    return summary


# -- predict ----------------------------------------------------------------------------------

def predict(config: RunConfig, group: Group | None = None) -> dict:
    """Score new images with a saved model: predictions.csv and one overlay per image. Returns
    a summary (category, method, backbone, counts, the csv's path). With a process group (torchrun)
    rank 0 predicts alone and every process returns its summary: each process used to predict
    every image into the same folder, and the second to take the folder's lock stopped the job."""
    return decided_by_main(group or Group.single(), lambda: _predict(config))


def _predict(config: RunConfig) -> dict:
    configure_torch(config)
    model, saved = load_model(config.model, METHODS, config.weights, config.device,
                              precision=config.precision, backbone=config.backbone)
    shaped(model, config)
    prep = saved["preprocessing"]
    paths = collect_images(config.predict)
    names = overlay_names(paths)
    skipped = []

    def skip(index: int, error: UserError) -> None:
        log.warning("skipping %s: %s", paths[index], skip_reason(error))
        skipped.append(index)

    # One batch at a time, from decode to overlay: each image is decoded once (its overlay is
    # drawn from the batch), and memory holds one batch's maps, not the folder's.
    batches = image_batches(config, ImageFiles(paths, **prep), "predict",
                            on_failed=skip if config.skip_bad_images else None)
    thresholds = saved["thresholds"]
    threshold = thresholds["image"]
    out = config.result_dir
    # its own lock: predicting beside a run that is still fitting touches none of its files
    with hold_result_dir(out, Group.single(), ".predict.lock"):
        move_earlier_run(out, predictions_only=True)
        n_flagged = n_written = 0
        with full_disk_as_error(out), open(out / "predictions.csv", "w", newline="") as file, \
                partial_predictions_said(lambda: n_written):
            writer = csv.writer(file)
            writer.writerow(["path", "image_score", "threshold", "threshold_source", "anomalous",
                             "overlay"])
            for batch, image_scores, maps in predicted_batches(model, batches, config.plots > 0):
                for position, index in enumerate(batch.indices.tolist()):
                    path, value = paths[index], float(image_scores[position])
                    decision = "" if threshold is None else int(value >= threshold)
                    n_flagged += decision == 1
                    overlay = ""
                    if maps is not None:
                        overlay = out / "predictions" / f"{names[index]}.png"
                        verdict = "" if threshold is None else \
                            ("ANOMALOUS" if decision else "normal")
                        write_overlay(batch.images[position].permute(1, 2, 0).numpy(),
                                      maps[position], tuple(thresholds["map_range"]), overlay,
                                      f"{path.name}  score {value:.3f}  {verdict}")
                    writer.writerow([str(path), f"{value:.9g}",
                                     "" if threshold is None else f"{threshold:.9g}",
                                     thresholds["image_source"] or "", decision, str(overlay)])
                    n_written += 1
        if len(skipped) == len(paths):
            none = ("the image to predict could not" if len(paths) == 1 else
                    f"none of the {len(paths)} images to predict could")
            raise DataError(f"{none} be read (named above); give readable PNG, JPEG, BMP, TIFF "
                            "or WebP files")
        return {"category": saved["category"], "method": saved["method"],
                "backbone": saved["backbone"], "n_images": len(paths) - len(skipped),
                "n_flagged": None if threshold is None else n_flagged,
                "threshold": threshold, "csv": out / "predictions.csv"}


@contextmanager
def partial_predictions_said(n_written: Callable[[], int]):
    """An image that stops ``--predict`` (unreadable, without --skip-bad-images) leaves the rows
    scored before it in predictions.csv: its error says so, so the csv is not taken for all."""
    try:
        yield
    except DataError as error:
        n = n_written()
        held = {0: "no image", 1: "only the 1 image"}.get(n, f"only the {n} images")
        raise DataError(f"{error.template}; predictions.csv holds {held} scored before it") \
            from None


def overlay_names(paths: list[Path]) -> list[str]:
    """Each input's overlay below predictions/, without ``.png``: its path below the folder all
    inputs share, so a folder's sub-folders stay apart as they were (test/good/000.png and
    test/crack/000.png: good/000, crack/000), and no two inputs share one (``names_apart``)."""
    absolute = [path.absolute() for path in paths]
    root = os.path.commonpath([path.parent for path in absolute]) if paths else ""
    return names_apart(absolute, Path(root))


# -- estimate ---------------------------------------------------------------------------------

def estimate(points: list[SweepPoint]) -> list[tuple[str, dict]]:
    """(configuration label, row) for every configuration of ``points`` and category: what
    fitting it will take, before doing it (``--dry-run``; ``estimate_fit``). Seeds of one
    configuration are one fit's size, so each configuration is estimated once, and one backbone,
    tapping every configuration's stages, serves them all."""
    first = points[0].config
    check_data(first)
    configure_torch(first)
    extractor = build_extractor(first, stages_of(points))
    configurations: dict[str, RunConfig] = {}
    for point in points:
        configurations.setdefault(point.label, point.config)
    # the configurations differ only in method settings: each category's data is read once
    data = {category: load_category(first, category, quiet=not launched_as_main())
            for category in first.categories}
    return [(label, estimate_fit(config, extractor, category, data[category]))
            for label, config in configurations.items() for category in config.categories]


def estimate_fit(config: RunConfig, extractor: FeatureExtractor, category: str,
                 data: CategoryData) -> dict:
    """What fitting and testing ``category`` will take, before doing it (``--dry-run``). A method
    whose fit is not sharded gives its own (``AnomalyModel.estimate``). For a sharded,
    PatchCore-like fit: its memory (``fit_memory``: the largest blocks it holds; the process
    itself, torch, the backbone and the test split's maps, comes on top) and its fit and test
    time, from probes on this machine (one batch through the backbone and the patch embedding;
    the greedy coreset on random patches, see ``greedy_seconds``; the bank's search, see
    ``search_seconds``). Fit time: N x the probe's seconds per image, plus the greedy on every
    shard. Test time: the test images through the backbone, plus every test patch searched in a
    bank of the size the fit keeps (not estimated for the approximate indexes, whose cost
    depends on the data)."""
    model = config.method_class.from_config(extractor, config, config.device)
    n, probe = len(data.train), next(iter(image_batches(config, data.train, "probe")))
    probe = probe.images.to(config.device)
    if not config.method_class.sharded_fit:  # the method's own estimate
        row = model.estimate(n, len(data.test), probe)
        return {"category": category, "n_train": n, "n_test": len(data.test), **(row or {}),
                "estimate": row and "from probes on this machine"}
    plan = model.fit_plan(n, config.crop)
    model.embed(probe)  # warm-up
    embed_per_image = timed(config.device, model.embed, probe) / len(probe)
    seconds = greedy_seconds(model.sampler(), model.embed_dim, plan["shard_rows"], config.device)
    greedy = (plan["shards"] - 1) * seconds(plan["shard_rows"]) + seconds(plan["last_rows"])
    queries = len(data.test) * plan["per_image"]
    test = None if model.approximate_search else \
        len(data.test) * embed_per_image + queries * plan["bank_rows"] * search_seconds(model)
    return {"category": category, "n_train": n, "patches": n * plan["per_image"],
            "shards": plan["shards"], "memory_bytes": model.fit_memory(n, config.crop),
            "fit_seconds": n * embed_per_image + greedy, "n_test": len(data.test),
            "bank_patches": plan["bank_rows"], "test_seconds": test,
            "estimate": "from probes on this machine"}


SEARCH_PROBE = (2_048, 16_384)  # random queries and bank rows of the timed search


def search_seconds(model) -> float:
    """Seconds per (query x bank row) of ``model``'s exact or float16 search: the median of three
    timed searches of random queries in a random bank (a matrix product's time does not depend on
    the values, and both searches are products over every query and bank row, so it scales with
    their product; a single timing varied too much from run to run on a shared machine)."""
    queries, rows = SEARCH_PROBE
    knn = NearestNeighbours(model.device, index=model.knn_index)
    knn.fit(torch.randn(rows, model.embed_dim, device=model.device))
    probe = torch.randn(queries, model.embed_dim, device=model.device)
    knn.search(probe[:256], model.k)  # warm-up: threads, kernels
    timings = sorted(timed(model.device, knn.search, probe, model.k) for _ in range(3))
    return timings[1] / (queries * rows)


GREEDY_PROBES = (10_000, 40_000)  # random patches per timed run of the sampler


def greedy_seconds(sampler, dim: int, rows: int, device) -> Callable[[int], float]:
    """Seconds ``sampler`` will take on n patches, from timed runs on random ones: a greedy makes
    fraction x n picks, each costing a + b x n (a: per-pick work of fixed size, such as the
    candidates order's 1,024-row product; b: the part that grows with the patches, the eager
    loop's pass over all of them or an update's products). Two probe sizes give a and b (on
    ``rows`` patches when fewer than the larger probe; with no more than the smaller, one run on
    ``rows`` patches is the answer itself)."""
    sizes = sorted({min(rows, size) for size in GREEDY_PROBES})
    sampler.run(torch.randn(sizes[0], dim, device=device))  # warm-up: threads, graphs, kernels
    per_pick = cost_line(sizes, [timed(device, sampler.run, torch.randn(size, dim, device=device))
                                 / sampler.picks(size) for size in sizes])
    return lambda n: sampler.picks(n) * per_pick(n)

"""Figures: ROC curves of all categories, score distributions, localization panels."""
from __future__ import annotations

import atexit
import functools
import gc
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils.files import atomic_output  # noqa: E402
from utils.processes import end_with_parent, interrupts_held  # noqa: E402
from utils.report import mean_of_defined  # noqa: E402


class FigureQueue:
    """Draws figures in background processes, or at once when ``workers`` is 0.

    A matplotlib figure costs CPU time of the order of a GPU's whole work on a category
    (benchmarks/RESULTS.md), so with a GPU they are drawn while it works on the next category.
    ``submit`` takes a module-level plotting function of this file and its (picklable) arguments,
    and returns the figure's future (None when drawn at once); ``wait`` blocks until every figure
    is written and re-raises the first failure. Workers are spawned, not forked: the parent holds
    CUDA and thread pools.
    """

    def __init__(self, workers: int = 0):
        self.pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_drawing_process,
                                         initargs=(os.getpid(),))
                     if workers > 0 else None)
        self.pending: list[Future] = []

    @property
    def background(self) -> bool:
        return self.pool is not None

    def submit(self, function, *args, **kwargs) -> Future | None:
        if self.pool is None:
            function(*args, **kwargs)
            return None
        with interrupts_held():  # a submit may start a drawing process
            future = self.pool.submit(function, *args, **kwargs)
        self.pending.append(future)
        return future

    def wait(self) -> None:
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()

    def undrawn(self) -> int:
        """How many queued figures are not written yet."""
        return sum(not future.done() for future in self.pending)

    def close(self, cancel: bool = False) -> None:
        """Write what is queued (or, with ``cancel``, drop what has not started) and stop."""
        if self.pool is not None:
            if not cancel:
                self.wait()
            self.pool.shutdown(wait=True, cancel_futures=cancel)
            self.pool = None


def _start_drawing_process(parent: int) -> None:
    """In a drawing process: end it, when the pool shuts down, before the interpreter's teardown.
    A spawned process imports the parent's main module, torch and all, and tearing that down took
    about a second that the run waited for at its end (benchmarks/RESULTS.md). Its figures are
    written and closed by then, and the last atexit handler registered runs first. And end it
    with the run, however that ends."""
    atexit.register(os._exit, 0)
    end_with_parent(parent)


def _collector_paused(draw):
    """``draw`` with Python's cyclic garbage collector paused while it runs. A figure is
    thousands of linked objects, alive until it is saved and closed; allocating them triggers the
    collector again and again, and each pass walks them -- a full pass every object of the
    process, torch's hundreds of thousands in the main one -- though none is garbage yet. Paused,
    the closed figure is freed by the next collection as young garbage (no growth: a test checks;
    timings: benchmarks/RESULTS.md)."""
    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        if not gc.isenabled():
            return draw(*args, **kwargs)
        gc.disable()
        try:
            return draw(*args, **kwargs)
        finally:
            gc.enable()
    return drawn


def _plain_text(draw):
    """``draw`` with matplotlib's mathtext off: titles and legends carry folder names, and a
    ``$`` pair in one (a custom category ``w$\\q$``) was parsed as TeX, which stopped the run
    with matplotlib's traceback (or set the name in math italics)."""
    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        with plt.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)
    return drawn


def _save(fig, path: Path, tight: bool = True) -> None:
    """Write ``fig`` as a PNG and close it. ``tight`` crops it to what is drawn, which draws the
    figure twice (once to measure); a figure with a fixed layout passes False. zlib level 1: the
    default level took about as long as the drawing itself, for files hardly smaller
    (benchmarks/RESULTS.md)."""
    with atomic_output(path) as temporary:  # a reader never sees a half-written figure
        fig.savefig(temporary, dpi=100, bbox_inches="tight" if tight else None,
                    pil_kwargs={"compress_level": 1})
    plt.close(fig)


@_collector_paused
@_plain_text
def plot_roc_curves(curves: dict[str, dict], path: Path, title: str) -> None:
    """curves: category -> {"image": (fpr, tpr, auroc) | None, "pixel": (fpr, tpr, auroc) | None}."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    for ax, level in zip(axes, ("image", "pixel")):
        aucs = []
        for index, (category, curve) in enumerate(curves.items()):
            if curve.get(level) is None:
                continue
            fpr, tpr, auc = curve[level]
            aucs.append(auc)
            # one look per category on both panels (a category without masks shifted the pixel
            # panel's colours); the ten colours of the cycle, dashed for the next ten categories
            ax.plot(fpr, tpr, color=f"C{index % 10}", linestyle=("-", "--", ":")[index // 10 % 3],
                    label=f"{category}: {auc:.3f}")
        mean = mean_of_defined(aucs)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"{level} ROCAUC: {mean:.3f}" if mean is not None else f"{level}: not defined")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        if aucs:
            ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    _save(fig, Path(path))


@_collector_paused
@_plain_text
def plot_score_distribution(labels: np.ndarray, scores: np.ndarray, path: Path, title: str) -> None:
    # The bins before the figure: with no scores this raises while no figure is open.
    bins = np.linspace(float(np.min(scores)), float(np.max(scores)) + 1e-12, 40)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, name, color in ((0, "good", "tab:green"), (1, "defective", "tab:red")):
        if np.any(labels == label):
            ax.hist(scores[labels == label], bins=bins, alpha=0.6, label=name, color=color)
    ax.set_xlabel("image anomaly score")
    ax.set_ylabel("test images")
    ax.set_title(title)
    ax.legend()
    _save(fig, Path(path))


@_collector_paused
@_plain_text
def plot_localization(image: np.ndarray, mask: np.ndarray | None, anomaly_map: np.ndarray,
                      threshold: float, value_range: tuple[float, float], path: Path,
                      title: str, extra_panels: list[tuple[str, np.ndarray]] = ()) -> None:
    """Image | ground truth | heat-map overlay | predicted segmentation (| extra panels)."""
    low, high = value_range
    heat = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0, 1)
    panels = 4 + len(extra_panels)
    # A fixed layout, in inches at 100 dpi: panels of 224 px (the default crop shown pixel for
    # pixel), the margins and gaps a tight crop would leave, room above for two lines of titles
    # (10 pt: the longest panel title fits its panel). The figure is then drawn once; a tight
    # crop measures it with a first drawing. Axes are made without ticks: ``axis("off")`` alone
    # hides them, yet they are still laid out.
    side, gap, margin, top = 2.24, 0.15, 0.08, 0.55
    width, height = 2 * margin + panels * side + (panels - 1) * gap, margin + side + top
    fig, axes = plt.subplots(1, panels, figsize=(width, height),
                             subplot_kw={"xticks": [], "yticks": []},
                             gridspec_kw={"left": margin / width, "right": 1 - margin / width,
                                          "bottom": margin / height, "top": 1 - top / height,
                                          "wspace": gap / side})
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(mask if mask is not None else np.zeros(image.shape[:2]), cmap="gray",
                   vmin=0, vmax=1)
    axes[1].set_title("ground truth" if mask is not None else "no mask")
    axes[2].imshow(image)
    axes[2].imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[2].set_title("anomaly map")
    segmentation = anomaly_map >= threshold
    axes[3].imshow(image)
    if min(segmentation.shape) >= 2:  # matplotlib traces outlines on a 2 x 2 grid at least
        axes[3].contour(segmentation, levels=[0.5], colors="red", linewidths=1.2)
    else:
        axes[3].imshow(segmentation, cmap="Reds", alpha=0.5, vmin=0, vmax=1)
    axes[3].set_title("predicted region")
    for ax, (name, panel) in zip(axes[4:], extra_panels):
        ax.imshow(panel)
        ax.set_title(name)
    for ax in axes:
        ax.axis("off")
        ax.title.set_fontsize(10)
    fig.suptitle(title, fontsize=9)
    _save(fig, Path(path), tight=False)


@functools.lru_cache(maxsize=1)
def _caption_font():
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" /
                                  "DejaVuSans.ttf"), 13)


def _caption_bar(caption: str, width: int) -> np.ndarray:
    """A white 22-px bar with ``caption`` in black, drawn by PIL in matplotlib's DejaVu Sans:
    OpenCV's own fonts have ASCII only, and wrote "d??faut.png" for a file named "défaut.png"
    (DejaVu has the Latin, Greek and Cyrillic letters; others show as boxes)."""
    from PIL import Image, ImageDraw

    bar = Image.new("RGB", (width, 22), "white")
    ImageDraw.Draw(bar).text((4, 3), caption, fill="black", font=_caption_font())
    return np.asarray(bar)


def write_overlay(image: np.ndarray, anomaly_map: np.ndarray, value_range: tuple[float, float],
                  path: Path, caption: str) -> None:
    """Image with its heat map blended on top and a one-line caption (OpenCV: one per predicted
    image, so no matplotlib figure per file). The colour scale is fixed by ``value_range`` so that
    overlays of different images compare."""
    import cv2

    low, high = value_range
    heat = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0, 1)
    if image.shape[0] < 256:  # small crops: enlarge so that the caption fits and details show
        scale = 256 / image.shape[0]
        size = (round(image.shape[1] * scale), 256)
        image = cv2.resize(image, size, interpolation=cv2.INTER_NEAREST)
        heat = cv2.resize(heat.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    bgr = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
    blended = cv2.addWeighted(bgr, 0.5, colour, 0.5, 0)
    canvas = np.concatenate([bgr, blended], axis=1)
    bar = _caption_bar(caption, canvas.shape[1])
    # encoded here and written by Python: cv2.imwrite answers a full disk with False, not an error
    encoded = cv2.imencode(".png", np.concatenate([bar, canvas], axis=0))[1]
    with atomic_output(path) as temporary:
        temporary.write_bytes(encoded.tobytes())

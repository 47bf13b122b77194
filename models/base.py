"""What every method shares: settings, construction from a run configuration, batch scoring.

A method is a plain ``torch.nn.Module`` whose memory of normal images lives in registered buffers.
It owns everything that is its own:
- ``settings``: the hyperparameters a run may set, each with its flag; the default of each is the
  constructor's default (one place), and ``from_config`` builds the model from a ``RunConfig``;
- ``layers``, ``resample`` (its reference code's image filter), ``min_train_images``;
- ``fit(batches)``, which sees only normal training images and raises ``SettingError`` for a
  setting its data cannot support (``k`` larger than the memory);
- ``predict(images)``: finished predictions -- image scores and full-size anomaly maps. Each method
  writes ``score_patches`` (image scores and the score grid); the rescale + blur of the grid into
  a map is ``utils.anomaly_map``, shared by all.
Batches that run out of GPU memory are split here, for every method.
"""
from __future__ import annotations

import inspect
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn

from models.backbone import FeatureExtractor, stage_names
from utils.anomaly_map import anomaly_map
from utils.errors import SettingError, UserError
from utils.report import counted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    """A hyperparameter of a method: ``name`` is its constructor keyword and config key, ``flag``
    its command-line option; its default is the constructor's."""
    name: str
    flag: str
    parse: Callable[[str], Any]
    help: str


class Prediction(NamedTuple):
    image_scores: torch.Tensor        # [B] float32
    anomaly_maps: torch.Tensor | None  # [B, H, W] float32 at the input's size (None if not asked)


def synchronize(device: torch.device | str) -> None:
    """Wait for a GPU's queued work, so that a wall-clock timing includes it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, function, *args) -> float:
    """Wall seconds of ``function(*args)``, the work it queued on ``device`` included."""
    synchronize(device)
    start = time.perf_counter()
    function(*args)
    synchronize(device)
    return time.perf_counter() - start


def cost_line(sizes: list[int], seconds: list[float]) -> Callable[[float], float]:
    """The cost a + b x n through timings at one size (then constant) or two, for estimates:
    neither part below 0, which timing noise at small sizes could otherwise make it."""
    if len(sizes) == 1:
        return lambda n: seconds[0]
    growth = max(0.0, (seconds[1] - seconds[0]) / (sizes[1] - sizes[0]))
    fixed = max(0.0, seconds[0] - growth * sizes[0])
    return lambda n: fixed + growth * n


def padded(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """``images`` with the last one repeated up to ``size`` (None: unchanged)."""
    if size is None or len(images) >= size:
        return images
    return torch.cat([images, images[-1:].expand(size - len(images), *images.shape[1:])])


# The outputs of the functions ``in_parts`` runs hold one entry per image along dim 0 in every
# tensor, possibly inside tuples (named or not) and dicts; anything else (None, a grid size) is
# the same for every image.

def _concat(parts: list):
    """Join the outputs of a batch computed in pieces."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {key: _concat([part[key] for part in parts]) for key in first}
    if isinstance(first, tuple):
        joined = [_concat(list(items)) for items in zip(*parts)]
        return type(first)(*joined) if hasattr(first, "_fields") else tuple(joined)
    return first


def _first(output, count: int):
    """The first ``count`` images' part of an output (a padded batch's padding dropped)."""
    if isinstance(output, torch.Tensor):
        return output[:count]
    if isinstance(output, dict):
        return {key: _first(value, count) for key, value in output.items()}
    if isinstance(output, tuple):
        items = [_first(item, count) for item in output]
        return type(output)(*items) if hasattr(output, "_fields") else tuple(items)
    return output


class AnomalyModel(nn.Module):
    #: hyperparameters a run may set (see ``Setting``)
    settings: tuple[Setting, ...] = ()
    #: backbone stages the method reads; the extractor is built with exactly these
    layers: tuple[str, ...] = ()
    #: image resize filter of the method's reference code ("bilinear" or "lanczos")
    resample: str = "bilinear"
    #: fewest training images the method can fit
    min_train_images: int = 1
    #: whether ``utils.explain`` can show the normal patches behind a score (needs provenance)
    explainable: bool = False
    #: True: the image score is the max of the final, blurred anomaly map (PaDiM's definition);
    #: False: ``score_patches``' own image score is used
    image_score_from_map: bool = False
    #: buffers that hold the memory of normal images: what a saved model stores
    memory_buffers: tuple[str, ...] = ()
    #: progress bars of long fit stages (the coreset); the pipeline turns them on for a terminal
    progress: bool = False
    #: True where another process fits the same memory and says so (torchrun): the fit's plan
    #: (e.g. PatchCore's shards) is not warned of twice
    quiet: bool = False
    #: True where the memory is searched approximately: ``search_quality(images)`` then measures
    #: what that loses against exact search
    approximate_search: bool = False
    #: True where fit() is built from shards of whole images (``shard_plan``, ``reduce_shards``,
    #: ``install_shards``, ``patches_per_image``): processes then split the shards, and
    #: ``--dry-run`` can estimate the fit
    sharded_fit: bool = False

    def __init__(self, extractor: FeatureExtractor, device: torch.device | str = "cpu"):
        super().__init__()
        self.extractor = extractor
        self.device = torch.device(device)
        self.timings: dict[str, float] = {}  # seconds per stage of the last fit()
        self.max_batch: int | None = None  # lowered after a CUDA out-of-memory error
        # Smaller batches are padded to this many images (``in_parts``); None: never. On a GPU
        # every new input shape costs kernel selection and allocations (benchmarks/RESULTS.md),
        # and the last, partial batch of every split is a new one; the pipeline sets the run's
        # batch size there. On a CPU the padding would be computed for nothing.
        self.batch_shape: int | None = None

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each setting's default: the constructor's."""
        parameters = inspect.signature(cls.__init__).parameters
        return {s.name: parameters[s.name].default for s in cls.settings}

    @classmethod
    def takes_seed(cls) -> bool:
        """Whether the method has a random part (its constructor takes ``seed``)."""
        return "seed" in inspect.signature(cls.__init__).parameters

    @classmethod
    def from_config(cls, extractor: FeatureExtractor, config, device) -> "AnomalyModel":
        """The model a ``RunConfig`` describes (its ``method_settings`` are already resolved)."""
        extra = {"seed": config.seed} if cls.takes_seed() else {}
        return cls(extractor, device=device, **config.method_settings, **extra)

    @contextmanager
    def timed(self, stage: str):
        """Accumulate wall seconds of a stage into ``self.timings`` (GPU work included)."""
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def in_parts(self, function, images: torch.Tensor):
        """``function(images)``, split into smaller batches when the GPU runs out of memory.

        After an out-of-memory error the batch is halved (and stays at most that size for the
        rest of the run) until it fits; at one image per batch the error says what to lower.
        A piece smaller than ``batch_shape`` (or than the halved size) runs padded with copies of
        its last image, and the padding's outputs are dropped.
        """
        size = min(len(images), self.max_batch or len(images))
        shape = None if self.batch_shape is None else min(self.batch_shape,
                                                          self.max_batch or self.batch_shape)

        def run(part: torch.Tensor):
            if shape is None or len(part) >= shape:
                return function(part)
            return _first(function(padded(part, shape)), len(part))

        try:
            return _concat([run(part) for part in images.split(size)])
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise UserError("CUDA out of memory even at 1 image per batch; lower {resize}/"
                                "{crop}, pick a smaller {backbone} or {coreset_fraction}, or use "
                                "{device} cpu") from None
        # Retried outside the except block, so the failed attempt's tensors are freed first.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.max_batch = max(1, math.ceil(size / 2))
        log.warning("CUDA out of memory at %d images per batch; retrying with %d (a batch size "
                    "of %d skips this)", size, self.max_batch, self.max_batch)
        return self.in_parts(function, images)

    def choose_layers(self, layers: str | tuple) -> tuple[str, ...]:
        """The stages of a method's ``layers`` setting ("2+3"), which the extractor must tap."""
        chosen = stage_names(layers)
        missing = [name for name in chosen if name not in self.extractor.layers]
        if missing:
            raise SettingError("layers", layers, f"reads {', '.join(missing)}, which the feature "
                               f"extractor does not tap ({', '.join(self.extractor.layers)})")
        return chosen

    def fit(self, batches) -> None:
        """Build the memory from ``batches`` (``datasets.loader.ImageBatches`` of normal images)."""
        raise NotImplementedError

    def check_k(self, available: int, noun: str, fix: str, plural: str | None = None) -> None:
        """A kNN method cannot average more neighbours than its memory holds: ``available`` of
        ``noun`` (``plural`` where it is not the noun and an s)."""
        k = getattr(self, "k", None)
        if k is not None and k > available:
            raise SettingError("k", k, f"is larger than the memory bank "
                               f"({counted(available, noun, plural)}); lower {{k}} or {fix}")

    def hyperparameters(self) -> dict:
        """Constructor arguments (besides extractor and device) that rebuild this model."""
        return {name: getattr(self, name) for name in inspect.signature(type(self).__init__)
                .parameters if name not in ("self", "extractor", "device")}

    def memory_state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().cpu() for name in self.memory_buffers}

    def load_memory(self, state: dict[str, torch.Tensor]) -> None:
        """Install saved memory buffers (shapes are the saved ones), then rebuild search indexes."""
        missing = [name for name in self.memory_buffers if name not in state]
        if missing:
            raise UserError(f"saved model lacks {', '.join(missing)}; save it again with "
                            "{save_models}")
        for name in self.memory_buffers:
            setattr(self, name, state[name].to(self.device))
        self.memory_loaded()

    def memory_loaded(self) -> None:
        """Hook: rebuild anything derived from the memory buffers (kNN indexes)."""

    def memory_summary(self) -> dict[str, int]:
        """What the memory holds, each count named for what it counts (e.g. bank_patches)."""
        raise NotImplementedError

    def fit_memory(self, n_train: int, crop: int) -> dict[str, int] | None:
        """{block: bytes}: the largest blocks of memory a fit of ``n_train`` images of ``crop`` x
        ``crop`` px holds beside the process itself (torch, the backbone, a batch), counted from
        the layers' shapes (no timing); None: not known. ``--dry-run`` prints it, and a run warns
        before a fit that the device's free memory cannot hold it (``pipeline.fit``)."""
        return None

    def estimate(self, n_train: int, n_test: int, probe: torch.Tensor) -> dict | None:
        """``--dry-run`` of a fit that is not sharded: {"memory_bytes": {block: bytes},
        "fit_seconds", "test_seconds"} for ``n_train`` and ``n_test`` images, from timings of
        ``probe`` (one batch of uint8 training images) on this machine; None: not estimated.
        Only the cost matters here: the probe may leave the model in any state."""
        return None

    @torch.no_grad()
    def predict(self, images: torch.Tensor, with_maps: bool = True) -> Prediction:
        """Image scores and anomaly maps of a batch of uint8 images [B, 3, H, W]; maps are only
        built without ``with_maps`` where the image score is read from them."""
        size = tuple(images.shape[-2:])

        def finished(part: torch.Tensor) -> Prediction:
            image_scores, score_grid = self.score_patches(part)
            if not (with_maps or self.image_score_from_map):
                return Prediction(image_scores, None)
            maps = anomaly_map(score_grid, size)
            if self.image_score_from_map:
                image_scores = maps.flatten(1).amax(1)
            return Prediction(image_scores, maps if with_maps else None)

        return self.in_parts(finished, images)

    def score_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image scores [B], score grid [B, h, w]) of a batch, before rescale and blur."""
        raise NotImplementedError

"""What every method shares: a feature extractor, a fit over normal images, batch scoring.

A method is a plain ``torch.nn.Module`` whose memory of normal images lives in registered buffers.
``fit(loader)`` sees only normal training images; ``predict(images)`` (each method writes
``_predict``; the base splits batches that run out of GPU memory) returns
``(image_scores [B], score_grid [B, h, w])`` where the grid is turned into a full-size anomaly map by
``utils.anomaly_map`` outside the model (pre/post-processing stays out of the model).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
import torch.nn as nn
from tqdm import tqdm

from models.backbone import FeatureExtractor
from utils.errors import UserError


def _concat(parts: list):
    """Join the outputs of a batch computed in pieces: tensors along dim 0, dicts and tuples
    element-wise, anything else (a grid size) taken from the first piece."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {key: _concat([part[key] for part in parts]) for key in first}
    if isinstance(first, tuple):
        return tuple(_concat(list(items)) for items in zip(*parts))
    return first


class AnomalyModel(nn.Module):
    #: backbone stages the method reads; main.py builds the extractor with exactly these
    layers: tuple[str, ...] = ()
    #: nearest neighbours searched in the memory (None: the method searches no neighbours)
    k: int | None = None
    #: True: the image score is the max of the final, blurred anomaly map (PaDiM), taken by the
    #: caller after post-processing; False: ``predict``'s own image score is used
    image_score_from_map: bool = False
    #: buffers that hold the memory of normal images: what a saved model stores (models/io.py)
    memory_buffers: tuple[str, ...] = ()

    def __init__(self, extractor: FeatureExtractor, device: torch.device | str = "cpu",
                 progress: bool = True):
        super().__init__()
        self.extractor = extractor
        self.device = torch.device(device)
        self.progress = progress
        self.timings: dict[str, float] = {}  # seconds per stage of the last fit()
        self.max_batch: int | None = None  # lowered after a CUDA out-of-memory error

    @contextmanager
    def timed(self, stage: str):
        """Accumulate wall seconds of a stage into ``self.timings`` (GPU work included)."""
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def batches(self, loader, desc: str):
        """(images on the device, the whole batch) of each batch, with a progress bar."""
        for batch in tqdm(loader, desc=desc, leave=False, disable=not self.progress):
            yield batch["image"].to(self.device, non_blocking=True), batch

    def in_parts(self, function, images: torch.Tensor):
        """``function(images)``, split into smaller batches when the GPU runs out of memory.

        After an out-of-memory error the batch is halved (and stays at most that size for the
        rest of the run) until it fits; at one image per batch the error becomes a UserError that
        says what to lower.
        """
        size = min(len(images), self.max_batch or len(images))
        try:
            return _concat([function(part) for part in images.split(size)])
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise UserError("CUDA out of memory even at 1 image per batch; lower --resize/"
                                "--crop, pick a smaller --backbone or --coreset, or use --device "
                                "cpu") from None
        # Retried outside the except block, so the failed attempt's tensors are freed first.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.max_batch = max(1, math.ceil(size / 2))
        print(f"warning: CUDA out of memory at {size} images per batch; retrying with "
              f"{self.max_batch} (pass --batch-size {self.max_batch} to skip this)", flush=True)
        return self.in_parts(function, images)

    def fit(self, loader) -> None:
        raise NotImplementedError

    def hyperparameters(self) -> dict:
        """Constructor arguments (besides extractor and device) that rebuild this model."""
        raise NotImplementedError

    def memory_state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().cpu() for name in self.memory_buffers}

    def load_memory(self, state: dict[str, torch.Tensor]) -> None:
        """Install saved memory buffers (shapes are the saved ones), then rebuild search indexes."""
        missing = [name for name in self.memory_buffers if name not in state]
        if missing:
            raise UserError(f"saved model lacks {', '.join(missing)}; save it again with "
                            "--save-models")
        for name in self.memory_buffers:
            setattr(self, name, state[name].to(self.device))
        self.memory_loaded()

    def memory_loaded(self) -> None:
        """Hook: rebuild anything derived from the memory buffers (kNN indexes)."""

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image scores [B], score grid [B, h, w]); split into smaller batches on CUDA OOM."""
        return self.in_parts(self._predict, images)

    def _predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def memory_size(self) -> int:
        """Number of stored normal feature vectors (for the log line)."""
        return 0

"""What every method shares: a feature extractor, a fit over normal images, batch scoring.

A method is a plain ``torch.nn.Module`` whose memory of normal images lives in registered buffers.
``fit(loader)`` sees only normal training images; ``predict(images)`` returns
``(image_scores [B], score_grid [B, h, w])`` where the grid is turned into a full-size anomaly map by
``utils.anomaly_map`` outside the model (pre/post-processing stays out of the model).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn as nn
from tqdm import tqdm

from models.backbone import FeatureExtractor


class AnomalyModel(nn.Module):
    #: backbone stages the method reads; main.py builds the extractor with exactly these
    layers: tuple[str, ...] = ()
    #: nearest neighbours searched in the memory (None: the method searches no neighbours)
    k: int | None = None
    #: True: the image score is the max of the final, blurred anomaly map (PaDiM), taken by the
    #: caller after post-processing; False: ``predict``'s own image score is used
    image_score_from_map: bool = False

    def __init__(self, extractor: FeatureExtractor, device: torch.device | str = "cpu",
                 progress: bool = True):
        super().__init__()
        self.extractor = extractor
        self.device = torch.device(device)
        self.progress = progress
        self.timings: dict[str, float] = {}  # seconds per stage of the last fit()

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

    def fit(self, loader) -> None:
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def memory_size(self) -> int:
        """Number of stored normal feature vectors (for the log line)."""
        return 0

"""Patch scores -> per-pixel anomaly map: bilinear rescale to the input size, then Gaussian blur.

Sigma = 4 is what PatchCore, SPADE and PaDiM all use. scipy's gaussian_filter (truncate 4, mode
'reflect') is the official code's choice; we run it on the whole batch at once, with sigma 0 on the
batch axis so images never bleed into each other.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def upsample(scores: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """[B, h, w] -> [B, H, W], bilinear, align_corners=False (as the official code)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(scores[:, None].float(), size=size, mode="bilinear",
                         align_corners=False)[:, 0]


def gaussian_blur(maps: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """Blur each [H, W] map of a [B, H, W] batch independently."""
    if sigma <= 0:
        return maps
    return ndimage.gaussian_filter(maps, sigma=(0, sigma, sigma))


def anomaly_map(patch_scores: torch.Tensor, size: int | tuple[int, int],
                sigma: float = 4.0) -> np.ndarray:
    return gaussian_blur(upsample(patch_scores, size).cpu().numpy().astype(np.float32), sigma)

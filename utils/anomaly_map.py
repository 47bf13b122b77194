"""Patch scores -> per-pixel anomaly map: bilinear rescale to the input size, then Gaussian blur.

Sigma = 4 is what PatchCore, SPADE and PaDiM all use. The official code blurs with scipy's
``gaussian_filter`` (truncate 4, mode 'reflect': the edge pixel is repeated, ``d c b a | a b c d``).
We compute the same filter
as two matrix products on the device where the maps already are (no copy to the host and back): a
separable blur along one axis of length n is ``maps @ B`` with B an n x n banded matrix whose taps
that fall outside the image are folded back onto the pixels scipy's 'reflect' reads instead.
float32 throughout (matmul never uses TF32 unless asked), so it matches scipy to ~1e-6 relative
(tests/test_metrics.py).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F


def upsample(scores: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """[B, h, w] -> [B, H, W], bilinear, align_corners=False (as the official code)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(scores[:, None].float(), size=size, mode="bilinear",
                         align_corners=False)[:, 0]


def blur_matrix(n: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """[n, n] float64 B with (x @ B)[i] = scipy.ndimage.gaussian_filter1d(x, sigma)[i]."""
    radius = int(truncate * sigma + 0.5)  # scipy's kernel support
    offsets = np.arange(-radius, radius + 1)
    taps = np.exp(-0.5 / sigma ** 2 * offsets.astype(np.float64) ** 2)
    taps /= taps.sum()
    # Source pixel of every padded position; numpy's 'symmetric' is scipy's 'reflect', and it
    # keeps reflecting when the radius exceeds the image (tiny crops).
    source = np.pad(np.arange(n), radius, mode="symmetric")
    matrix = np.zeros((n, n))
    for tap, weight in zip(range(2 * radius + 1), taps):
        np.add.at(matrix, (source[tap:tap + n], np.arange(n)), weight)
    return matrix


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """Blur each [H, W] map of a [B, H, W] float32 batch independently (scipy 'reflect')."""
    if sigma <= 0:
        return maps
    height, width = maps.shape[-2:]
    along_width = _blur_matrix_on(width, float(sigma), maps.device, maps.dtype)
    along_height = _blur_matrix_on(height, float(sigma), maps.device, maps.dtype)
    return along_height.T @ (maps @ along_width)  # rows, then columns; [H, H] broadcasts over B


@functools.lru_cache(maxsize=16)
def _blur_matrix_on(n: int, sigma: float, device: torch.device, dtype: torch.dtype):
    """``blur_matrix`` as a tensor where the maps are, made once, not copied there every batch."""
    return torch.from_numpy(blur_matrix(n, sigma)).to(device, dtype)


def anomaly_map(patch_scores: torch.Tensor, size: int | tuple[int, int],
                sigma: float = 4.0) -> torch.Tensor:
    """[B, h, w] patch scores -> [B, H, W] float32 anomaly maps, on the scores' device."""
    return gaussian_blur(upsample(patch_scores, size), sigma)

"""Explainable PatchCore (--explain): show which normal patches a test image is compared with.

Every memory-bank patch remembers its origin (training image, row, column of the feature grid,
``PatchCore.provenance``). For a test image this module builds
- a mosaic "rebuilt from normal patches": each cell of the test image's feature grid replaced by
  the pixels of that cell in the training image of its nearest bank patch. Where the mosaic
  looks like the test image, the model found a matching normal patch; where it does not, the
  model had nothing similar to offer -- that is where, and why, it sees an anomaly;
- the nearest normal patch of the highest-scoring test patch, outlined (its p x p neighbourhood,
  what PatchCore's patch feature describes; 3 x 3 by default) on its training image beside the
  test patch.
Feature cell (r, c) at stride s covers pixels [r*s, (r+1)*s) x [c*s, (c+1)*s) of the crop.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch


def _cell_bounds(index: int, cells: int, pixels: int) -> tuple[int, int]:
    return round(index * pixels / cells), round((index + 1) * pixels / cells)


def _outline(image: np.ndarray, row: int, col: int, grid: tuple[int, int], radius: int = 1,
             colour=(255, 0, 0)) -> np.ndarray:
    """The (2 radius + 1)-cell square neighbourhood around (row, col) outlined on a copy of the
    image."""
    height, width = image.shape[:2]
    top, _ = _cell_bounds(max(row - radius, 0), grid[0], height)
    _, bottom = _cell_bounds(min(row + radius, grid[0] - 1), grid[0], height)
    left, _ = _cell_bounds(max(col - radius, 0), grid[1], width)
    _, right = _cell_bounds(min(col + radius, grid[1] - 1), grid[1], width)
    out = np.ascontiguousarray(image.copy())
    cv2.rectangle(out, (left, top), (right - 1, bottom - 1), colour, max(1, height // 112))
    return out


class Explainer:
    """Builds the --explain panels of one fitted PatchCore / SA-PatchCore model."""

    def __init__(self, model, train_dataset):
        self.model, self.train = model, train_dataset
        self._images: dict[int, np.ndarray] = {}

    def training_image(self, index: int) -> np.ndarray:
        if index not in self._images:
            self._images[index] = self.train.load(index)[0]
        return self._images[index]

    @torch.no_grad()
    def panels(self, image: np.ndarray) -> list[tuple[str, np.ndarray]]:
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
        tensor = tensor.to(self.model.device)
        score_grid, nearest = self.model.nearest_bank_patches(tensor)
        nearest = nearest[0].cpu()                                        # [h, w] bank rows
        origin = self.model.provenance.cpu()[nearest.flatten()].reshape(*nearest.shape, 3)
        grid = tuple(nearest.shape)
        mosaic = self.mosaic(origin, image.shape[:2])
        worst = int(score_grid[0].flatten().argmax())
        row, col = divmod(worst, grid[1])
        source, source_row, source_col = origin[row, col].tolist()
        name = self.train.samples[source].path.name
        radius = self.model.patch_size // 2  # SA-PatchCore's 3 x 3 pools: PatchCore's default
        return [("highest-scoring patch", _outline(image, row, col, grid, radius)),
                ("rebuilt from normal patches", mosaic),
                (f"nearest normal: {name}",
                 _outline(self.training_image(source), source_row, source_col, grid, radius))]

    def mosaic(self, origin: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """origin [h, w, 3] of (image, row, col) -> an image of ``size`` made of training cells."""
        grid_h, grid_w = origin.shape[:2]
        out = np.zeros((*size, 3), np.uint8)
        for row in range(grid_h):
            top, bottom = _cell_bounds(row, grid_h, size[0])
            for col in range(grid_w):
                left, right = _cell_bounds(col, grid_w, size[1])
                source, source_row, source_col = origin[row, col].tolist()
                train = self.training_image(source)
                s_top, _ = _cell_bounds(source_row, grid_h, train.shape[0])
                s_left, _ = _cell_bounds(source_col, grid_w, train.shape[1])
                patch = train[s_top:s_top + bottom - top, s_left:s_left + right - left]
                out[top:top + patch.shape[0], left:left + patch.shape[1]] = patch
        return out

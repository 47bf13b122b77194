"""Synthetic categories in MVTec AD's layout, for tests and for timing where MVTec is absent.

Normal images share one seeded texture (smooth blobs on a gradient) plus a little per-image noise
and a small random shift; defective images add a planted blob or scratch whose mask is written to
``ground_truth/<type>/<name>_mask.png``. Nothing here is meant to resemble real defects: it only
gives a task whose right answer is known.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    low = rng.uniform(0, 1, (8, 8, 3)).astype(np.float32)
    base = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    ramp = np.linspace(0.2, 0.8, size, dtype=np.float32)[None, :, None]
    return np.clip(0.6 * base + 0.4 * ramp, 0, 1)


def _normal_image(texture: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    shift = rng.integers(-2, 3, size=2)
    image = np.roll(texture, tuple(shift), axis=(0, 1))
    image = image + rng.normal(0, noise, image.shape).astype(np.float32)
    return np.clip(image, 0, 1)


def _plant_defect(image: np.ndarray, rng: np.random.Generator, kind: str):
    size = image.shape[0]
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    centre = tuple(int(v) for v in rng.integers(size // 5, 4 * size // 5, size=2))
    radius = max(2, size // 12)
    if kind == "scratch":
        end = tuple(int(v) for v in np.clip(np.array(centre) + rng.integers(-size // 4, size // 4, 2),
                                            0, size - 1))
        cv2.line(mask, centre, end, 1, thickness=max(2, size // 40))
    else:
        cv2.circle(mask, centre, radius, 1, thickness=-1)
    colour = rng.uniform(0, 1, 3).astype(np.float32)
    image = np.where(mask[:, :, None] > 0, colour, image)
    return image, mask


def _write(path: Path, image: np.ndarray, grayscale: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    if grayscale:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    else:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(path), pixels)


def make_category(root: str | Path, name: str, n_train: int = 10, n_test_good: int = 4,
                  defects: dict[str, int] | None = None, size: int = 64, grayscale: bool = False,
                  masks: bool = True, seed: int = 0, noise: float = 0.02) -> Path:
    """Write one category; ``defects`` maps defect type (may be nested, 'a/b') to image count."""
    defects = {"blob": 4, "scratch": 4} if defects is None else defects
    rng = np.random.default_rng(seed)
    texture = _texture(rng, size)
    category = Path(root) / name
    for i in range(n_train):
        _write(category / "train" / "good" / f"{i:03d}.png", _normal_image(texture, rng, noise), grayscale)
    for i in range(n_test_good):
        _write(category / "test" / "good" / f"{i:03d}.png", _normal_image(texture, rng, noise), grayscale)
    for defect_type, count in defects.items():
        kind = "scratch" if "scratch" in defect_type else "blob"
        for i in range(count):
            image, mask = _plant_defect(_normal_image(texture, rng, noise), rng, kind)
            _write(category / "test" / defect_type / f"{i:03d}.png", image, grayscale)
            if masks:
                mask_path = category / "ground_truth" / defect_type / f"{i:03d}_mask.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(mask_path), mask * 255)
    return category

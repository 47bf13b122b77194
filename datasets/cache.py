"""On-disk cache of preprocessed (resized + cropped) uint8 images and masks.

Decoding a 900-1024 px PNG and resizing it costs as much as the backbone's forward pass on a CPU,
and every run of every method decodes the same files again. The cache keeps what ``load`` returns:
the ``crop`` x ``crop`` RGB image (147 KB at 224) and its mask.

Layout: ``<cache_dir>/<resample>_<resize>_<crop>/<category>/<sha1 of the relative path>.npy``, so a
different resize setting is a different folder and never reads another setting's entries. Each
entry starts with the size and modification time (ns) of the image and of its mask; an entry whose
recorded values differ from the files on disk is stale and is rebuilt in place (an edited,
replaced or touched image is decoded again). Entries are written to a temporary name and renamed,
so parallel DataLoader workers and interrupted runs never leave a half-written entry behind.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from utils.files import atomic_output

_warned: set[str] = set()


def _stamp(path: Path | None) -> tuple[int, int]:
    if path is None:
        return (-1, -1)
    status = os.stat(path)
    return (status.st_size, status.st_mtime_ns)


def _header_matches(file, image_path: Path, mask_path: Path | None) -> bool:
    """Read an entry's header (the recorded stamps) and compare it with the files on disk."""
    return tuple(np.load(file).tolist()) == _stamp(image_path) + _stamp(mask_path)


class ImageCache:
    """``get(key_path, image_path, mask_path)`` -> (image, mask) or None; ``put`` stores them."""

    def __init__(self, cache_dir: str | Path, category: str, resize: int, crop: int,
                 resample: str):
        self.folder = Path(cache_dir) / f"{resample}_{resize}_{crop}" / category
        self.enabled = True

    def _entry(self, relative: str) -> Path:
        return self.folder / f"{hashlib.sha1(relative.encode()).hexdigest()}.npy"

    def get(self, relative: str, image_path: Path, mask_path: Path | None):
        entry = self._entry(relative)
        try:
            with open(entry, "rb") as file:
                if not _header_matches(file, image_path, mask_path):
                    return None  # the image or mask changed since the entry was written
                image = np.load(file)
                mask = np.load(file)
                return image, mask
        except (OSError, ValueError, EOFError):
            return None  # missing or unreadable entry: decode the original

    def is_fresh(self, relative: str, image_path: Path, mask_path: Path | None) -> bool:
        """Whether ``get`` would hit, from the recorded stamps alone (the images are not read)."""
        try:
            with open(self._entry(relative), "rb") as file:
                return _header_matches(file, image_path, mask_path)
        except (OSError, ValueError, EOFError):
            return False

    def put(self, relative: str, image_path: Path, mask_path: Path | None,
            image: np.ndarray, mask: np.ndarray) -> None:
        if not self.enabled:
            return
        try:
            with atomic_output(self._entry(relative)) as temporary, open(temporary, "wb") as file:
                np.save(file, np.array(_stamp(image_path) + _stamp(mask_path), dtype=np.int64))
                np.save(file, np.ascontiguousarray(image))
                np.save(file, np.ascontiguousarray(mask))
        except OSError as error:
            # A read-only data root must not stop a run: decode every time instead, say so once.
            self.enabled = False
            if str(self.folder) not in _warned:
                _warned.add(str(self.folder))
                warnings.warn(f"image cache disabled: cannot write {self.folder} ({error.strerror}); "
                              "pass --cache-dir to a writable folder, or --no-cache")

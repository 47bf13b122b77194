"""On-disk cache of preprocessed (resized + cropped) uint8 images and masks.

Decoding a 900-1024 px PNG and resizing it costs as much as the backbone's forward pass on a CPU,
and every run of every method decodes the same files again. The cache keeps what ``load`` returns:
the ``crop`` x ``crop`` RGB image (147 KB at 224) and its mask.

Layout: ``<cache_dir>/<resample>_<resize>_<crop>/<category>/<sha1 of the relative path>.img``, so a
different resize setting is a different folder and never reads another setting's entries. An entry
is one file: a fixed header (a tag naming the decode's version; the size and modification time in
ns of the image and of its mask; the image's shape, channels first, and the mask's), then the
image's bytes and the mask's. An entry whose recorded stamps differ from the files on disk is stale
and is rebuilt in place (an edited, replaced or touched image is decoded again); a truncated one is
decoded again too. Entries are written to a temporary name and renamed, so parallel DataLoader
workers and interrupted runs never leave a half-written entry behind.

Reading an entry is a header unpack and two reads straight into the arrays: a warm run reads
every image of a split in one thread beside the model, so a per-image cost of parsing (NumPy's
``.npy`` header is a Python literal per array, the earlier format) caps the images per second
(benchmarks/RESULTS.md). The image is stored channels first, the layout a batch takes, so a
batch needs no transposing copy. An entry of the earlier ``.npy`` format is deleted when its
image is cached again.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from utils.distributed import warn_once
from utils.files import atomic_output, probe_writable

# The decode's version: bumped whenever a file comes to decode to other pixels, so that an entry
# made by an earlier decode is made again rather than read. 2: images are turned by their EXIF
# orientation, as their masks were (a turned photo cached before was scored unturned). 3: a mask
# with transparent pixels marks the defect by its opacity (datasets.mvtec.read_mask).
_TAG = b"adcache3"
# tag, image (size, mtime_ns), mask (size, mtime_ns), image channels/height/width, mask h/w
_HEADER = struct.Struct("<8s4q5i")


def _stamp(path: Path | None) -> tuple[int, int]:
    if path is None:
        return (-1, -1)
    status = os.stat(path)
    return (status.st_size, status.st_mtime_ns)


def _fresh_shapes(file, image_path: Path, mask_path: Path | None):
    """Read an entry's header: (image shape [C, H, W], mask shape [H, W]) when the recorded stamps
    are the files' on disk, else None."""
    header = file.read(_HEADER.size)
    if len(header) != _HEADER.size:
        return None
    tag, *fields = _HEADER.unpack(header)
    if tag != _TAG or tuple(fields[:4]) != _stamp(image_path) + _stamp(mask_path):
        return None
    return tuple(fields[4:7]), tuple(fields[7:9])


class ImageCache:
    """``get(key_path, image_path, mask_path)`` -> (image, mask) or None; ``put`` stores them."""

    def __init__(self, cache_dir: str | Path, category: str, resize: int, crop: int,
                 resample: str):
        self.root = Path(cache_dir)
        self.folder = self.root / f"{resample}_{resize}_{crop}" / category
        self._entries: dict[str, str] = {}  # relative path -> entry file; kept, as pathlib is slow
        # Probed here, in the process that builds the dataset: loader and decode-ahead processes
        # receive the answer with it, so an unwritable cache is reported once, not per process.
        # A read-only cache that is already filled is still read (``get`` does not ask).
        self.enabled = True
        try:
            probe_writable(self.folder)
        except OSError as error:
            self._disable(error)

    def _disable(self, error: OSError) -> None:
        """A read-only data root must not stop a run: decode every time instead, and say so
        once per cache folder and reason, by rank 0 alone under torchrun -- not once per
        category: each has its own sub-folder, and one cause (a read-only root, a full disk)
        disables them all."""
        self.enabled = False
        warn_once(__name__, f"image cache disabled: cannot write {self.folder} ({error.strerror}); "
                  "pass --cache-dir to a writable folder, or --no-cache",
                  key=(str(self.root), error.strerror))

    def _entry(self, relative: str) -> str:
        entry = self._entries.get(relative)
        if entry is None:
            entry = self._entries[relative] = os.path.join(
                self.folder, f"{hashlib.sha1(relative.encode()).hexdigest()}.img")
        return entry

    def get(self, relative: str, image_path: Path, mask_path: Path | None):
        """(image H x W x 3, a channels-first array's view; mask H x W), both uint8, or None."""
        try:
            with open(self._entry(relative), "rb") as file:
                shapes = _fresh_shapes(file, image_path, mask_path)
                if shapes is None:
                    return None  # the image or mask changed since the entry was written
                image, mask = np.empty(shapes[0], np.uint8), np.empty(shapes[1], np.uint8)
                if file.readinto(image.data) != image.nbytes or \
                        file.readinto(mask.data) != mask.nbytes:
                    return None  # truncated entry: decode the original again
                return image.transpose(1, 2, 0), mask
        except (OSError, ValueError):
            return None  # missing or unreadable entry: decode the original

    def is_fresh(self, relative: str, image_path: Path, mask_path: Path | None) -> bool:
        """Whether ``get`` would hit, from the recorded stamps alone (the images are not read)."""
        try:
            with open(self._entry(relative), "rb") as file:
                return _fresh_shapes(file, image_path, mask_path) is not None
        except (OSError, ValueError):
            return False

    def put(self, relative: str, image_path: Path, mask_path: Path | None,
            image: np.ndarray, mask: np.ndarray) -> None:
        if not self.enabled:
            return
        entry = Path(self._entry(relative))
        image = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.uint8)
        mask = np.ascontiguousarray(mask, dtype=np.uint8)
        try:
            with atomic_output(entry) as temporary, open(temporary, "wb") as file:
                file.write(_HEADER.pack(_TAG, *_stamp(image_path), *_stamp(mask_path),
                                        *image.shape, *mask.shape))
                file.write(image.data)
                file.write(mask.data)
            entry.with_suffix(".npy").unlink(missing_ok=True)  # the earlier format's entry
        except OSError as error:  # e.g. the disk filled up during the run
            self._disable(error)

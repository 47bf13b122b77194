"""MVTec AD reader (and the same layout for custom data).

Layout of one category (MVTec AD, Bergmann et al., CVPR 2019)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect_type>/*.png          (``good`` = normal)
    <root>/<category>/ground_truth/<defect_type>/<name>_mask.png

Defect types may be nested (``test/scratch/deep/001.png`` has type ``scratch/deep`` and its mask at
``ground_truth/scratch/deep/001_mask.png``). ``ground_truth/`` is optional for custom data, whose
masks may be in any of the image formats and may be named like their image (``001.png``): when a
defective image has no mask, pixel metrics are skipped for the category (``has_masks`` is False).

Preprocessing follows the official PatchCore / PaDiM / SPADE code: the shorter side is resized to
``resize`` with PIL (PatchCore's code: bilinear; the PaDiM and SPADE reference code: Lanczos, PIL's
``ANTIALIAS``), then a ``crop`` x ``crop`` centre crop. Masks get the
same geometry with nearest-neighbour resizing so they stay binary. Images are returned as uint8
RGB tensors; normalisation belongs to the backbone (CLIP and ImageNet use different constants).
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from datasets.cache import ImageCache
from utils.distributed import warn_once
from utils.errors import DataError, SettingError
from utils.files import names_apart, visible_files

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")
NORMAL_TYPE = "good"
log = logging.getLogger(__name__)
# A file cv2 cannot decode is reported as one line (UnreadableImage, or a skip warning); OpenCV's
# own "[ WARN:0@...] grfmt_png.cpp ..." notes for the same file would only come on top of it.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


class UnreadableImage(DataError):
    """An image file that does not decode. ``reason`` alone is what a skip warning shows: the
    error's advice (replace it, or skip it) no longer applies once it is skipped."""
    reason = "the file is missing, empty, truncated or not an image"

    def __init__(self, path):
        self.path = path
        super().__init__(f"cannot read image {path}: {self.reason}; replace or delete it (or pass "
                         "{skip_bad_images})")

    def __reduce__(self):  # picklable: raised in loader and decode-ahead processes
        return UnreadableImage, (self.path,)


def skip_reason(error: DataError) -> str:
    """Why an image is skipped under skip_bad_images, for a one-line warning after its path."""
    return error.reason if isinstance(error, UnreadableImage) else str(error)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 normal, 1 anomalous
    defect_type: str
    mask_path: Path | None


def decode_image(path: Path) -> Image.Image:
    """Decode any PNG/JPEG (grayscale, RGB, RGBA, 8 or 16 bit) into an 8-bit PIL image: mode "L"
    for a grayscale file, "RGB" otherwise.

    OpenCV decodes (faster than PIL's reader) into BGR order; PIL swaps the channels while it
    copies the pixels into its own buffer, which it must do anyway, so no full-size colour
    conversion runs. Grayscale stays one channel until after the resize: PIL resizes each
    channel alike, so three equal channels are made from the small crop, not the full image."""
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    # ANYDEPTH | ANYCOLOR: 16 bits and grayscale kept (alpha dropped), and the EXIF orientation
    # applied, as every viewer shows the photo and as the mask is read: an annotation tool draws
    # the mask on the turned image (IMREAD_UNCHANGED would ignore the tag)
    image = (cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
             if data is not None and data.size else None)
    if image is None:
        raise UnreadableImage(path)
    if image.dtype == np.uint16:  # 16-bit PNGs: keep the 8 most significant bits
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        return Image.fromarray(image)
    image = np.ascontiguousarray(image)
    height, width, _ = image.shape
    return Image.frombuffer("RGB", (width, height), image, "raw", "BGR", 0, 1)


def read_mask(path: Path) -> np.ndarray:
    """A mask as 0/1: any non-zero pixel marks the defect (MVTec's 0/255, 0/1 label masks, a
    colour), but in a lossy file (JPEG, WebP) only pixels of at least half the mask's brightest
    do: the compression leaves faint grey around every edge, which ``> 0`` would add to each
    defect. Half the brightest, not half of 255: a red or blue mark is a dark grey. A mask
    painted on a transparent layer marks the defect by its opacity instead (``_opacity``)."""
    data = np.fromfile(str(path), dtype=np.uint8)
    mask = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if mask is None:
        raise DataError(f"cannot read mask {path}: the file is empty, truncated or not an image; "
                        "replace it with a binary PNG of the image's size")
    opacity = _opacity(data)
    if opacity is not None and opacity.shape == mask.shape:
        mask = opacity
    if Path(path).suffix.lower() not in LOSSY_EXTENSIONS:
        return (mask > 0).astype(np.uint8)
    brightest = int(mask.max())
    if 0 < brightest < 16:
        # faint marks only: labels 0/1, which the compression's own errors are as large as
        raise DataError(f"mask {path} marks its defect in values below 16 (a 0/1 label mask?), "
                        "which a lossy format blurs into its background; save the mask as PNG, "
                        "or with the defect at 255")
    return (mask >= max(1, (brightest + 1) // 2)).astype(np.uint8)


def _opacity(data: np.ndarray) -> np.ndarray | None:
    """The alpha channel of a mask with transparent pixels (a defect painted on a transparent
    layer, as an image editor exports it), turned by its EXIF orientation as the grey mask is;
    None for a mask without transparency. The colour under a transparent pixel is whatever the
    editor left there, often white: read as grey, such a mask marked its whole background and
    missed a defect painted in black. ``data``: the file's bytes, as read for the grey mask."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if "A" not in image.getbands() and "transparency" not in image.info:
                return None
            alpha = np.asarray(ImageOps.exif_transpose(image).convert("RGBA").getchannel("A"))
    except (OSError, ValueError):  # a format PIL cannot open: OpenCV's grey reading stands
        return None
    return alpha if alpha.min() < 255 else None


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) of an image whose shorter side is resized to ``size``."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _resize_shorter_side(image: Image.Image, size: int, resample) -> np.ndarray:
    new_h, new_w = resized_shape(image.size[1], image.size[0], size)
    return np.asarray(image.resize((new_w, new_h), resample))


def check_preprocessing(resize: int, crop: int) -> None:
    """The centre crop must fit in the resized image: its shorter side is ``resize``."""
    if crop > resize:
        raise SettingError("crop", crop, f"is larger than {{resize}} {resize}; use a crop <= the resize")


def crop_offset(height: int, width: int, crop: int) -> tuple[int, int]:
    """(top, left) of the centre crop of a (height, width) image."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def _center_crop(image: np.ndarray, crop: int) -> np.ndarray:
    # shorter side == resize >= crop (check_preprocessing)
    top, left = crop_offset(*image.shape[:2], crop)
    return image[top:top + crop, left:left + crop]


def to_original_size(crop_map: np.ndarray, height: int, width: int, resize: int,
                     fill: float) -> np.ndarray:
    """A (crop, crop) map of the preprocessed image put back onto the (height, width) original:
    the inverse of the resize and the centre crop, bilinear, pixel centres aligned as PIL's
    resize aligns them; ``fill`` where the crop did not reach (the model never saw it)."""
    crop = crop_map.shape[0]
    resized_h, resized_w = resized_shape(height, width, resize)
    top, left = crop_offset(resized_h, resized_w, crop)
    scale_y, scale_x = resized_h / height, resized_w / width
    # original pixel centre x + 0.5 lies at (x + 0.5) * scale in the resized image, whose pixel
    # centres are at i + 0.5; the crop starts at ``left``
    to_crop = np.array([[scale_x, 0, 0.5 * scale_x - 0.5 - left],
                        [0, scale_y, 0.5 * scale_y - 0.5 - top]])
    # replicated at the edge: a pixel the crop covers takes the crop's edge value, not a blend
    # with ``fill``
    full = cv2.warpAffine(crop_map.astype(np.float32), to_crop, (width, height),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)
    # covered: the pixel's centre falls inside the crop, [0, crop) in its pixel-edge coordinates
    rows = (np.arange(height) + 0.5) * scale_y - top
    columns = (np.arange(width) + 0.5) * scale_x - left
    full[(rows < 0) | (rows >= crop)] = fill
    full[:, (columns < 0) | (columns >= crop)] = fill
    return full


RESAMPLING = {"bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}


def preprocess(image: Image.Image, resize: int, crop: int, resample: str = "bilinear") -> np.ndarray:
    """A decoded image (``decode_image``) resized and centre-cropped: uint8 RGB (crop, crop, 3)."""
    cropped = _center_crop(_resize_shorter_side(image, resize, RESAMPLING[resample]), crop)
    return np.repeat(cropped[:, :, None], 3, axis=2) if cropped.ndim == 2 else cropped


def channels_first(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> contiguous (3, H, W) that torch may share. A decoded crop is a read-only
    view of its PIL image; transposing copies it, except a 1 x 1 crop, whose transpose is
    already contiguous and so would stay read-only (torch warns of such arrays)."""
    return np.require(image.transpose(2, 0, 1), requirements=("C", "W"))


def preprocess_image(image: np.ndarray, resize: int, crop: int,
                     resample: str = "bilinear") -> np.ndarray:
    """``preprocess`` for an RGB (H, W, 3) or grayscale (H, W) uint8 array."""
    return preprocess(Image.fromarray(image), resize, crop, resample)


def preprocess_mask(mask: np.ndarray, resize: int, crop: int) -> np.ndarray:
    return _center_crop(_resize_shorter_side(Image.fromarray(mask), resize, Image.NEAREST), crop)


def _images_under(folder: Path) -> list[Path]:
    return [p for p in visible_files(folder) if p.suffix.lower() in IMAGE_EXTENSIONS]


def list_samples(category_dir: Path, split: str) -> list[Sample]:
    """All samples of one split; test defect types are the folders below test/ (nested allowed)."""
    category_dir = Path(category_dir)
    if split == "train":
        train_dir = category_dir / "train" / NORMAL_TYPE
        paths = _images_under(train_dir) if train_dir.is_dir() else []
        if not paths:
            raise DataError(f"no training images in {train_dir}: put the normal (defect-free) images "
                            "there as PNG/JPEG")
        return [Sample(p, 0, NORMAL_TYPE, None) for p in paths]

    test_dir = category_dir / "test"
    paths = _images_under(test_dir) if test_dir.is_dir() else []
    if not paths:
        raise DataError(f"no test images in {test_dir}: put them in test/good/ (normal) and "
                        "test/<defect_type>/ (defective)")
    samples = []
    masks = {}  # defect type -> its masks by name, each ground_truth folder listed once
    for path in paths:
        folders = path.parent.relative_to(test_dir).parts
        if not folders:  # its label would be a guess
            raise DataError(f"test image {path} is directly in test/; move it into test/good/ "
                            "if it is normal, or into test/<defect type>/")
        # sub-folders of good/ (good/day1/) hold normal images too, and Good/ is no defect type
        if folders[0].lower() == NORMAL_TYPE:
            samples.append(Sample(path, 0, NORMAL_TYPE, None))
            continue
        defect_type = "/".join(folders)
        if defect_type not in masks:
            masks[defect_type] = _masks_by_name(category_dir / "ground_truth" / defect_type)
        # MVTec's <name>_mask; other datasets' tools name a mask like its image
        mask = masks[defect_type].get(f"{path.stem}_mask") or masks[defect_type].get(path.stem)
        samples.append(Sample(path, 1, defect_type, mask))
    return samples


def _masks_by_name(folder: Path) -> dict[str, Path]:
    """The masks in one ground_truth folder by name without extension: MVTec's are PNGs, custom
    data's may be in any image format (a PNG wins over another file of the same name)."""
    if not folder.is_dir():
        return {}
    rank = {extension: i for i, extension in enumerate(IMAGE_EXTENSIONS)}
    # this folder's files only: ground_truth/bent/left/ holds the masks of another defect type
    found = [p for p in _images_under(folder) if p.parent == folder]
    return {p.stem: p for p in sorted(found, key=lambda p: -rank[p.suffix.lower()])}


def mask_path_for(category_dir: Path, defect_type: str, image: Path) -> Path:
    """Where MVTec AD keeps the mask of a defective test image (it may not exist)."""
    return category_dir / "ground_truth" / defect_type / f"{image.stem}_mask.png"


class MVTecCategory(torch.utils.data.Dataset):
    """One split of one category. Items: dict(image uint8 [3,H,W], mask uint8 [1,H,W], label, index)."""

    def __init__(self, category_dir: str | Path, split: str, resize: int = 256, crop: int = 224,
                 skip_bad_images: bool = False, resample: str = "bilinear",
                 cache_dir: str | Path | None = None, quiet: bool = False):
        """``quiet``: skipped images are not warned of (another process of the run says so)."""
        self.category_dir = Path(category_dir)
        self.category = self.category_dir.name
        self.split = split
        check_preprocessing(resize, crop)
        self.resize, self.crop, self.resample = resize, crop, resample
        # None: decode every time; else preprocessed images are kept there (datasets/cache.py)
        self.cache = (ImageCache(cache_dir, self.category, resize, crop, resample)
                      if cache_dir is not None else None)
        self.samples = list_samples(self.category_dir, split)
        self._fully_cached = False  # a True answer of fully_cached, kept
        self._cache_keys: dict[Path, str] = {}
        if skip_bad_images:
            self.samples = self._drop_unreadable(quiet)
        defective = [s for s in self.samples if s.label == 1]
        without_mask = sorted({s.defect_type for s in defective if s.mask_path is None})
        # Pixel metrics need a mask for every defective image; a partial set would bias them.
        self.has_masks = bool(defective) and not without_mask
        self.types_without_masks = without_mask
        self.unmasked_count = sum(s.mask_path is None for s in defective)
        self.defective_count = len(defective)
        # the first mask looked for and not found, shown in the warning: a custom dataset's masks
        # are often there under another name (000_label.png, or in another folder)
        self.missing_mask = next((mask_path_for(self.category_dir, s.defect_type, s.path)
                                  for s in defective if s.mask_path is None), None)

    def _drop_unreadable(self, quiet: bool) -> list[Sample]:
        kept = []
        for sample in self.samples:
            try:
                self._load_sample(sample)  # fills the cache, so the check costs no second decode
                kept.append(sample)
            except DataError as error:
                if not quiet:
                    log.warning("skipping %s: %s", sample.path, skip_reason(error))
        if not kept:
            raise DataError(f"every image in {self.samples[0].path.parent} is unreadable")
        return kept

    def fully_cached(self) -> bool:
        """Every sample has a fresh cache entry: loading is a file read, no decode. A True answer
        is kept (``mark_fully_cached`` sets it from outside): it only chooses how the split is
        read, and reading checks each entry again."""
        if self.cache is None:
            return False
        if not self._fully_cached:
            self._fully_cached = all(self.cache.is_fresh(self._cache_key(s), s.path, s.mask_path)
                                     for s in self.samples)
        return self._fully_cached

    def mark_fully_cached(self) -> None:
        """Every sample was just put in the cache (datasets/decode_ahead.py): no need to check."""
        self._fully_cached = self.cache is not None

    def _cache_key(self, sample: Sample) -> str:
        # kept: a warm run reads thousands of images a second, and with pathlib's key and entry
        # path made again for each, reading a cached image took half as long again
        key = self._cache_keys.get(sample.path)
        if key is None:
            key = self._cache_keys[sample.path] = sample.path.relative_to(
                self.category_dir).as_posix()
        return key

    def subset(self, indices) -> "MVTecCategory":
        """The same split restricted to ``indices`` (e.g. a held-out calibration part of train)."""
        import copy
        part = copy.copy(self)
        part.samples = [self.samples[i] for i in indices]
        return part

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, index: int) -> Path:
        return self.samples[index].path

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed (image uint8 HxWx3, mask uint8 HxW) of one sample."""
        return self._load_sample(self.samples[index])

    def ensure_cached(self, index: int) -> None:
        """Decode one sample into the cache unless its entry is fresh (datasets/decode_ahead.py)."""
        sample = self.samples[index]
        if self.cache is not None and self.cache.enabled and not self.cache.is_fresh(
                self._cache_key(sample), sample.path, sample.mask_path):
            self._load_sample(sample)

    def _load_sample(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        if self.cache is None:
            return self._decode(sample)
        relative = self._cache_key(sample)
        cached = self.cache.get(relative, sample.path, sample.mask_path)
        if cached is not None:
            return cached
        image, mask = self._decode(sample)
        self.cache.put(relative, sample.path, sample.mask_path, image, mask)
        return image, mask

    def _decode(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        raw = decode_image(sample.path)
        image = preprocess(raw, self.resize, self.crop, self.resample)
        if sample.mask_path is not None:
            mask = read_mask(sample.mask_path)
            if mask.shape != (raw.height, raw.width):
                raise DataError(f"mask {sample.mask_path} is {mask.shape[1]}x{mask.shape[0]} but its "
                                f"image {sample.path} is {raw.width}x{raw.height}; masks must have "
                                "their image's size")
            mask = preprocess_mask(mask, self.resize, self.crop)
        else:
            mask = np.zeros(image.shape[:2], dtype=np.uint8)
        return image, mask

    def __getitem__(self, index: int) -> dict:
        image, mask = self.load(index)
        return {  # a cached image is a channels-first array's view: transposed back, no copy
            "image": torch.from_numpy(channels_first(image)),
            "mask": torch.from_numpy(np.array(mask, dtype=np.uint8))[None],
            "label": self.samples[index].label,
            "index": index,
        }


class ImageFiles(torch.utils.data.Dataset):
    """New images to score (``--predict``): any size, PNG/JPEG/BMP/TIFF, grayscale/RGB/RGBA,
    preprocessed like the training images. Items: dict(image uint8 [3,H,W], index)."""

    def __init__(self, paths: list[Path], resize: int, crop: int, resample: str):
        check_preprocessing(resize, crop)
        self.paths, self.resize, self.crop, self.resample = list(paths), resize, crop, resample

    def fully_cached(self) -> bool:
        return False  # new images are decoded from their files, never cached

    def path(self, index: int) -> Path:
        return self.paths[index]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        return preprocess(decode_image(self.paths[index]), self.resize, self.crop, self.resample)

    def __getitem__(self, index: int) -> dict:
        image = self.load(index)
        return {"image": torch.from_numpy(channels_first(image)),
                "mask": torch.zeros(1, *image.shape[:2], dtype=torch.uint8), "index": index}


def shown_size(path: Path) -> tuple[int, int]:
    """(width, height) of ``decode_image(path)``, read from the header alone unless an EXIF
    orientation turns the image by 90 degrees (rare): then the image is decoded, since formats
    differ in whether the size they report is the turned one. A PNG's EXIF after its pixels is
    not looked for (PIL would decode the whole image to find it)."""
    with Image.open(path) as image:
        exif = image.getexif() if image.format != "PNG" or "exif" in image.info else {}
        if exif.get(0x0112, 1) not in (5, 6, 7, 8):
            return image.size
    return decode_image(path).size


def write_evaluation_maps(folder: Path, test: "MVTecCategory", maps: np.ndarray) -> None:
    """Every test image's anomaly map where MVTec AD's evaluation code (mvtec_ad_evaluation,
    ``evaluate_experiment.py``) reads it: ``<folder>/test/<defect type>/<name>.tiff``, float32, at
    the image's original size. The map covers the centre crop the model saw; the rest of the
    image, never seen, gets the lowest score of the category's maps, i.e. nothing found there."""
    lowest = float(maps.min())
    # the image's own place below the category (test/<defect type>/), as a .tiff; 000.png beside
    # 000.jpg would both be 000.tiff, so such names keep their extension (names_apart)
    names = names_apart([sample.path for sample in test.samples], test.category_dir)
    for sample, name, crop_map in zip(test.samples, names, maps):
        width, height = shown_size(sample.path)
        full = to_original_size(crop_map, height, width, test.resize, fill=lowest)
        path = folder / f"{name}.tiff"
        path.parent.mkdir(parents=True, exist_ok=True)
        # encoded here and written by Python: OpenCV's own file writing fails on some paths
        # (non-ASCII on Windows)
        path.write_bytes(cv2.imencode(".tiff", full)[1].tobytes())


def collect_images(items: list[str | Path]) -> list[Path]:
    """Files given directly, plus every image below each folder given (sorted)."""
    paths = []
    for item in map(Path, items):
        if item.is_dir():
            found = _images_under(item)
            if not found:
                raise SettingError("predict", item, f"holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise SettingError("predict", item, "does not exist; give image files or folders")
    return paths


def find_categories(data_root: str | Path) -> list[str]:
    """Custom data: every sub-folder of the data root that has train/good."""
    root = Path(data_root)
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise SettingError("data_root", root, f"{state}; point it at the folder holding your "
                           "category folders")
    with_train = sorted(p for p in root.iterdir() if (p / "train").is_dir())
    names = [p.name for p in with_train if (p / "train" / NORMAL_TYPE).is_dir()]
    if not names and is_category_present(root):
        raise DataError(f"no category folders with train/good under {{data_root}} {root}, which "
                        f"is itself a category folder; pass the folder holding it, {{data_root}} "
                        f"{root.parent}")
    # a train/ without good/ is most often train/Good/, or the images straight in train/
    near = [p.name for p in with_train if p.name not in names]
    hint = (f"{', '.join(near)} {'has' if len(near) == 1 else 'have'} train/ but no train/good: "
            "put the normal images in train/good (lower case)" if near else "")
    if not names:
        raise DataError(f"no category folders with train/good under {{data_root}} {root}"
                        + f"; {hint}" * bool(hint))
    if hint:
        warn_once(__name__, f"{root}: not read as categories: {hint}")
    return names


def is_category_present(category_dir: Path) -> bool:
    return (Path(category_dir) / "train" / NORMAL_TYPE).is_dir() and os.access(category_dir, os.R_OK)

"""A category's preprocessed crops written out as lossless PNGs in MVTec AD's layout.

Read back with ``--resize C --crop C`` (C the crop), the copy gives the very crops and masks of the
original under ``--resize R --crop C``: the resize to the size an image already has and the crop to
its whole extent leave every pixel as it is. It is a fraction of the size (bottle: 150 MB -> 20 MB
at 224), for taking real data to a machine that lacks it, such as a GPU host reached only
through a size-limited copy. The copy is of one resize filter: use the ``--resample`` of the
method it will run.

    python -m datasets.crop_copy --data-root ../shared/mvtec --category bottle --out /tmp/bottle224
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from datasets.mvtec import MVTecCategory
from utils.errors import UserError


def write_crop_copy(category_dir: str | Path, out_root: str | Path, resize: int = 256,
                    crop: int = 224, resample: str = "bilinear") -> Path:
    """Write ``<out_root>/<category>/`` with every train and test image's crop and every mask's;
    returns that folder."""
    category_dir = Path(category_dir)
    out = Path(out_root) / category_dir.name
    source, target = category_dir.resolve(), out.resolve()
    if target.is_relative_to(source) or source.is_relative_to(target):
        # the crops would be written over the originals, or in among the images being copied
        raise UserError(f"--out {out_root} puts the copy at {out}, which overlaps the category "
                        f"{category_dir} itself; give a folder outside it")
    for split in ("train", "test"):
        data = MVTecCategory(category_dir, split, resize=resize, crop=crop, resample=resample)
        for index, sample in enumerate(data.samples):
            image, mask = data.load(index)
            # cv2 writes BGR; a grey crop stays one channel, as its original most likely was
            grey = (image == image[:, :, :1]).all()
            _write_png(out / sample.path.relative_to(category_dir),
                       image[:, :, 0] if grey else image[:, :, ::-1])
            if sample.mask_path is not None:
                _write_png(out / sample.mask_path.relative_to(category_dir), mask * 255)
    return out


def _write_png(path: Path, pixels: np.ndarray) -> None:
    """``pixels`` as a PNG at ``path`` with its suffix made .png (a JPEG original too: lossless)."""
    target = path.with_suffix(".png")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(target), np.ascontiguousarray(pixels), [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise OSError(f"cannot write {target}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder the category goes into")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--resample", choices=("bilinear", "lanczos"), default="bilinear")
    args = parser.parse_args(argv)
    try:
        folder = write_crop_copy(args.data_root / args.category, args.out, args.resize, args.crop,
                                 args.resample)
    except UserError as error:  # one line, as main.py prints them
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{folder}: read it with --data-root {args.out} --resize {args.crop} --crop {args.crop}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

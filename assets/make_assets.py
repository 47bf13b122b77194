"""Regenerate the README's figures in assets/ from real runs on MVTec AD bottle.

    python assets/make_assets.py                      # ../shared data and MobileNetV2 weights
    python assets/make_assets.py --data-root DIR --weights FILE --backbone NAME

Runs PatchCore-1 % (with and without --explain) and a SPADE sweep (k = 3, 5; seeds 0, 1) through
the library pipeline, then copies the ROC curve, a score distribution, two localization figures
and the sweep's table here, figures shrunk so that assets/ stays small.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

ASSETS = Path(__file__).resolve().parent
sys.path.insert(0, str(ASSETS.parent))

import pipeline  # noqa: E402
from config import resolve_config, resolve_sweep  # noqa: E402

SHARED = ASSETS.parent.parent / "shared"
FIGURE = "localization/bottle/broken_large_000.png"


def shrink(source: Path, target: Path, width: int) -> None:
    image = Image.open(source).convert("RGB")
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.quantize(256).save(target, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=SHARED / "mvtec")
    parser.add_argument("--weights", type=Path,
                        default=SHARED / "weights" / "mobilenet_v2_imagenet_features.pth")
    parser.add_argument("--backbone", default="mobilenet_v2")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="assets_"))
    common = dict(backbone=args.backbone, weights=args.weights, data_root=args.data_root,
                  categories=["bottle"], cache_dir=work / "cache", progress=False, plots=1)
    for explain in (False, True):
        pipeline.run(resolve_config(method="patchcore",
                                    method_settings={"coreset_fraction": 0.01},
                                    result_dir=work / f"patchcore_{explain}", explain=explain,
                                    **common))
    sweep = work / "sweep"
    pipeline.run_sweep(resolve_sweep("spade", {"k": [3, 5]}, seeds=[0, 1], result_dir=sweep,
                                     **{**common, "plots": 0}), sweep)
    plain, explained = work / "patchcore_False", work / "patchcore_True"
    shrink(plain / "roc_curve.png", ASSETS / "roc_curve.png", 900)
    shrink(plain / "pred_dist" / "bottle.png", ASSETS / "score_distribution.png", 500)
    shrink(plain / FIGURE, ASSETS / "localization.png", 900)
    shrink(explained / FIGURE, ASSETS / "localization_explain.png", 1400)
    shrink(sweep / "roc_curve.png", ASSETS / "sweep_roc_curve.png", 900)
    shutil.copy(sweep / "results.md", ASSETS / "sweep_results.md")
    total = sum(p.stat().st_size for p in ASSETS.iterdir() if p.is_file())
    print(f"assets/: {total / 2**20:.2f} MB ({work} kept for inspection)")


if __name__ == "__main__":
    main()

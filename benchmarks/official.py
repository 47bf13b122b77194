"""The official PatchCore code (amazon-science/patchcore-inspection) on the same images and
settings as this project, timed in the same process, so that the speed ratio is measured on one
machine at one time rather than quoted.

    python benchmarks/official.py --official-src ../patchcore-inspection/src \\
        --backbone wide_resnet50_2 --weights wrn50.pth --coreset 0.1 --device cuda \\
        --data-root ../shared/mvtec --category bottle [--train-images N] --json out.json

Both sides read the same preprocessed crops (this project's reader: resize 256, centre crop 224,
bilinear as the official code) and the same backbone weights, with the same BatchNorm statistics:
by default both as the official run script leaves them after its shape probe (this project's
--official-bn-probe), with --official-eval-first both the weights' own (this project's
default), so that their AUROCs compare. The official side runs its own
PatchCore class, sampler (ApproximateGreedyCoresetSampler) and kNN (its FaissNN, on the CPU
unless --official-faiss-gpu), exactly as its ``load`` / ``fit`` / ``predict`` do. Nothing of the
official code is copied here: its ``src`` folder is imported from where it was checked out.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pipeline  # noqa: E402
from config import resolve_config  # noqa: E402
from datasets import MVTecCategory  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.parse import flag_names  # noqa: E402

# The official code taps a backbone by module name: what plays layer2 and layer3.
OFFICIAL_LAYERS = {"wide_resnet50_2": ["layer2", "layer3"], "resnet18": ["layer2", "layer3"],
                   "mobilenet_v2": ["features.6", "features.13"]}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cache_dir(args) -> Path:
    """The one decode cache both sides read."""
    return Path(args.work_dir) / "cache"


class OfficialSplit(torch.utils.data.Dataset):
    """This project's crops as the official dataset hands them over: normalised float images,
    float masks and the anomaly flag; ``count`` > len resamples (image i is file i mod len)."""

    def __init__(self, folder: Path, split: str, cache_dir: Path, count: int | None = None):
        self.data = MVTecCategory(folder, split, 256, 224, resample="bilinear",
                                  cache_dir=cache_dir)
        self.count = count or len(self.data)
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        item = self.data[index % len(self.data)]
        return {"image": (item["image"].float() / 255 - self.mean) / self.std,
                "mask": item["mask"].float(), "is_anomaly": item["label"]}


def batchnorm(args) -> str:
    """Which BatchNorm statistics both sides ran with, for the report."""
    return "the weights' own" if args.official_eval_first else "after the official probe"


def official(args, device: torch.device) -> dict:
    sys.path.insert(0, str(args.official_src))
    import patchcore.common
    import patchcore.patchcore
    import patchcore.sampler
    import patchcore.utils
    from sklearn.metrics import roc_auc_score
    import torchvision

    # exactly as its run script calls it: the device lands in with_torch, and with_cuda's
    # default also sets cudnn.deterministic, which this side's GPU timing then includes
    patchcore.utils.fix_seeds(args.seed, device)
    backbone = getattr(torchvision.models, args.backbone)()
    backbone.load_state_dict(torch.load(args.weights, map_location="cpu"), strict=False)
    backbone.name = args.backbone
    if args.official_eval_first:
        # in eval mode before load(), whose shape probe would otherwise move the BatchNorm
        # statistics, as the official run script's does (models.backbone.FeatureExtractor's
        # bn_probe says how): the official side then computes the weights' own features
        backbone.eval()
    model = patchcore.patchcore.PatchCore(device)
    model.load(backbone=backbone, layers_to_extract_from=OFFICIAL_LAYERS[args.backbone],
               device=device, input_shape=(3, 224, 224), pretrain_embed_dimension=1024,
               target_embed_dimension=1024, patchsize=3, anomaly_score_num_nn=1,
               featuresampler=patchcore.sampler.ApproximateGreedyCoresetSampler(args.coreset,
                                                                                device),
               nn_method=patchcore.common.FaissNN(args.official_faiss_gpu, args.workers))
    folder = Path(args.data_root) / args.category
    cache = cache_dir(args)

    def loader(split, count=None):
        return torch.utils.data.DataLoader(OfficialSplit(folder, split, cache, count),
                                           batch_size=args.batch_size, num_workers=args.workers)
    start = time.perf_counter()
    model.fit(loader("train", args.train_images))
    fit = time.perf_counter() - start
    start = time.perf_counter()
    scores, masks, labels, masks_gt = model.predict(loader("test"))
    test = time.perf_counter() - start
    masks_gt = np.array(masks_gt)[:, 0] > 0.5
    return {"fit_seconds": fit, "test_seconds": test, "batchnorm": batchnorm(args),
            "image_auroc": float(roc_auc_score(labels, scores)),
            "pixel_auroc": float(roc_auc_score(masks_gt.ravel(), np.array(masks).ravel()))}


def this_project(args, device: torch.device) -> dict:
    out = Path(args.work_dir) / "this_project"
    shutil.rmtree(out, ignore_errors=True)  # an earlier run there would be moved aside, timed
    start = time.perf_counter()
    payload = pipeline.run(resolve_config(
        backbone=args.backbone, weights=args.weights, data_root=args.data_root,
        categories=[args.category], method_settings={"coreset_fraction": args.coreset},
        device=str(device), cache_dir=cache_dir(args), result_dir=out, plots=0,
        progress=False, batch_size=args.batch_size, seed=args.seed,
        official_bn_probe=not args.official_eval_first))
    metrics = payload["categories"][args.category]
    return {"fit_seconds": metrics["fit_seconds"], "test_seconds": metrics["test_seconds"],
            "wall_seconds": time.perf_counter() - start, "batchnorm": batchnorm(args),
            "image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-src", type=Path, required=True,
                        help="the src folder of a patchcore-inspection checkout")
    parser.add_argument("--backbone", default="wide_resnet50_2", choices=sorted(OFFICIAL_LAYERS))
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "mvtec")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--train-images", type=int, default=None,
                        help="official side: resample train to this many images (default: all); "
                             "this project's side always uses the category as it is")
    parser.add_argument("--seed", type=int, default=0,
                        help="both sides' seed (the coreset's random projection and start)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--official-faiss-gpu", action="store_true")
    parser.add_argument("--official-eval-first", action="store_true",
                        help="put the backbone in eval mode before the official load(), whose "
                             "shape probe otherwise updates its BatchNorm statistics, and run "
                             "this project without --official-bn-probe: both sides then use the "
                             "weights' own statistics (default: both as the official run "
                             "script leaves them)")
    parser.add_argument("--only", choices=("official", "this"), default=None)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/official_side_by_side"))
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.only != "this" and not (args.official_src / "patchcore" / "__init__.py").is_file():
        parser.error(f"--official-src {args.official_src} holds no patchcore package; give the "
                     "src folder of a patchcore-inspection checkout")
    device = torch.device(args.device)
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "config": {k: str(v) for k, v in vars(args).items()}}
    # Both sides read the same crops from a decode cache filled before either is timed.
    for split in ("train", "test"):
        data = OfficialSplit(Path(args.data_root) / args.category, split, cache_dir(args)).data
        for index in range(len(data)):
            data.ensure_cached(index)
    for side, function in (("this", this_project), ("official", official)):
        if args.only in (None, side):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            result[side] = function(args, device)
            if device.type == "cuda":
                result[side]["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            print(side, json.dumps(result[side]), flush=True)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if "this" in result and "official" in result:
        result["fit_ratio_official_over_this"] = (result["official"]["fit_seconds"]
                                                  / result["this"]["fit_seconds"])
        print(f"fit: official {result['official']['fit_seconds']:.1f} s, this project "
              f"{result['this']['fit_seconds']:.1f} s: {result['fit_ratio_official_over_this']:.1f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # bad input (a weights file, a data folder): one line, as main.py
        # named by this script's flags where it has the setting; custom data is main.py's
        names = flag_names(build_parser(), sys.argv[1:])
        names.update(categories="--category", custom="main.py --custom")
        print(f"error: {error.render(names)}", file=sys.stderr)
        sys.exit(2)

"""Shared fixtures: tiny synthetic MVTec-layout data, randomly initialised backbone weights, and the
real data in ../shared (tests that need it skip with the reason when it is absent)."""
import contextlib
import signal
from pathlib import Path

import pytest
import torch
import torchvision

from datasets.synthetic import make_category

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BOTTLE = SHARED / "mvtec" / "bottle"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"


@contextlib.contextmanager
def interrupted_after(seconds: int):
    """The block, stopped by KeyboardInterrupt after ``seconds``: a regression that hangs (a
    greedy that never ends) fails its test rather than holding CI to its limit."""
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Two categories of 64x64 images: 'cubes' (RGB) and 'grid' (grayscale, nested defect types)."""
    root = tmp_path_factory.mktemp("synthetic_mvtec")
    make_category(root, "cubes", n_train=12, n_test_good=4, size=64, seed=1)
    make_category(root, "grid", n_train=12, n_test_good=4, size=64, grayscale=True, seed=2,
                  defects={"bent/left": 3, "bent/right": 3, "scratch": 3})
    return root


@pytest.fixture(scope="session")
def resnet18_weights(tmp_path_factory) -> Path:
    """A seeded random resnet18 state dict: real architecture, no download."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18_random.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def real_bottle() -> Path:
    if not (BOTTLE / "train" / "good").is_dir() or not MOBILENET_WEIGHTS.is_file():
        pytest.skip(f"real MVTec bottle or MobileNetV2 weights not found under {SHARED} "
                    "(they live beside the repository in ../shared)")
    return BOTTLE


def run_cli(args) -> int:
    """main.py in this process with quiet progress and no loader workers; returns its exit code."""
    import main
    return main.main([str(a) for a in args] + ["--no-progress", "--workers", "0"])


def fit_on_synthetic(tmp_path, weights, model_class, size=96, precision="fp32", **kwargs):
    """Fit ``model_class`` on a synthetic category; return it and one batch of all test images."""
    from datasets import MVTecCategory
    from datasets.loader import ImageBatches
    from models.backbone import FeatureExtractor, stage_names

    make_category(tmp_path, "part", n_train=10, n_test_good=3, defects={"blob": 3}, size=size,
                  seed=5)
    # a model choosing its stages (PatchCore's ``layers``) gets an extractor tapping them
    extractor = FeatureExtractor("resnet18", stage_names(kwargs.get("layers", model_class.layers)),
                                 weights=weights, precision=precision)
    model = model_class(extractor, **kwargs)
    train = MVTecCategory(tmp_path / "part", "train", resize=size, crop=size)
    model.fit(ImageBatches(train, batch_size=4, workers=0))
    test = MVTecCategory(tmp_path / "part", "test", resize=size, crop=size)
    batch = next(iter(torch.utils.data.DataLoader(test, batch_size=len(test))))
    return model, batch


def assert_planted_defects_found(model, batch, tolerance_px=8):
    """Every defective image outscores every normal one, and each map peaks on its planted blob."""
    image_scores, maps = model.predict(batch["image"])
    size = batch["image"].shape[-1]
    maps = maps.numpy()
    labels = batch["label"].numpy()
    assert image_scores[labels == 1].min() > image_scores[labels == 0].max()
    for i in labels.nonzero()[0]:
        ys, xs = batch["mask"][i, 0].numpy().nonzero()
        peak_y, peak_x = divmod(int(maps[i].argmax()), size)
        # within one layer2 feature cell (8 px) of the blob
        assert min(abs(ys - peak_y) + abs(xs - peak_x)) <= tolerance_px, (i, peak_y, peak_x)


# Float tolerances for results that are the same arithmetic in another order. A different batch
# size or thread count makes BLAS/oneDNN block the sums differently, so such results agree only
# up to float32 rounding -- and how much rounding survives depends on the quantity:
FLOAT32_EPS = torch.finfo(torch.float32).eps


def assert_distances_close(actual, expected, squared_norm_bound, ulps=64):
    """kNN distances computed under another batching. Every backend (faiss's BLAS path, the torch
    path) expands ||q - b||^2 = ||q||^2 - 2 q.b + ||b||^2 in float32, so each squared distance
    carries an error of a few ulps of ||q||^2 + ||b||^2 (``squared_norm_bound``), whatever the
    distance itself: near-duplicates lose most of their digits to the cancellation. Compared as
    squares with that absolute bound (``ulps`` covers the 2-3 roundings of a dot product summed
    over up to 1024 terms in blocks of another size)."""
    tolerance = ulps * FLOAT32_EPS * float(squared_norm_bound)
    torch.testing.assert_close(torch.as_tensor(actual).double().square(),
                               torch.as_tensor(expected).double().square(),
                               rtol=0, atol=tolerance)


def assert_features_close(actual, expected, relative=1e-5):
    """Feature maps of the same network computed in another way (BatchNorm folded, channels_last,
    another batch): each value is a sum over C*k*k products accumulated in another order, so it
    agrees to float32 rounding of the map's largest magnitude, not of the value itself."""
    scale = expected.abs().max()
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=relative)

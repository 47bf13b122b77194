"""Shared fixtures: tiny synthetic MVTec-layout data, randomly initialised backbone weights, and the
real data in ../shared (tests that need it skip with the reason when it is absent)."""
from pathlib import Path

import pytest
import torch
import torchvision

from datasets.synthetic import make_category

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BOTTLE = SHARED / "mvtec" / "bottle"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"


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

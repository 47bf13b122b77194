"""SPADE and PaDiM: planted defects found at the right place; PaDiM's Gaussian is what it claims."""
import json

import pytest
import torch

import main
from models.padim import PaDiM
from models.spade import SPADE
from tests.conftest import assert_planted_defects_found, fit_on_synthetic


@pytest.mark.parametrize("k", [1, 5])
def test_spade_finds_planted_defects(tmp_path, resnet18_weights, k):
    model, batch = fit_on_synthetic(tmp_path, resnet18_weights, SPADE, k=k)
    assert model.memory_summary() == {"gallery_images": 10}
    assert_planted_defects_found(model, batch)


def test_padim_finds_planted_defects(tmp_path, resnet18_weights):
    model, batch = fit_on_synthetic(tmp_path, resnet18_weights, PaDiM, dims=100)
    assert_planted_defects_found(model, batch)


def test_padim_on_other_stages_takes_their_grid_and_channels(tmp_path, resnet18_weights):
    """2+3: the grid is layer2's (stride 8) and the channels drawn from 128 + 256."""
    model, batch = fit_on_synthetic(tmp_path, resnet18_weights, PaDiM, layers="2+3")
    assert model.layers == ("layer2", "layer3") and model.dims == 100
    assert max(model.channel_subset.tolist()) < 128 + 256
    embedding, grid = model.embed(batch["image"][:1])
    assert grid == (96 // 8, 96 // 8) and embedding.shape == (1, 144, 100)
    assert_planted_defects_found(model, batch)
    from models.backbone import FeatureExtractor
    from utils.errors import SettingError
    extractor = FeatureExtractor("resnet18", PaDiM.layers, weights=resnet18_weights)
    with pytest.raises(SettingError, match=r"^dims 100 is larger than the 64 channels of "
                                           r"resnet18 layer1; use at most 64$"):
        PaDiM(extractor, dims=100, layers="1")


def test_padim_distance_is_mahalanobis_of_the_training_gaussian(tmp_path, resnet18_weights):
    """Recompute one position's score from scratch in float64: mean, sample covariance + eps*I."""
    model, batch = fit_on_synthetic(tmp_path, resnet18_weights, PaDiM, size=64, dims=20, eps=0.01)
    from datasets import MVTecCategory
    train = MVTecCategory(tmp_path / "part", "train", resize=64, crop=64)
    train_images = torch.stack([train[i]["image"] for i in range(len(train))])
    train_embedding, _ = model.embed(train_images)
    test_embedding, (h, w) = model.embed(batch["image"][:1])
    position = 3 * w + 5
    x = train_embedding[:, position].double()
    covariance = torch.cov(x.T) + 0.01 * torch.eye(20, dtype=torch.float64)
    diff = test_embedding[0, position].double() - x.mean(0)
    expected = torch.sqrt(diff @ torch.linalg.solve(covariance, diff))
    _, grid = model.score_patches(batch["image"][:1])
    assert grid[0, 3, 5].item() == pytest.approx(expected.item(), rel=1e-3)


def test_a_setting_of_another_method_is_refused_not_ignored(tmp_path, capsys):
    assert main.main(["--method", "padim", "--coreset", "0.1", "--result-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: --coreset 0.1 is not a setting of --method padim; "
                                       "it is one of patchcore, sa_patchcore\n")


def test_padim_channel_subset_follows_the_seed(resnet18_weights):
    from models.backbone import FeatureExtractor
    extractor = FeatureExtractor("resnet18", PaDiM.layers, weights=resnet18_weights)
    a, b = (PaDiM(extractor, dims=50, seed=0).channel_subset for _ in range(2))
    c = PaDiM(extractor, dims=50, seed=1).channel_subset
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(a.tolist())) == 50 and max(a.tolist()) < 64 + 128 + 256


METHOD_FLAGS = {"spade": ["--k", "3"], "padim": [], "sa_patchcore": ["--coreset", "0.5"]}


@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_cli_end_to_end(method, tmp_path, synthetic_root, resnet18_weights):
    out = tmp_path / "r"
    code = main.main(["--method", method, "--backbone", "resnet18", "--weights",
                      str(resnet18_weights), "--data-root", str(synthetic_root), "--custom",
                      "--categories", "cubes", "--resize", "64", "--crop", "64",
                      *METHOD_FLAGS[method],
                      "--result-dir", str(out), "--no-progress", "--workers", "0", "--plots", "1"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method
    cubes = metrics["categories"]["cubes"]
    # SA-PatchCore's layer3 context is a 4x4 grid at 64 px, repeated over layer2's cells: coarser
    pixel_floor = 0.75 if method == "sa_patchcore" else 0.8
    assert cubes["pixel_auroc"] > pixel_floor and cubes["image_auroc"] > 0.7, cubes
    assert (out / "roc_curve.png").is_file() and (out / "pred_dist" / "cubes.png").is_file()
    assert (out / "localization" / "cubes" / "blob_000.png").is_file()

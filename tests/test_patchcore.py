"""PatchCore: the fast patch embedding equals the reference one; scoring finds a planted defect."""
import torch
import torch.nn.functional as F

from models.patchcore import (LocallyAwarePatchEmbedding, PatchCore, adaptive_pool_matrix,
                              reference_patch_embedding)
from tests.conftest import assert_planted_defects_found, fit_on_synthetic


def test_pool_matrix_matches_adaptive_pooling():
    x = torch.randn(5, 37)
    for out_dim in (8, 37, 100):
        expected = F.adaptive_avg_pool1d(x[:, None], out_dim)[:, 0]
        torch.testing.assert_close(x @ adaptive_pool_matrix(37, out_dim), expected)


def test_banded_embedding_equals_the_reference_unfold_and_pool():
    torch.manual_seed(0)
    # channel counts below and above embed_dim/9, odd grid sizes, a 2x coarser second layer;
    # 64 dims from 24*9 and 40*9: runs of several entries straddling channels, 300: runs of 1-2
    maps = [torch.randn(2, 24, 14, 10), torch.randn(2, 40, 7, 5)]
    for embed_dim in (64, 300):
        ours = LocallyAwarePatchEmbedding([24, 40], embed_dim)(maps)
        torch.testing.assert_close(ours, reference_patch_embedding(maps, embed_dim),
                                   rtol=1e-4, atol=1e-5)
    # three layers: 3*embed_dim does not split evenly, so boundary outputs mix two layers; and
    # WideResNet's case, where every run is exactly whole channels (C*9 a multiple of embed_dim)
    maps = [torch.randn(1, 16, 8, 8), torch.randn(1, 32, 4, 4), torch.randn(1, 64, 2, 2)]
    for embed_dim in (100, 16 * 9 // 3):
        ours = LocallyAwarePatchEmbedding([16, 32, 64], embed_dim)(maps)
        torch.testing.assert_close(ours, reference_patch_embedding(maps, embed_dim),
                                   rtol=1e-4, atol=1e-5)


def test_planted_defect_scores_highest_at_the_right_place(tmp_path, resnet18_weights):
    model, batch = fit_on_synthetic(tmp_path, resnet18_weights, PatchCore, coreset_fraction=0.25)
    assert_planted_defects_found(model, batch)


def test_reweighting_keeps_ranking_and_only_shrinks_scores(tmp_path, resnet18_weights):
    model, batch = fit_on_synthetic(tmp_path, resnet18_weights, PatchCore, coreset_fraction=0.25)
    plain, _ = model.predict(batch["image"])
    model.reweight = 5
    weighted, _ = model.predict(batch["image"])
    assert torch.all(weighted <= plain + 1e-6) and torch.all(weighted > 0)
    labels = batch["label"]
    assert weighted[labels == 1].min() > weighted[labels == 0].max()


def test_half_precision_forward_ranks_like_fp32(tmp_path, resnet18_weights):
    """bf16 and fp16 autocast (the GPU default) must not change which images and pixels are the
    most anomalous: same image ranking, near-identical patch scores."""
    from scipy.stats import spearmanr

    from utils.metrics import image_auroc

    results = {}
    for precision in ("fp32", "bf16", "fp16"):
        torch.manual_seed(0)
        model, batch = fit_on_synthetic(tmp_path / precision, resnet18_weights, PatchCore,
                                        precision=precision, coreset_fraction=0.25)
        results[precision] = model.predict(batch["image"])
    labels = batch["label"].numpy()
    reference_scores, reference_grid = results["fp32"]
    for precision in ("bf16", "fp16"):
        scores, grid = results[precision]
        assert not torch.equal(scores, reference_scores), "autocast was not applied"
        assert spearmanr(scores, reference_scores).statistic > 0.95, precision
        assert image_auroc(labels, scores.numpy()) == image_auroc(labels, reference_scores.numpy())
        assert spearmanr(grid.flatten(), reference_grid.flatten()).statistic > 0.98, precision

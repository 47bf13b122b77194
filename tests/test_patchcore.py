"""PatchCore: the patch embedding equals the official formulation; scoring finds a planted defect."""
import torch
import torch.nn.functional as F

from models.patchcore import LocallyAwarePatchEmbedding, adaptive_pool_matrix


def official_patch_features(feature_maps, embed_dim):
    """The official code's steps written out literally: unfold 3x3, resize the unfolded grid,
    adaptive-pool each layer's C*9 vector, concatenate, pool again."""
    grid = feature_maps[0].shape[-2:]
    pooled = []
    for fmap in feature_maps:
        b, c, h, w = fmap.shape
        unfolded = F.unfold(fmap, kernel_size=3, padding=1).reshape(b, c * 9, h, w)
        if (h, w) != tuple(grid):
            unfolded = F.interpolate(unfolded, size=grid, mode="bilinear", align_corners=False)
        vectors = unfolded.permute(0, 2, 3, 1).reshape(-1, 1, c * 9)
        pooled.append(F.adaptive_avg_pool1d(vectors, embed_dim))
    joined = F.adaptive_avg_pool1d(torch.cat(pooled, dim=2), embed_dim)
    return joined.reshape(feature_maps[0].shape[0], *grid, embed_dim)


def test_pool_matrix_matches_adaptive_pooling():
    x = torch.randn(5, 37)
    for out_dim in (8, 37, 100):
        expected = F.adaptive_avg_pool1d(x[:, None], out_dim)[:, 0]
        torch.testing.assert_close(x @ adaptive_pool_matrix(37, out_dim), expected)


def test_conv_embedding_equals_official_unfold_and_pool():
    torch.manual_seed(0)
    # channel counts below and above embed_dim/9, odd grid sizes, a 2x coarser second layer
    maps = [torch.randn(2, 24, 14, 10), torch.randn(2, 40, 7, 5)]
    for embed_dim in (64, 300):
        ours = LocallyAwarePatchEmbedding([24, 40], embed_dim)(maps)
        torch.testing.assert_close(ours, official_patch_features(maps, embed_dim),
                                   rtol=1e-4, atol=1e-5)


def _fit_on_synthetic(tmp_path, weights, **kwargs):
    from datasets import MVTecCategory
    from datasets.synthetic import make_category
    from models.backbone import FeatureExtractor
    from models.patchcore import PatchCore

    make_category(tmp_path, "part", n_train=10, n_test_good=3, defects={"blob": 3}, size=96, seed=5)
    extractor = FeatureExtractor("resnet18", PatchCore.layers, weights=weights)
    model = PatchCore(extractor, progress=False, **kwargs)
    train = MVTecCategory(tmp_path / "part", "train", resize=96, crop=96)
    model.fit(torch.utils.data.DataLoader(train, batch_size=4))
    test = MVTecCategory(tmp_path / "part", "test", resize=96, crop=96)
    batch = next(iter(torch.utils.data.DataLoader(test, batch_size=len(test))))
    return model, test, batch


def test_planted_defect_scores_highest_at_the_right_place(tmp_path, resnet18_weights):
    from utils.anomaly_map import anomaly_map

    model, test, batch = _fit_on_synthetic(tmp_path, resnet18_weights, coreset_fraction=0.25)
    image_scores, grid = model.predict(batch["image"])
    labels = batch["label"].numpy()
    assert image_scores[labels == 1].min() > image_scores[labels == 0].max()
    maps = anomaly_map(grid, 96)
    for i in range(len(test)):
        if labels[i]:
            mask = batch["mask"][i, 0].numpy().astype(bool)
            peak = divmod(int(maps[i].argmax()), 96)
            # the map's peak lies on the planted blob (or within one feature cell, 8 px, of it)
            ys, xs = mask.nonzero()
            assert min(abs(ys - peak[0]) + abs(xs - peak[1])) <= 8, (i, peak)


def test_reweighting_keeps_ranking_and_only_shrinks_scores(tmp_path, resnet18_weights):
    model, _, batch = _fit_on_synthetic(tmp_path, resnet18_weights, coreset_fraction=0.25)
    plain, _ = model.predict(batch["image"])
    model.reweight = 5
    weighted, _ = model.predict(batch["image"])
    assert torch.all(weighted <= plain + 1e-6) and torch.all(weighted > 0)
    labels = batch["label"]
    assert weighted[labels == 1].min() > weighted[labels == 0].max()

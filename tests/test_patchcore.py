"""PatchCore: the fast patch embedding equals the reference one; scoring finds a planted defect."""
import pytest
import torch
import torch.nn.functional as F

from models.patchcore import (LocallyAwarePatchEmbedding, PatchCore, adaptive_pool_matrix,
                              reference_patch_embedding)
from models.knn import NearestNeighbours
from tests.conftest import assert_distances_close, assert_planted_defects_found, fit_on_synthetic


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


@pytest.mark.parametrize("patch_size", [1, 5])
def test_banded_embedding_equals_the_reference_at_other_neighbourhood_sizes(patch_size):
    torch.manual_seed(0)
    maps = [torch.randn(2, 24, 14, 10), torch.randn(2, 40, 7, 5)]
    for embed_dim in (64, 300):
        ours = LocallyAwarePatchEmbedding([24, 40], embed_dim, patch_size)(maps)
        torch.testing.assert_close(ours, reference_patch_embedding(maps, embed_dim, patch_size),
                                   rtol=1e-4, atol=1e-5)


def test_a_one_by_one_neighbourhood_of_one_stage_is_the_feature_itself():
    """p = 1 aggregates nothing: with one stage and as many dims as channels, both poolings are
    the identity -- what the reference's p must mean."""
    feature_map = torch.randn(2, 32, 6, 5)
    expected = feature_map.permute(0, 2, 3, 1)
    torch.testing.assert_close(reference_patch_embedding([feature_map], 32, patch_size=1), expected)
    torch.testing.assert_close(LocallyAwarePatchEmbedding([32], 32, patch_size=1)([feature_map]),
                               expected)


def test_other_stages_and_neighbourhoods_still_find_planted_defects(tmp_path, resnet18_weights):
    """1+2+3: the patch grid is layer1's (stride 4), and a 5 x 5 neighbourhood on every stage."""
    model, batch = fit_on_synthetic(tmp_path, resnet18_weights, PatchCore, coreset_fraction=0.25,
                                    layers="1+2+3", patch_size=5)
    assert model.layers == ("layer1", "layer2", "layer3")
    assert model.embed(batch["image"][:1]).shape[1:3] == (96 // 4, 96 // 4)
    assert_planted_defects_found(model, batch)


def test_stages_the_extractor_does_not_tap_or_an_even_patch_are_named(resnet18_weights):
    from models.backbone import FeatureExtractor
    from utils.errors import SettingError
    extractor = FeatureExtractor("resnet18", PatchCore.layers, weights=resnet18_weights)
    with pytest.raises(SettingError, match=r"^layers 1\+2 reads layer1, which the feature "
                                           r"extractor does not tap \(layer2, layer3\)"):
        PatchCore(extractor, layers="1+2")
    with pytest.raises(SettingError, match=r"^patch_size 4 must be odd"):
        PatchCore(extractor, patch_size=4)


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


def test_sharded_coreset_is_the_union_of_each_shards_greedy(tmp_path, resnet18_weights, caplog):
    """Above ``coreset_shard_size`` the bank is, shard by shard in data order, exactly the greedy
    coreset of that shard's patches (seed + shard index); below it, the global greedy."""
    from datasets import MVTecCategory
    from datasets.loader import ImageBatches
    from models.coreset import reference_greedy_coreset

    model, _ = fit_on_synthetic(tmp_path, resnet18_weights, PatchCore, size=64,
                                coreset_fraction=0.25)
    train = MVTecCategory(tmp_path / "part", "train", resize=64, crop=64)
    images = torch.stack([train[i]["image"] for i in range(len(train))])
    patches = model.embed(images).reshape(len(train), 64, -1)  # 10 images x 8x8 patches
    assert torch.equal(model.memory_bank,
                       patches.flatten(0, 1)[reference_greedy_coreset(patches.flatten(0, 1), 0.25)])
    assert "shards" not in caplog.text

    sharded = PatchCore(model.extractor, coreset_fraction=0.25, coreset_shard_size=4 * 64)
    sharded.fit(ImageBatches(train, batch_size=3, workers=0))  # batches straddle shards
    assert "640 training patches in 10 images: greedy coreset on 3 shards of 4 images" in caplog.text
    expected, origins = [], []
    for shard, (first, end) in enumerate(((0, 4), (4, 8), (8, 10))):
        rows = patches[first:end].flatten(0, 1)
        picks = reference_greedy_coreset(rows, 0.25, seed=shard)
        expected.append(rows[picks])
        origins += [first + int(p) // 64 for p in picks]
    torch.testing.assert_close(sharded.memory_bank, torch.cat(expected))
    assert sharded.provenance[:, 0].tolist() == origins
    assert len(sharded.memory_bank) == 64 + 64 + 32


@pytest.mark.parametrize("index", ["flat-fp16", "ivf-flat", "hnsw"])
def test_an_approximate_index_reports_its_recall_against_exact_search(index, tmp_path,
                                                                      resnet18_weights):
    """Off by default; when chosen, recall@1 is measured against the exact search, and scores
    stay close enough to rank the planted defects."""
    model, batch = fit_on_synthetic(tmp_path, resnet18_weights, PatchCore, size=64,
                                    coreset_fraction=1.0, knn_index=index)
    assert PatchCore.defaults()["knn_index"] == "flat"
    quality = model.search_quality(batch["image"])
    assert quality["index"] == index and quality["queries"] == len(batch["image"]) * 64
    queries, bank = model.embed(batch["image"]).flatten(0, 2), model.memory_bank
    found = model.knn.search(queries, 1)[1][:, 0]
    exact = NearestNeighbours("cpu").fit(bank).search(queries, 1)[1][:, 0]
    assert quality["recall_at_1"] == pytest.approx(float((found == exact).float().mean()))
    assert 0.5 < quality["recall_at_1"] <= 1.0
    excess = ((bank[found] - queries).norm(dim=1) / (bank[exact] - queries).norm(dim=1) - 1)
    excess[found == exact] = 0
    assert quality["distance_excess_max"] == pytest.approx(float(excess.max()), rel=1e-4, abs=1e-6)
    assert quality["distance_excess_mean"] == pytest.approx(float(excess.mean()), rel=1e-4,
                                                            abs=1e-6)


def test_an_hnsw_graph_keeps_clusters_of_near_duplicates_linked():
    """A bank of tight clusters, as PatchCore's is (thousands of near-identical background
    patches): built with faiss's default effort, this HNSW graph sent some queries into another
    cluster, to a row 19 times farther than the nearest -- an image score, a maximum over
    patches, would take that whole. Every query must find a row of its own cluster."""
    generator = torch.Generator().manual_seed(2)
    centres = torch.randn(200, 128, generator=generator)
    bank = centres.repeat_interleave(50, 0) + 0.05 * torch.randn(10_000, 128, generator=generator)
    queries = centres[torch.randint(0, 200, (2000,), generator=generator)] \
        + 0.05 * torch.randn(2000, 128, generator=generator)
    quality = NearestNeighbours("cpu", index="hnsw").fit(bank).search_quality(queries)
    assert quality["distance_excess_max"] < 0.05, quality
    assert quality["recall_at_1"] > 0.99
    exact = NearestNeighbours("cpu").fit(bank).search_quality(queries)
    assert exact == {"recall_at_1": 1.0, "distance_excess_mean": 0.0, "distance_excess_max": 0.0}


def test_exact_search_on_a_cpu_is_faiss_flat_index_search():
    """The exact search a CPU run uses (torch blocks of query x bank products) finds what the
    official code's faiss IndexFlatL2 finds: the same neighbours in the same order, the same
    distances to float32 rounding, also over several tiles of queries and of bank rows (the
    last ones partial, and one of them smaller than k)."""
    import faiss

    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(2000, 64, generator=generator)
    query = torch.cat([bank[:300] + 0.05 * torch.randn(300, 64, generator=generator),
                       torch.randn(500, 64, generator=generator)])
    reference = faiss.IndexFlatL2(64)
    reference.add(bank.numpy())
    # 97-row tiles: 9 of queries, 21 of bank rows (the last of 60); 1995: a last tile of 5 rows
    for tile, k in ((97, 1), (97, 5), (1995, 8), (None, 5)):
        search = NearestNeighbours("cpu", tile=tile).fit(bank)
        assert search.backend == "torch"
        squared, indices = reference.search(query.numpy(), k)
        distances, found = search.search(query, k)
        assert torch.equal(found, torch.from_numpy(indices))
        assert_distances_close(distances, torch.from_numpy(squared).clamp(min=0).sqrt(),
                               squared_norm_bound=(query.square().sum(1).max()
                                                   + bank.square().sum(1).max()))


def test_float16_search_with_float32_rerank_finds_the_exact_neighbours():
    """flat-fp16 must return the true nearest rows and their distances on rows with a large common
    offset (as post-ReLU features have): float16 products of them would overflow (1024 x 100^2 >
    65504) and round every distance away without the centring, and without the float32 re-rank
    near neighbours would be ordered by rounding. The truth is summed squared differences (the
    expanded ||a||^2 - 2ab + ||b||^2 of an exact float32 search itself loses some of these)."""
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(3000, 1024, generator=generator) + 100
    query = torch.cat([bank[:400] + 0.1 * torch.randn(400, 1024, generator=generator),
                       torch.randn(200, 1024, generator=generator) + 100])
    truth = torch.stack([(bank - q).square().sum(1) for q in query]).sqrt()
    truth_d, truth_i = truth.topk(5, dim=1, largest=False)
    half = NearestNeighbours("cpu", index="flat-fp16").fit(bank)
    for k in (1, 5):
        half_d, half_i = half.search(query, k)
        assert torch.equal(half_i, truth_i[:, :k])
        torch.testing.assert_close(half_d, truth_d[:, :k], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("index", ["flat", "flat-fp16", "ivf-flat", "hnsw"])
def test_nan_in_the_bank_or_the_searched_features_is_refused(index):
    """faiss's k-means stopped on a NaN bank with a C++ traceback, and its HNSW graph searched
    one without a word, returning the largest float as a distance: AUROC 0.5 that looked real."""
    from utils.errors import UserError

    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(2000, 32, generator=g), torch.randn(50, 32, generator=g)
    broken = bank.clone()
    broken[7, 3] = float("nan")
    with pytest.raises(UserError, match="^the memory bank's features hold NaN or infinite"):
        NearestNeighbours("cpu", index=index).fit(broken)
    search = NearestNeighbours("cpu", index=index).fit(bank)
    queries[4, 0] = float("inf")
    if index in ("ivf-flat", "hnsw"):  # a flat search's distances come out NaN or inf instead
        with pytest.raises(UserError, match="^the features searched hold NaN or infinite"):
            search.search(queries, 1)
    else:
        assert not torch.isfinite(search.search(queries, 1)[0][4]).all()

"""Metrics against values worked out by hand (and sklearn where it defines the metric)."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from utils.metrics import (f1_optimal_threshold, image_auroc, image_auroc_per_defect_type,
                           pixel_metrics)


def test_image_auroc_by_hand_and_undefined_for_one_class():
    # pairs (defective, good): (0.9,0.5) (0.9,0.1) (0.4,0.5) (0.4,0.1) -> 3 of 4 ordered right
    assert image_auroc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == pytest.approx(0.75)
    assert image_auroc([0, 0, 0], [0.1, 0.2, 0.3]) is None


def test_image_auroc_per_defect_type_by_hand():
    types = ["good", "dent", "good", "scratch", "dent", "good", "scratch"]
    labels = [0, 1, 0, 1, 1, 0, 1]
    scores = [1.0, 4.0, 2.0, 0.0, 5.0, 3.0, 2.5]
    result = image_auroc_per_defect_type(types, labels, scores)
    assert list(result) == ["dent", "scratch"]
    # dent (4, 5) beats every good (1, 2, 3); scratch 0 beats none, 2.5 beats 1 and 2: 2 of 6
    assert result["dent"] == {"n_images": 2, "image_auroc": pytest.approx(1.0)}
    assert result["scratch"] == {"n_images": 2, "image_auroc": pytest.approx(2 / 6)}
    assert image_auroc_per_defect_type(["dent", "dent"], [1, 1], [1.0, 2.0]) == {
        "dent": {"n_images": 2, "image_auroc": None}}


def test_f1_max_by_hand():
    # thresholds 0.9: P=1 R=.5 F1=.667 | 0.5: .5/.5/.5 | 0.4: P=2/3 R=1 F1=.8 | 0.1: .5/1/.667
    f1, threshold = f1_optimal_threshold(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.5, 0.1]))
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.4)


def test_pixel_auroc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 16, 16)) > 0.8
    maps = np.round(rng.random((3, 16, 16)) + masks * 0.3, 1)  # rounding makes many ties
    ours = pixel_metrics(masks, maps)["pixel_auroc"]
    assert ours == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_float32_maps_sorted_as_packed_keys_give_what_an_argsort_gives():
    """On the CPU float32 maps are sorted as 64-bit keys (score bits above region number); float64
    maps take the argsort. Same maps both ways, with ties, negative scores and -0.0 beside +0.0
    (one threshold): every metric equal, and pixel AUROC sklearn's."""
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 24, 24), bool)
    masks[0, 2:6, 3:9] = masks[2, 10:20, 10:12] = masks[2, 0:2, 20:24] = masks[3, 5, 5] = True
    maps = (np.round(rng.normal(size=masks.shape), 1) + masks * 0.7).astype(np.float32)
    maps[3, 5, 5] = -0.0  # a defect pixel tied with normal ones at +0.0: one diagonal ROC step
    maps[3, 0, :4] = 0.0
    maps[1, :4] = -0.0
    packed = pixel_metrics(masks, maps)
    argsorted = pixel_metrics(masks, maps.astype(np.float64))
    for key in ("pixel_auroc", "pixel_aupro", "pixel_f1_max", "pixel_threshold"):
        assert packed[key] == pytest.approx(argsorted[key], rel=1e-12, abs=1e-15), key
    for ours, theirs in zip(packed["pixel_roc"], argsorted["pixel_roc"]):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    assert packed["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()),
                                                  abs=1e-12)


def test_aupro_perfect_and_inverted():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 5:7, 4:8] = True
    assert pixel_metrics(masks, masks.astype(float))["pixel_aupro"] == pytest.approx(1.0)
    assert pixel_metrics(masks, 1.0 - masks)["pixel_aupro"] == pytest.approx(0.0)


def test_aupro_averages_regions_not_pixels():
    """Region A (1 px) found before any false positive, region B (3 px) only after all of them:
    PRO is 1/2 over the whole FPR range (a pixel-weighted TPR would give 1/4)."""
    masks = np.zeros((1, 10, 10), bool)
    masks[0, 0, 0] = True            # region A
    masks[0, 5, 5:8] = True          # region B, not touching A
    maps = np.full((1, 10, 10), 0.5)
    maps[0, 0, 0] = 1.0
    maps[0, 5, 5:8] = 0.0
    result = pixel_metrics(masks, maps)
    assert result["pixel_aupro"] == pytest.approx(0.5)


def test_aupro_interpolates_at_the_fpr_limit():
    """1 region of 1 pixel, 9 normal pixels: the region is found once 6 of 9 normal pixels
    (FPR 2/3) are above threshold, so PRO is 0 on [0, 0.3] and AUPRO is 0; with limit 1.0 the area
    is the part after FPR 2/3 (rectangle of 1/3) plus the vertical jump (0 area) = 1/3."""
    masks = np.zeros((1, 1, 10), bool)
    masks[0, 0, 0] = True
    maps = np.array([[[0.35, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.2, 0.1]]])
    assert pixel_metrics(masks, maps)["pixel_aupro"] == pytest.approx(0.0)
    assert pixel_metrics(masks, maps, fpr_limit=1.0)["pixel_aupro"] == pytest.approx(1 / 3)


def test_pixel_metrics_absent_without_defect_pixels():
    result = pixel_metrics(np.zeros((2, 4, 4), bool), np.random.rand(2, 4, 4))
    assert result["pixel_auroc"] is None and result["pixel_aupro"] is None


@pytest.mark.parametrize("shape", [(3, 224, 224), (2, 33, 70), (1, 10, 7)])
def test_anomaly_map_blur_is_scipys_gaussian_filter(shape):
    """The matrix-product blur must be the official code's scipy filter (truncate 4, 'reflect'),
    also where the kernel radius (16) exceeds the map and the reflection wraps more than once."""
    from scipy import ndimage

    from utils.anomaly_map import gaussian_blur

    maps = np.random.default_rng(sum(shape)).random(shape).astype(np.float32)
    reference = ndimage.gaussian_filter(maps.astype(np.float64), sigma=(0, 4, 4))
    blurred = gaussian_blur(torch.from_numpy(maps), 4.0).numpy()
    assert blurred.dtype == np.float32
    np.testing.assert_allclose(blurred, reference, rtol=0, atol=2e-6 * reference.max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pixel_metrics_on_the_gpu_equal_the_cpus():
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 64, 64), bool)
    masks[1, 10:30, 5:20] = masks[4, 40:60, 40:44] = masks[4, 2:5, 2:5] = True
    maps = (rng.random(masks.shape) + masks * 0.4).astype(np.float32)
    maps[0, :8] = 0.5  # ties across a run of equal scores
    cpu = pixel_metrics(masks, maps)
    gpu = pixel_metrics(masks, maps, device="cuda")
    for key in ("pixel_auroc", "pixel_aupro", "pixel_f1_max", "pixel_threshold"):
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-9, abs=1e-12), key


def test_f1_max_is_not_defined_without_both_classes():
    """With one class only, F1 is 1.0 (every item defective: the lowest score flags all, with no
    false alarm) or 0 at any threshold: the test set's make-up, not the method's, so None as the
    AUROC. Pixel F1 likewise when the masks mark every pixel."""
    scores = np.array([0.9, 0.4, 0.5])
    assert f1_optimal_threshold(np.array([1, 1, 1]), scores) is None
    assert f1_optimal_threshold(np.array([0, 0, 0]), scores) is None
    masks = np.ones((2, 8, 8), dtype=bool)
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    assert pixel_metrics(masks, maps)["pixel_f1_max"] is None

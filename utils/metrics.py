"""Image and pixel metrics of MVTec AD.

All pixel metrics share one descending sort of the scores (4M pixels for bottle at 224):
- pixel AUROC over every test pixel (trapezoidal, identical to sklearn's roc_auc_score);
- AUPRO (Bergmann et al., IJCV 2021, MVTec's evaluation code): per-region overlap averaged over
  connected ground-truth regions (8-connectivity), integrated over FPR up to 0.3 and divided by 0.3;
- F1-max over all thresholds, with the threshold that reaches it.
A metric that is not defined (one class only, no masks) is ``None``, never 0 or NaN.

The sort and the cumulative sums over all pixels run in torch on ``device`` (the GPU's sort of a
category's millions of scores is far cheaper than the CPU's; timings in benchmarks/RESULTS.md). On
the CPU float32 maps are sorted as 64-bit keys that hold a score's bits above its region's number
(``_sorted_with_regions``): one direct sort instead of an argsort and the gathers it needs, which
was most of the metrics' time there.
Sums are float64 on every device.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve

_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def image_auroc_per_defect_type(defect_types, labels, scores) -> dict[str, dict]:
    """Per defect type, its image count and the image AUROC of its images against every normal
    test image (None without normal images): which kinds of defect a method misses, which the
    category's one AUROC hides. Keys in the order the types first appear."""
    types, labels, scores = np.asarray(defect_types), np.asarray(labels), np.asarray(scores)
    normal, defective = labels == 0, labels == 1
    result = {}
    for kind in dict.fromkeys(t for t, bad in zip(defect_types, defective) if bad):
        mine = defective & (types == kind)
        chosen = normal | mine
        result[kind] = {"n_images": int(mine.sum()),
                        "image_auroc": image_auroc(labels[chosen], scores[chosen])}
    return result


def image_roc(labels, scores) -> tuple[np.ndarray, np.ndarray] | None:
    if len(np.unique(labels)) < 2:
        return None
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float] | None:
    """(F1-max, threshold) for image-level decisions ``score >= threshold``."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.float64)
    order, sorted_scores, last = _descending_runs(
        torch.as_tensor(np.asarray(scores, dtype=np.float64)))
    true_pos = torch.cumsum(labels[order], 0)[last]
    return _f1_max(sorted_scores[last], true_pos, (last + 1) - true_pos)


def _descending_runs(scores: torch.Tensor):
    """(order, sorted scores, last): scores sorted descending, and the last index of each run of
    equal scores -- the points where a threshold ``score >= t`` admits all ties at once.

    Only each run's last cumulative sum is ever used, so the order within a run does not matter
    and the sort need not be stable (numpy's default sort is faster than its stable one).
    """
    if scores.device.type == "cpu":
        order = torch.from_numpy(np.argsort(scores.numpy())[::-1].copy())
    else:
        order = torch.sort(scores, descending=True).indices
    sorted_scores = scores[order]
    return order, sorted_scores, _run_ends(sorted_scores)


def _run_ends(sorted_scores: torch.Tensor) -> torch.Tensor:
    """The last index of each run of equal scores in a sorted vector."""
    last = torch.nonzero(sorted_scores[1:] != sorted_scores[:-1])[:, 0]
    return torch.cat([last, last.new_tensor([len(sorted_scores) - 1])])


_SIGN = np.uint32(0x80000000)


def _sorted_with_regions(scores: np.ndarray, regions: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(float32 ``scores`` in descending order, the ``regions`` (int32, >= 0) that go with them).

    A float's bits with every bit but the sign flipped for positives, and only the sign flipped
    for negatives, compare as signed 32-bit integers in the floats' reverse order: positives
    become negative integers, larger ones smaller, and negatives non-negative ones, more negative
    ones larger. With the region's number in the low 32 bits, one ascending sort of the signed
    64-bit keys orders both (within a run of equal scores by region, which no metric depends on:
    only each run's end is used; -0.0 and +0.0 are two keys but adjacent, and runs are found by
    comparing the floats). torch sorts them: in parallel, faster than numpy's sort of the same
    keys (benchmarks/RESULTS.md).
    """
    bits = scores.view(np.uint32)
    high = bits ^ np.where(bits & _SIGN, _SIGN, np.uint32(0xFFFFFFFF))
    keys = high.astype(np.uint64) << np.uint64(32)
    keys |= regions.astype(np.uint64)
    keys = torch.sort(torch.from_numpy(keys.view(np.int64))).values.numpy().view(np.uint64)
    high = (keys >> np.uint64(32)).astype(np.uint32)
    bits = high ^ np.where(high & _SIGN, np.uint32(0xFFFFFFFF), _SIGN)
    return bits.view(np.float32), (keys & np.uint64(0xFFFFFFFF)).astype(np.int32)


def _f1_max(thresholds, true_pos, false_pos):
    """(F1-max, its threshold), or None with one class only: F1 is then 0 at every threshold, or
    1 at the lowest score (all flagged, no false alarm), a number about the test set's make-up,
    not the method (as the AUROC, which is not defined either)."""
    positives = float(true_pos[-1])
    if positives == 0 or float(false_pos[-1]) == 0:
        return None
    precision = true_pos / torch.clamp(true_pos + false_pos, min=1e-12)
    recall = true_pos / positives
    f1 = 2 * precision * recall / torch.clamp(precision + recall, min=1e-12)
    best = int(torch.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def _with_origin(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values.new_zeros(1), values])


def _trapezoid(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def _area_up_to(fpr: torch.Tensor, value: torch.Tensor, limit: float) -> float:
    """Area under value(fpr) from 0 to ``limit``, interpolating linearly at the limit."""
    fpr, value = _with_origin(fpr), _with_origin(value)
    inside = int(torch.count_nonzero(fpr <= limit))  # fpr ascends: the first ``inside`` points
    x, y = fpr[:inside], value[:inside]
    if x[-1] < limit and inside < len(fpr):
        x0, x1, y0, y1 = (float(v) for v in (fpr[inside - 1], fpr[inside], value[inside - 1],
                                             value[inside]))
        y_at = y0 + (y1 - y0) * (limit - x0) / max(x1 - x0, 1e-12)
        x, y = torch.cat([x, x.new_tensor([limit])]), torch.cat([y, y.new_tensor([y_at])])
    return _trapezoid(x, y)


def pixel_metrics(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3,
                  curve_points: int = 512, device: torch.device | str = "cpu") -> dict:
    """masks, maps: [N, H, W]. Returns pixel_auroc, pixel_aupro, pixel_f1_max, threshold, roc curve
    (numpy). ``device``: where the sort and sums over all pixels run."""
    masks = np.asarray(masks).astype(bool)
    result = {"pixel_auroc": None, "pixel_aupro": None, "pixel_f1_max": None,
              "pixel_threshold": None, "pixel_roc": None}
    n_pos = int(masks.sum())
    n_neg = masks.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return result
    scores = np.asarray(maps).ravel()  # float32 maps stay float32: sorting is the cost here
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    # Connected defect regions, numbered across all images (8-connectivity, as MVTec's code).
    regions = np.zeros(masks.shape, dtype=np.int32)
    n_regions = 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        regions[i] = np.where(labelled > 0, labelled + n_regions, 0)
        n_regions += count
    regions = regions.ravel()
    areas = torch.bincount(torch.from_numpy(regions), minlength=n_regions + 1).double().to(device)
    # Each defect pixel counts 1 / (its region's area * number of regions) towards the mean
    # per-region overlap (PRO); background pixels (region 0) count nothing.
    region_weight = torch.cat([areas.new_zeros(1), 1.0 / (areas[1:] * n_regions)])
    # One sort serves all: positives (AUROC/F1), negatives (FPR) and region overlap (PRO).
    if torch.device(device).type == "cpu" and scores.dtype == np.float32:
        sorted_scores, sorted_regions = (torch.from_numpy(a)
                                         for a in _sorted_with_regions(scores, regions))
        last = _run_ends(sorted_scores)
    else:
        order, sorted_scores, last = _descending_runs(torch.from_numpy(scores).to(device))
        sorted_regions = torch.from_numpy(regions).to(device)[order]
    thresholds = sorted_scores[last].double()
    cum_pos = torch.cumsum(sorted_regions > 0, 0)[last].double()
    cum_neg = (last + 1) - cum_pos
    cum_pro = torch.cumsum(region_weight[sorted_regions], 0)[last]
    fpr, tpr = cum_neg / n_neg, cum_pos / n_pos
    result["pixel_auroc"] = _trapezoid(_with_origin(fpr), _with_origin(tpr))
    result["pixel_aupro"] = _area_up_to(fpr, cum_pro, fpr_limit) / fpr_limit
    result["pixel_f1_max"], result["pixel_threshold"] = _f1_max(thresholds, cum_pos, cum_neg)
    keep = torch.unique(torch.linspace(0, len(fpr) - 1, curve_points, dtype=torch.float64).long())
    keep = keep.to(fpr.device)
    result["pixel_roc"] = (np.r_[0.0, fpr[keep].cpu().numpy()], np.r_[0.0, tpr[keep].cpu().numpy()])
    return result

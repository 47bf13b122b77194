"""Published MVTec AD numbers (percent, WideResNet-50) for the "Paper" columns of results.md and
of sweep tables.

Sources, as given in ../shared/paper_tables.md: PatchCore-10 % per category from Roth et al.,
"Towards Total Recall in Industrial Anomaly Detection", CVPR 2022 (Tables 1-2; per-category values
as quoted in the PatchCore-ex README), PRO mean from the same paper; SPADE K = 50 per-category
pixel AUROC and the image-AUROC and PRO means from Cohen & Hoshen 2020 (as quoted in the Wild SPADE
README); PaDiM means from Defard et al., ICPR 2020 (WRN-50, d = 550).
"""
from __future__ import annotations

CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
              "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")


def _table(values: str) -> dict[str, float]:
    return dict(zip(CATEGORIES + ("mean",), map(float, values.split())))


PAPER = {
    "patchcore": {
        "title": "PatchCore-10 %, WRN-50 (Roth et al., CVPR 2022, Tables 1-2)",
        "image_auroc": _table("100.0 99.4 97.8 98.7 97.9 100.0 100.0 100.0 96.0 97.0 98.9 99.7 "
                              "100.0 99.0 99.5 99.0"),
        "pixel_auroc": _table("98.6 98.5 98.9 99.1 98.7 98.7 99.3 98.4 97.6 99.4 95.9 98.7 98.7 "
                              "95.1 98.9 98.1"),
        "pixel_aupro": {"mean": 93.5},
    },
    "spade": {
        "title": "SPADE, K = 50, WRN-50 (Cohen & Hoshen 2020)",
        "image_auroc": {"mean": 85.5},
        "pixel_auroc": _table("98.4 97.2 99.0 97.5 93.7 99.1 97.6 98.1 96.5 98.9 87.4 97.9 94.1 "
                              "88.5 96.5 96.5"),  # mean: the paper's text (the table's 96.0)
        "pixel_aupro": {"mean": 91.7},
    },
    "padim": {
        "title": "PaDiM, WRN-50, d = 550 (Defard et al., ICPR 2020)",
        "image_auroc": {"mean": 95.3}, "pixel_auroc": {"mean": 97.5}, "pixel_aupro": {"mean": 92.1},
    },
}


def paper_value(method: str, metric: str, row: str,
                categories: tuple[str, ...] | list[str] = CATEGORIES) -> float | None:
    """The published percentage for a method's metric in a category row, or in the "mean" row of
    a run of ``categories``: the paper's own mean over all 15, and over fewer the mean of its
    values for them (None where it gives none), since a mean over other categories is another
    number."""
    table = PAPER.get(method, {}).get(metric, {})
    if row != "mean":
        return table.get(row)
    if set(CATEGORIES) <= set(categories):
        return table.get("mean")
    values = [table.get(category) for category in categories]
    return None if not values or None in values else sum(values) / len(values)

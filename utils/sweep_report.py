"""A sweep's top-level outputs: results.md (one table per metric, the seeds' layout), summary.json
(the same numbers) and roc_curve.png (each configuration's mean ROC).

results.md, per metric: one row per category and a mean row; a "Paper" column where a published
number exists (``utils.paper``); one column per configuration, headed like ``k=5``, holding
``mean ± std`` over the seeds (sample standard deviation; a single seed shows its value alone).

summary.json::

    {"method": str, "backbone": str, "dataset": str, "seeds": [int], "paper_title": str | null,
     "configurations": [{"label": str, "settings": {name: value}, "result_dirs": [str]}],
     "environment": the first run's metrics.json "environment" (date, commit, versions, device),
     "metrics": {metric: {row: {"paper": float | null,
                                label: {"mean": float | null, "std": float | null,
                                        "values": [float | null, one per seed]}}}}}

Rows are the categories in run order and "mean"; AUROC, AUPRO and F1 are in percent (as papers
print them), "seconds" is fit + test seconds of a category. Custom data has no Paper column; for
some of MVTec AD's categories the paper's mean is over those same categories, where the paper
gives each of them (``utils.paper.paper_value``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from utils.files import write_text_atomically
from utils.paper import CATEGORIES, PAPER, paper_value
from utils.report import dataset_name, markdown_table, mean_of_defined, provenance

METRICS = {"image_auroc": "Image AUROC (%)", "pixel_auroc": "Pixel AUROC (%)",
           "pixel_aupro": "AUPRO (%)", "pixel_f1_max": "Pixel F1-max (%)",
           "seconds": "Seconds per category (fit + test)"}


def _value(metrics: dict, metric: str) -> float | None:
    if metric == "seconds":
        parts = [metrics.get("fit_seconds"), metrics.get("test_seconds")]
        return None if None in parts else float(sum(parts))
    value = metrics.get(metric)
    return None if value is None else 100.0 * value


def summarize(method: str, backbone: str, runs: list[dict]) -> dict:
    """``runs``: one dict per (configuration, seed) with label, settings, seed, result_dir and the
    run's report payload (what metrics.json holds)."""
    labels = list(dict.fromkeys(run["label"] for run in runs))
    seeds = list(dict.fromkeys(run["seed"] for run in runs))
    rows = list(dict.fromkeys(c for run in runs for c in run["report"]["categories"]))
    config = runs[0]["report"]["config"]
    published = not config["custom"]  # a custom folder named "bottle" is not MVTec's bottle
    summary = {"method": method, "backbone": backbone, "dataset": dataset_name(config),
               "seeds": seeds,
               "paper_title": PAPER.get(method, {}).get("title") if published else None,
               "configurations": [{"label": label,
                                   "settings": next(r["settings"] for r in runs
                                                    if r["label"] == label),
                                   "result_dirs": [str(r["result_dir"]) for r in runs
                                                   if r["label"] == label]}
                                  for label in labels],
               "environment": runs[0]["report"].get("environment"), "metrics": {}}
    for metric in METRICS:
        table = summary["metrics"][metric] = {}
        for row in rows + ["mean"]:
            cells = table[row] = {"paper": paper_value(method, metric, row, rows)
                                  if published else None}
            for label in labels:
                values = []
                for run in (r for r in runs if r["label"] == label):
                    categories = run["report"]["categories"]
                    if row == "mean":
                        values.append(mean_of_defined(_value(m, metric)
                                                      for m in categories.values()))
                    else:
                        values.append(_value(categories[row], metric) if row in categories
                                      else None)
                defined = [v for v in values if v is not None]
                cells[label] = {"mean": mean_of_defined(defined),
                                "std": float(np.std(defined, ddof=1)) if len(defined) > 1
                                else None, "values": values}
    return summary


def markdown(summary: dict) -> str:
    labels = [c["label"] for c in summary["configurations"]]
    seeds = summary["seeds"]
    lines = [f"# {summary['method']} on {summary['dataset']} ({summary['backbone']}): sweep", "",
             f"Seeds: {', '.join(map(str, seeds))}" + (" (cells: mean ± sample std over them)"
                                                      if len(seeds) > 1 else ""), "",
             *provenance(summary.get("environment"))]
    if summary["paper_title"]:
        run = [row for row in next(iter(summary["metrics"].values())) if row != "mean"]
        some = len(run) < len(CATEGORIES)  # its mean over all 15 would be another number
        lines += [f"Paper column: {summary['paper_title']}; where the paper gives only a mean, "
                  "the categories are blank" + ("; its mean row is the mean of its values for the "
                  "categories run, blank where it gives only a mean." if some else "."), ""]
    for metric, title in METRICS.items():
        table = summary["metrics"][metric]
        with_paper = any(cells["paper"] is not None for cells in table.values())
        header = ["Category"] + (["Paper"] if with_paper else []) + labels
        rows = [["**mean**" if row == "mean" else row]
                + ([_cell(cells["paper"], None, undefined="")] if with_paper else [])
                + [_cell(cells[label]["mean"], cells[label]["std"]) for label in labels]
                for row, cells in table.items()]
        lines += [f"## {title}", "", *markdown_table(header, rows), ""]
        categories = [cells for row, cells in table.items() if row != "mean"]
        defined = sum(any(cells[label]["mean"] is not None for label in labels)
                      for cells in categories)
        if 0 < defined < len(categories):  # else the mean would be read as the table's whole
            lines += [f"The mean row is over the {defined} of {len(categories)} categories where "
                      "this metric is defined.", ""]
    return "\n".join(lines)


def _cell(mean: float | None, std: float | None, undefined: str = "n/a") -> str:
    """A configuration's cell (n/a where the metric is undefined, as results.md), or the Paper
    column's (``undefined=""``: blank where the paper gives no number)."""
    if mean is None:
        return undefined
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def mean_curves(curve_sets: list[dict[str, dict]], points: int = 201) -> dict:
    """Mean ROC over categories and runs: TPR interpolated on a common FPR grid and averaged;
    the AUROC shown is the mean of the curves' own AUROCs (not the area of the mean curve)."""
    grid = np.linspace(0, 1, points)
    out = {}
    for level in ("image", "pixel"):
        curves = [c[level] for curves in curve_sets for c in curves.values()
                  if c.get(level) is not None]
        if curves:
            tpr = np.mean([np.interp(grid, fpr, tpr) for fpr, tpr, _ in curves], axis=0)
            out[level] = (grid, tpr, float(np.mean([auc for _, _, auc in curves])))
        else:
            out[level] = None
    return out


def write(result_dir: Path, summary: dict) -> None:
    write_text_atomically(result_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomically(result_dir / "results.md", markdown(summary))

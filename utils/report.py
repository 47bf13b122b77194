"""metrics.json and results.md, rewritten after every category so nothing finished is ever lost."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from utils.files import write_text_atomically
from utils.paper import PAPER, paper_value

RESULT_COLUMNS = {"image_auroc": "Image AUROC", "pixel_auroc": "Pixel AUROC",
                  "pixel_aupro": "AUPRO", "pixel_f1_max": "Pixel F1-max"}
MEAN_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_f1_max",
             "fit_seconds", "test_seconds")


def mean_of_defined(values) -> float | None:
    """Mean of the values that are defined (not None); None if none is."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """"1 image", "3 images": a count and its noun, in the plural (``plural``, default the noun
    and an s) unless the count is one."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def at_commit(commit: str | None) -> str:
    """Where a recorded run was measured: "commit abc1234" (as git prints it short, keeping the
    mark of uncommitted changes) or "no git checkout"."""
    if not commit:
        return "no git checkout"
    return f"commit {commit[:7]}{'+modified' if commit.endswith('+modified') else ''}"


def provenance(environment: dict | None) -> list[str]:
    """The lines under a results table that say when, at which commit, with which releases and on
    what the numbers were measured (metrics.json's ``environment``); none when it is unknown."""
    if not environment:
        return []
    versions = ", ".join(f"{name} {version}" for name, version
                         in (environment.get("versions") or {}).items() if version)
    return [f"Measured {environment.get('started_utc', '')} at "
            f"{at_commit(environment.get('git_commit'))} with {versions}, on "
            f"{environment.get('device')} ({environment.get('platform')}).", ""]


def kept_lines(categories: dict[str, dict]) -> list[str]:
    """Which categories --resume kept from an earlier run, and when and where that run measured
    them (the provenance line above speaks of the run that finished the table)."""
    runs: dict[tuple, list[str]] = {}
    for name, metrics in categories.items():
        source = metrics.get("kept_from")
        if source:
            runs.setdefault((source.get("started_utc"), source.get("git_commit")), []).append(name)
    return [f"Kept by --resume from the run started {started} at {at_commit(commit)}: "
            f"{', '.join(names)}." for (started, commit), names in runs.items()] + \
        ([""] if runs else [])


def mean_row(categories: dict[str, dict]) -> dict:
    """Mean over categories of each metric that is defined; None where no category defines it."""
    return {key: mean_of_defined(m.get(key) for m in categories.values()) for key in MEAN_KEYS}


class Report:
    def __init__(self, result_dir: Path, method: str, backbone: str, config: dict,
                 environment: dict | None = None):
        self.result_dir = Path(result_dir)
        self.payload = {"method": method, "backbone": backbone, "config": config,
                        "environment": environment, "categories": {}, "mean": {}}

    @property
    def categories(self) -> dict[str, dict]:
        return self.payload["categories"]

    def add(self, category: str, metrics: dict) -> None:
        self.categories[category] = metrics
        self.payload["mean"] = mean_row(self.categories)
        self.write()

    def write(self) -> None:
        self.result_dir.mkdir(parents=True, exist_ok=True)
        # a crash mid-write leaves the previous complete files
        write_text_atomically(self.result_dir / "metrics.json",
                              json.dumps(self.payload, indent=2) + "\n")
        write_text_atomically(self.result_dir / "results.md", self.markdown())

    def markdown(self) -> str:
        p = self.payload
        names = list(self.categories)
        rows = list(self.categories.items()) + [("**mean**", p["mean"])]
        # the paper's number beside each metric it gives for these rows (MVTec AD only: a custom
        # folder named bottle is not MVTec's bottle), as a fraction like the run's
        published = {} if p["config"].get("custom") else {
            key: [paper_value(p["method"], key, "mean" if name == "**mean**" else name, names)
                  for name, _ in rows] for key in RESULT_COLUMNS}
        published = {key: values for key, values in published.items()
                     if any(v is not None for v in values)}
        header = ["Category"]
        for key, title in RESULT_COLUMNS.items():
            header += [title] + ["Paper"] * (key in published)
        table = []
        for i, (name, m) in enumerate(rows):
            cells = [name]
            for key in RESULT_COLUMNS:
                cells.append(metric_cell(m.get(key)))
                if key in published:
                    value = published[key][i]
                    cells.append("" if value is None else f"{value / 100:.3f}")
            seconds = (m.get("fit_seconds") or 0) + (m.get("test_seconds") or 0)
            table.append(cells + [f"{seconds:.1f}"])
        config = ", ".join(f"{k}={v}" for k, v in p["config"].items())
        paper = ([f"Paper: {PAPER[p['method']]['title']}, for orientation; its mean is over the "
                  "same categories.", ""] if published else [])
        lines = [f"# {p['method']} on {dataset_name(p['config'])} ({p['backbone']})", "",
                 *markdown_table(header + ["Time (s)"], table), "",
                 *partial_mean_lines(self.categories), *paper,
                 *defect_type_lines(self.categories)]
        lines += [*provenance(p.get("environment")), *kept_lines(self.categories),
                  f"Config: {config}", ""]
        return "\n".join(lines)


def partial_mean_lines(categories: dict[str, dict]) -> list[str]:
    """A line naming each metric whose mean row is over fewer categories than the table shows
    (those where it is undefined: no masks, no defective images), so that the mean is not read as
    the table's whole."""
    by_count: dict[int, list[str]] = {}
    for key, title in RESULT_COLUMNS.items():
        defined = sum(m.get(key) is not None for m in categories.values())
        if 0 < defined < len(categories):
            by_count.setdefault(defined, []).append(title)
    lines = []
    for defined, titles in by_count.items():
        if len(titles) == 1:
            subject, where = f"The mean of {titles[0]} is", "it is"
        else:
            subject, where = f"The means of {', '.join(titles[:-1])} and {titles[-1]} are", \
                "they are"
        lines.append(f"{subject} over the {defined} of {len(categories)} categories where {where} "
                     "defined.")
    return lines + [""] * bool(lines)


def metric_cell(value: float | None) -> str:
    """A metric as the tables and the summary line show it: n/a where it is not defined."""
    return "n/a" if value is None else f"{value:.3f}"


def defect_type_lines(categories: dict[str, dict]) -> list[str]:
    """The table of each defect type's image AUROC against its category's good test images
    (categories kept by --resume from a run that did not record it have no rows)."""
    rows = [[name, kind, str(m["n_images"]), metric_cell(m["image_auroc"])]
            for name, metrics in categories.items()
            for kind, m in (metrics.get("defect_types") or {}).items()]
    if not rows:
        return []
    return ["Image AUROC per defect type, each against the category's good test images:", "",
            *markdown_table(["Category", "Defect type", "Images", "Image AUROC"], rows), ""]


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table: headers, the separator, one line per row of cells. A ``|``
    in a cell (a custom category or defect folder may have one) is escaped, or it would split the
    cell and shift every later column of its row."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(headers), "|" + "---|" * len(headers), *map(line, rows)]


def write_roc(path: Path, curves: dict) -> None:
    """A category's ROC curves as roc_curve.png draws them ({"image"|"pixel": (fpr, tpr, auroc)
    or None}), as JSON: for replotting, and for --resume to draw a kept category again."""
    write_text_atomically(path, json.dumps({
        level: None if curve is None else {"fpr": np.asarray(curve[0]).tolist(),
                                           "tpr": np.asarray(curve[1]).tolist(),
                                           "auroc": curve[2]}
        for level, curve in curves.items()}) + "\n")


def read_roc(path: Path) -> dict | None:
    """What ``write_roc`` wrote, or None when the file is missing or damaged."""
    try:
        stored = json.loads(Path(path).read_text())
        return {level: None if curve is None else
                (np.asarray(curve["fpr"], dtype=float), np.asarray(curve["tpr"], dtype=float),
                 curve["auroc"]) for level, curve in stored.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def summary_line(category: str, m: dict) -> str:
    """One category's metrics, memory and stage timings as the command line prints them."""
    f = metric_cell
    memory = ", ".join(f"{count} {what.replace('_', ' ')}"
                       for what, count in (m.get("memory") or {}).items())
    stages = ", ".join(f"{k} {v:.2f}" for k, v in (m.get("timings") or {}).items())
    return (f"{category}: image AUROC {f(m['image_auroc'])} | pixel AUROC {f(m['pixel_auroc'])} | "
            f"AUPRO {f(m['pixel_aupro'])} | pixel F1 {f(m['pixel_f1_max'])} | "
            f"fit {m['fit_seconds']:.1f} s | test {m['test_seconds']:.1f} s"
            + (f" | memory {memory}" if memory else "")
            + (knn_line(m["knn"]) if m.get("knn") else "")
            + (f"\n  stages (s): {stages}" if stages else ""))


def knn_line(knn: dict) -> str:
    """An approximate index's loss against exact search, where the summary shows it (a score
    that moved is not left for metrics.json alone to tell)."""
    return (f" | {knn['index']} search: recall@1 {knn['recall_at_1']:.3f}, neighbours found up "
            f"to {100 * knn['distance_excess_max']:.0f} % farther than the nearest "
            f"(mean {100 * knn['distance_excess_mean']:.2f} %)")


def predict_line(done: dict) -> str:
    """What ``pipeline.predict`` did, as the command line prints it (--predict)."""
    flagged = "" if done["threshold"] is None else \
        f", {done['n_flagged']} above the threshold {done['threshold']:.3f}"
    return (f"{done['category']} ({done['method']}, {done['backbone']}): scored "
            f"{counted(done['n_images'], 'image')}{flagged}; {done['csv']}")


def estimate_line(row: dict) -> str:
    """One category's ``pipeline.estimate`` as the command line prints it (--dry-run)."""
    memory = row.get("memory_bytes")
    if not memory:
        return (f"{row['category']}: {counted(row['n_train'], 'training image')}: no estimate "
                "for this method")
    parts = ", ".join(f"{name} {size / 2**30:.2f}" for name, size in memory.items())
    test = (f"test about {row['test_seconds']:.0f} s" if row["test_seconds"] is not None else
            "test not estimated (an approximate index's search time depends on the data)")
    patches = (f", {row['patches']} patches in {counted(row['shards'], 'coreset shard')}"
               if "shards" in row else "")
    bank = f" in a bank of {row['bank_patches']} patches" if "bank_patches" in row else ""
    return (f"{row['category']}: {counted(row['n_train'], 'training image')}{patches}: about "
            f"{sum(memory.values()) / 2**30:.2f} GiB ({parts}) beside the process itself; fit "
            f"about {row['fit_seconds']:.0f} s, {test} for {counted(row['n_test'], 'image')}"
            f"{bank} ({row['estimate']})")


def dataset_name(config) -> str:
    """What a run's titles say it ran on: MVTec AD, or a custom data root by its folder's name.
    ``config``: a ``RunConfig`` or the dict metrics.json holds of one."""
    get = config.get if isinstance(config, dict) else lambda name: getattr(config, name)
    return f"custom data in {Path(get('data_root')).name}/" if get("custom") else "MVTec AD"


def stopped_line(config, sweep_dir: Path | None, since: float, interrupted: bool) -> str | None:
    """What a run stopped early (Ctrl-C, or an error in a later category) leaves, for the line
    after the interrupt or the error: where its finished categories are (metrics.json is
    rewritten after each category; a sweep has one per configuration), counted only when written
    since ``since`` (the process's start; a resumed run rewrites it with the kept categories
    first): an earlier run's file, not yet moved to previous/ or refused by --resume, is not this
    run's. ``config`` is a ``RunConfig`` (None: stopped before one was resolved). None after an
    error with nothing kept: the error alone is the message."""
    if config is None or config.predict is not None:  # a prediction has nothing to go on with
        return "interrupted" if interrupted else None
    sweep = sweep_dir is not None
    result_dir = Path(sweep_dir if sweep else config.result_dir)
    patterns = ("*/metrics.json", "*/seed-*/metrics.json") if sweep else ("metrics.json",)
    if not any(file.stat().st_mtime >= since
               for pattern in patterns for file in result_dir.glob(pattern)):
        return "interrupted before any category finished; nothing was kept" if interrupted \
            else None
    where = (f"each configuration's folder under {result_dir}" if sweep else
             result_dir / "metrics.json")
    return ("interrupted: " if interrupted else "") + (
        f"the finished categories are in {where}; {'' if interrupted else 'once that is fixed, '}"
        "the same command with --resume runs the rest")

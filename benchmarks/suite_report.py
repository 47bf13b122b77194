"""The tables benchmarks/RESULTS.md takes from one `gpu_suite.sh` output folder, as markdown:

1. the full-size run against its targets (warm and cold seconds, test images/s, seconds no stage
   accounts for), one column per PatchCore part beside an earlier run (--before), each cell
   marked met or not;
2. every method's synthetic run (PatchCore's parts, SPADE, PaDiM) with its stages summed over the
   categories, cold and warm;
3. the official patchcore-inspection code against this project on the same category and GPU;
4. the greedy coreset alone, microseconds per pick in each order against one pick's floor;
5. every approximation on real bottle against the exact path (float32 greedy, flat kNN, same
   coreset fraction and seed): the largest difference of image AUROC, pixel AUROC and AUPRO over
   the seeds, against the bound (0.1 points).

    python benchmarks/suite_report.py OUT_DIR [--before runs/h100_synthetic_wrn50_616ea5f.json]

A part that did not run is left out. Reads only JSON: no GPU, no torch (numpy, for utils.report).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from utils.report import markdown_table  # noqa: E402  (numpy only, no torch)

# The full-size run's targets: (row, the run it is read from, its keys there, the target,
# True where more is better)
TARGETS = [("warm, all 15 categories (s)", "warm", ("total_seconds",), 20.0, False),
           ("cold, decode included (s)", "cold", ("total_seconds",), 40.0, False),
           ("test throughput, warm (images/s)", "warm", ("test_images_per_second",), 1500.0, True),
           ("time no stage accounts for, warm (s)", "warm", ("stages_summed", "unattributed"),
            0.0, False)]
ACCURACY_METRICS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC",
                    "pixel_aupro": "AUPRO"}
ACCURACY_BOUND = 0.1  # AUROC points: the most an approximation may move a metric on bottle
EXACT = {"coreset_precision": "fp32", "knn_index": "flat"}


def _measured(runs: list[dict], cache: str, keys: tuple[str, ...]) -> float | None:
    """runs[cache][keys...], None where that run or value is not there (an older JSON)."""
    value = next((run for run in runs if run["cache"] == cache), None)
    for key in keys:
        value = None if value is None else value.get(key)
    return value


def _number(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return [*markdown_table(headers, rows), ""]


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {path} is not a benchmark JSON ({error}); rerun its part")


def synthetic_parts(folder: Path) -> dict[str, dict]:
    """part name (from gpu_suite.sh's file name synthetic_<part>_<commit>.json) -> its JSON."""
    parts = {}
    for path in sorted(folder.glob("synthetic_*.json")):
        name = re.sub(r"^synthetic_(.+?)(_[0-9a-f]{7,40}|_unknown)?$", r"\1", path.stem)
        parts[name] = _read(path)
    return parts


def target_rows(columns: dict[str, list[dict]]) -> list[list[str]]:
    """One row per target: each column's value, marked met or not, and the target."""
    rows = []
    for title, cache, keys, target, more_is_better in TARGETS:
        row = [title]
        for runs in columns.values():
            value = _measured(runs, cache, keys)
            if value is None:
                row.append("n/a")
                continue
            shown = round(value, 1)  # "0 s" is met when it is 0.0 at the table's precision
            met = shown >= target if more_is_better else shown <= target
            row.append(f"{_number(value)} ({'met' if met else 'not met'})")
        rows.append(row + [_number(target, 0)])
    return rows


def method_label(payload: dict) -> str:
    config = payload.get("config", {})
    settings = config.get("set")
    return config.get("method", "patchcore") + ("" if settings in (None, "None")
                                                else f" {settings}")


def synthetic_section(parts: dict[str, dict], before: tuple[str, dict] | None) -> list[str]:
    """``before``: (its name, an earlier synthetic JSON) for the targets' first column."""
    lines = []
    patchcore = {name: payload["result"]["runs"] for name, payload in parts.items()
                 if payload.get("config", {}).get("method", "patchcore") == "patchcore"}
    if patchcore:
        columns = {f"before ({before[0]})": before[1]["result"]["runs"]} if before else {}
        columns.update(patchcore)
        any_run = next(iter(parts.values()))
        lines += [f"### Targets: {any_run.get('machine', 'unknown machine')}", "",
                  *_table(["", *columns, "target"], target_rows(columns))]
    for name, payload in parts.items():
        runs = payload["result"]["runs"]
        stages = list(dict.fromkeys(stage for run in runs for stage in run["stages_summed"]))
        rows = [[stage, *(_number(run["stages_summed"].get(stage), 2) for run in runs)]
                for stage in stages]
        rows += [["**total, main.py**", *(f"**{_number(run['total_seconds'], 2)}**"
                                          for run in runs)],
                 ["test images/s", *(_number(run["test_images_per_second"], 0) for run in runs)],
                 ["mean image / pixel AUROC", *(f"{_number(run['mean_image_auroc'], 4)} / "
                                                f"{_number(run['mean_pixel_auroc'], 4)}"
                                                for run in runs)]]
        first = runs[0]
        lines += [f"### {name}: {method_label(payload)}, {first['n_train']:,} train / "
                  f"{first['n_test']:,} test images", "",
                  *_table(["seconds, summed over the categories",
                           *(f"cache {run['cache']}" for run in runs)], rows)]
    return lines


# the BatchNorm statistics of runs recorded before the sides said them: the official side as its
# run script leaves them, this project with the weights' own
UNSAID_BATCHNORM = {"official": "after the official probe", "this": "the weights' own"}


def official_section(folder: Path) -> list[str]:
    lines = []
    for path in sorted(folder.glob("official_*.json")):
        payload = _read(path)
        rows = [[side, _number(payload[side].get("fit_seconds"), 2),
                 _number(payload[side].get("test_seconds"), 2),
                 _number(payload[side].get("image_auroc"), 4),
                 _number(payload[side].get("pixel_auroc"), 4),
                 payload[side].get("batchnorm", UNSAID_BATCHNORM[side]),
                 _number(payload[side].get("peak_gpu_mb"), 0)]
                for side in ("official", "this") if side in payload]
        category = payload.get("config", {}).get("category", "?")
        lines += [f"### The official code beside this project: {category}, "
                  f"{payload.get('device', '?')}", "",
                  *_table(["code", "fit s", "test s", "image AUROC", "pixel AUROC",
                           "BatchNorm statistics", "peak GPU MB"], rows)]
        ratio = payload.get("fit_ratio_official_over_this")
        if ratio is not None:
            lines += [f"Fit: the official code takes {ratio:.1f}x this project's time.", ""]
    return lines


CORESET_FIELDS = {"patches", "picks", "same_picks", "fp16_same_set_share", "floor_us_per_pick",
                  "fp16_floor_us_per_pick", "candidate_updates", "candidate_products_share"}


def coreset_section(folder: Path) -> list[str]:
    lines = []
    for path in sorted(folder.glob("coreset_*.json")):
        rows = _read(path)["result"]
        orders = [key for key in rows[0] if key not in CORESET_FIELDS]
        table = [[f"{row['patches']:,}", f"{row['picks']:,}",
                  *(f"{row[order]:.2f} ({row[order] / row['picks'] * 1e6:.0f})"
                    for order in orders),
                  _number(row.get("floor_us_per_pick"), 0), str(row["same_picks"])]
                 for row in rows]
        lines += ["### The greedy coreset alone: seconds (us per pick)", "",
                  *_table(["patches", "picks", *orders, "fp32 floor us/pick",
                           "same picks, fp32 orders"], table)]
    return lines


def accuracy_differences(reference: dict, candidate: dict) -> list[dict]:
    """For every configuration of ``candidate`` (a sweep's summary.json) other than the exact
    path itself: per metric, the largest |difference| over the seeds both ran from
    ``reference``'s exact configuration with the same coreset fraction (percent points, as the
    summaries hold them), and the seed where it is."""
    exact = {c["settings"]["coreset_fraction"]: c for c in reference["configurations"]
             if all(c["settings"].get(key) == value for key, value in EXACT.items())
             and c["settings"].get("coreset_order") in ("auto", "eager")}
    seeds = [seed for seed in candidate["seeds"] if seed in reference["seeds"]]
    rows = []
    for configuration in candidate["configurations"]:
        against = exact.get(configuration["settings"]["coreset_fraction"])
        if against is None or configuration["settings"] == against["settings"]:
            continue
        row = {"coreset_fraction": configuration["settings"]["coreset_fraction"],
               "differs": {key: value for key, value in configuration["settings"].items()
                           if against["settings"].get(key) != value}, "metrics": {}}
        for metric, title in ACCURACY_METRICS.items():
            ours = candidate["metrics"][metric]["mean"][configuration["label"]]["values"]
            theirs = reference["metrics"][metric]["mean"][against["label"]]["values"]
            pairs = [(ours[candidate["seeds"].index(seed)],
                      theirs[reference["seeds"].index(seed)], seed) for seed in seeds]
            gaps = [(abs(a - b), seed) for a, b, seed in pairs if None not in (a, b)]
            if gaps:
                row["metrics"][title] = max(gaps, key=lambda gap: gap[0])
        row["within_bound"] = all(gap <= ACCURACY_BOUND for gap, _ in row["metrics"].values())
        rows.append(row)
    return rows


def accuracy_section(folder: Path) -> list[str]:
    levers = sorted(folder.glob("accuracy_levers_*.json"))
    if not levers:
        return []
    reference = _read(levers[-1])
    rows = []
    for path in [levers[-1], *sorted(folder.glob("accuracy_candidates_*.json"))]:
        rows += accuracy_differences(reference, _read(path))

    def cell(row, title):
        if title not in row["metrics"]:
            return "n/a"
        gap, seed = row["metrics"][title]
        shown = f"{gap:.4f}"
        return shown + (f" (seed {seed})" if float(shown) else "")

    environment = reference.get("environment") or {}
    lines = [f"### Approximations against the exact path on real bottle "
             f"({reference.get('backbone')}, seeds {', '.join(map(str, reference['seeds']))}, "
             f"commit {environment.get('git_commit') or '?'}): largest |difference| in points, "
             f"bound {ACCURACY_BOUND}", "",
             *_table(["coreset", "differs from the exact path", *ACCURACY_METRICS.values(),
                      "within"],
                     [[f"{row['coreset_fraction']:g}",
                       ", ".join(f"{key}={value}" for key, value in row["differs"].items()),
                       *(cell(row, title) for title in ACCURACY_METRICS.values()),
                       "yes" if row["within_bound"] else "**no**"] for row in rows])]
    beyond = [row for row in rows if not row["within_bound"]]
    lines += [f"{len(beyond)} of {len(rows)} configurations exceed the bound." if beyond else
              f"All {len(rows)} configurations are within the bound.", ""]
    return lines


def report(folder: Path, before: Path | None) -> str:
    earlier = None
    if before is not None:
        commit = re.search(r"_([0-9a-f]{7,40})$", before.stem)
        earlier = (commit.group(1) if commit else before.stem, _read(before))
    sections = [synthetic_section(synthetic_parts(folder), earlier), official_section(folder),
                coreset_section(folder), accuracy_section(folder)]
    lines = [line for section in sections for line in section]
    if not lines:
        raise SystemExit(f"error: {folder} holds no gpu_suite.sh JSON (synthetic_*, official_*, "
                         "coreset_*, accuracy_*); give the OUT_DIR the suite wrote to")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="gpu_suite.sh's OUT_DIR")
    parser.add_argument("--before", type=Path,
                        default=HERE / "runs" / "h100_synthetic_wrn50_616ea5f.json",
                        help="an earlier synthetic JSON for the targets' first column "
                             "(default: the last measured H100 run); 'none' leaves it out")
    args = parser.parse_args(argv)
    before = None if str(args.before) == "none" else args.before
    print(report(args.folder, before))


if __name__ == "__main__":
    sys.exit(main())

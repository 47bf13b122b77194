"""A result folder shows one run: an earlier run's outputs there are moved aside, never overwritten.

Running twice with the same ``--result-dir`` (``result/`` by default) used to replace the first
run's metrics.json and leave its other categories' figures, scores and model files beside the
second run's, where nothing said which run they came from. Now a run first moves what an earlier
run wrote into ``<result-dir>/previous/<its start time>-<its method>/``, keeping its layout.

Only what the earlier run's own records name is moved (its metrics.json's categories, a sweep's
summary.json's configurations, predictions.csv and its overlays), and any file at the top that a
run writes (an unreadable metrics.json, the user's own results.md), so files of the user's that
share the folder, or another run's folder nested in it (``--result-dir result/r18``), stay.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from utils.errors import SettingError
from utils.report import read_roc

log = logging.getLogger("pipeline")

ARCHIVE = "previous"
RUN_FILES = ("metrics.json", "results.md", "roc_curve.png")
CATEGORY_OUTPUTS = ("pred_dist/{}.png", "localization/{}", "scores/{}.csv", "roc/{}.json",
                    "models/{}.pt", "anomaly_maps/{}")
SWEEP_FILES = ("summary.json", "results.md", "roc_curve.png")
PREDICT_OUTPUTS = ("predictions.csv", "predictions")


def _record(path: Path) -> dict | None:
    """A JSON object this project wrote, or None (absent, unreadable, someone else's)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _plain_name(name) -> bool:
    """A single path component (a category or folder name from a record, never a way out)."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def _run_outputs(folder: Path) -> list[Path]:
    """What a fit run wrote in ``folder``, by its metrics.json (none without one)."""
    record = _record(folder / "metrics.json")
    if record is None or not {"method", "categories"} <= record.keys():
        return []
    # the categories asked for too: one that failed mid-way may have left figures
    asked = (record.get("config") or {}).get("categories") or []
    names = dict.fromkeys([*(record.get("categories") or {}), *asked])
    return [folder / name for name in RUN_FILES] + \
        [folder / pattern.format(name) for name in names if _plain_name(name)
         for pattern in CATEGORY_OUTPUTS]


def _sweep_outputs(folder: Path) -> list[Path]:
    """What a sweep wrote in ``folder``: its comparison and each configuration's runs."""
    record = _record(folder / "summary.json")
    if record is None or "configurations" not in record:
        return []
    paths = [folder / name for name in SWEEP_FILES]
    for configuration in record.get("configurations") or []:
        for recorded in configuration.get("result_dirs") or []:
            parts = Path(str(recorded)).parts[-2:]  # <label folder>[/seed-N]
            if not parts[-1].startswith("seed-"):
                parts = parts[-1:]
            if all(_plain_name(part) for part in parts):
                paths += _run_outputs(folder.joinpath(*parts))
    return paths


def _archive_name(folder: Path, records: tuple[str, ...]) -> str:
    """``<start>-<method>`` of the earlier run in ``folder`` (20261124T012048Z-patchcore), from
    the first of ``records`` there; a prediction records no start: its file's time, "predict"."""
    for name in records:
        record = _record(folder / name) if name.endswith(".json") else None
        if record is not None:
            started = (record.get("environment") or {}).get("started_utc")
            method = record.get("method")
            if isinstance(started, str) and _plain_name(started.replace(":", "")):
                return "-".join(part for part in (started.replace("-", "").replace(":", ""),
                                                  method if _plain_name(method) else "") if part)
        if (folder / name).exists():
            written = time.gmtime((folder / name).stat().st_mtime)
            return time.strftime("%Y%m%dT%H%M%SZ", written) + \
                ("-predict" if name == "predictions.csv" else "")
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def move_earlier_run(result_dir: Path, predictions_only: bool = False) -> Path | None:
    """Move what an earlier run wrote in ``result_dir`` to ``result_dir/previous/<stamp>/``;
    returns that folder, or None when there was nothing to move. ``predictions_only``: only an
    earlier ``--predict``'s outputs (a prediction beside a fitted run leaves the run, and the
    model files it may be reading, where they are)."""
    result_dir = Path(result_dir)
    outputs = [] if predictions_only else _run_outputs(result_dir) + _sweep_outputs(result_dir)
    if (result_dir / "predictions.csv").exists():
        outputs += [result_dir / name for name in PREDICT_OUTPUTS]
    recognised = any(path.exists() for path in outputs)
    if not predictions_only:
        # a file a run writes at the top, but not one this project's records name (unreadable,
        # or the user's own): the run would write over it, so it moves too
        outputs += [result_dir / name for name in dict.fromkeys(RUN_FILES + SWEEP_FILES)]
    outputs = [path for path in dict.fromkeys(outputs) if path.exists()]
    if not outputs:
        return None
    name = _archive_name(result_dir, ("predictions.csv",) if predictions_only else
                         ("metrics.json", "summary.json", "predictions.csv"))
    archive = result_dir / ARCHIVE / name
    number = 1
    while archive.exists():  # two runs started in the same second
        number += 1
        archive = result_dir / ARCHIVE / f"{name}-{number}"
    for path in outputs:
        target = archive / path.relative_to(result_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)  # within one folder: a rename, never a copy of large model files
        _remove_empty_parents(path.parent, result_dir)
    if recognised:
        log.info("%s held an earlier %s: moved to %s", result_dir,
                 "prediction" if predictions_only else "run", archive)
    else:
        log.info("%s held %s, which a run writes: moved to %s", result_dir,
                 ", ".join(path.name for path in outputs), archive)
    return archive


def _remove_empty_parents(folder: Path, top: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``top`` while they are empty."""
    while folder != top and top in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty: someone else's files are in it
            return
        folder = folder.parent


# Settings that change how a run is carried out, never its numbers: a resumed run may give them
# anew (a smaller batch after the GPU ran out of memory, fewer loader processes, more categories).
HOW_ONLY = ("categories", "result_dir", "batch_size", "workers", "cache_dir", "decode_ahead",
            "plots", "plot_workers", "download", "mirror", "resume", "weights", "weights_id")


def _settings(record: dict, environment: dict | None) -> dict:
    """A metrics.json ``config`` as one flat dict of what decides the numbers: the method's own
    settings beside the run's, folders as absolute paths, the weights by their content, and the
    library releases (a torch or faiss release alone has moved AUROC by a point)."""
    flat = {name: value for name, value in record.items()
            if name not in HOW_ONLY and name != "method_settings"}
    flat.update(record.get("method_settings") or {})
    if flat.get("data_root") is not None:
        flat["data_root"] = str(Path(flat["data_root"]).resolve())
    # the file's digest where one was recorded, else its identity (the published weights' name)
    flat["weights"] = (environment or {}).get("weights_sha256") or record.get("weights_id")
    flat.update((environment or {}).get("versions") or {})
    return flat


def finished_categories(result_dir: Path, record: dict, environment: dict | None,
                        categories, defaults: dict | None = None
                        ) -> dict[str, tuple[dict, dict]] | None:
    """--resume: {category: (metrics, ROC curves)} of ``categories`` that the earlier run in
    ``result_dir`` finished, in run order; None when there is no earlier run to resume.
    ``record`` and ``environment``: this run's metrics.json ``config`` and ``environment``;
    ``defaults``: every setting's default in the same form, which a setting the earlier run did
    not record (it came later) had.
    Refused when the earlier run decided its numbers with other settings or library releases,
    or finished a category this run leaves out (its metrics would be dropped)."""
    result_dir = Path(result_dir)
    earlier = _record(result_dir / "metrics.json")
    if earlier is None or not isinstance(earlier.get("categories"), dict):
        log.info("%s holds no earlier run to resume: every category runs", result_dir)
        return None
    # flattened first, so that the method's own settings fill in one by one like the run's
    before = {**_settings(defaults or {}, None),
              **_settings(earlier.get("config") or {}, earlier.get("environment"))}
    now = _settings(record, environment)
    differ = [name for name in dict.fromkeys([*now, *before]) if before.get(name) != now.get(name)]
    if differ:
        shown = ", ".join(f"{{{'seeds' if name == 'seed' else name}}} {before.get(name)} (now "
                          f"{now.get(name)})" for name in differ)
        raise SettingError("resume", None, "continues only a run with the same settings and "
                           f"library releases, and {result_dir / 'metrics.json'} was computed "
                           f"with {shown}; match them, or drop {{resume}} to start afresh (the "
                           "earlier run moves to previous/)")
    left_out = [name for name in earlier["categories"] if name not in categories]
    if left_out:
        raise SettingError("resume", None, f": {result_dir / 'metrics.json'} also holds "
                           f"{', '.join(left_out)}, which {{categories}} leaves out; add "
                           f"{'it' if len(left_out) == 1 else 'them'}, or drop {{resume}}")
    started = {key: (earlier.get("environment") or {}).get(key)
               for key in ("started_utc", "git_commit")}
    kept, redo = {}, []
    for name in categories:
        if name not in earlier["categories"]:
            continue
        curves = read_roc(result_dir / "roc" / f"{name}.json")
        if curves is None:  # a run from before the curves were written: it runs again
            redo.append(name)
            continue
        metrics = dict(earlier["categories"][name])
        metrics.setdefault("kept_from", started)  # a category kept twice keeps its first run
        kept[name] = (metrics, curves)
    if redo:
        log.info("%s: no ROC curves kept for %s, which run again", result_dir, ", ".join(redo))
    log.info("resuming %s: %d of %d categories finished%s", result_dir, len(kept),
             len(categories), f" ({', '.join(kept)}), kept" if kept else "")
    return kept

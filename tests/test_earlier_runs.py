"""A result folder shows one run: what an earlier run wrote there is moved to previous/, whole, and
nothing that run did not write is touched."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli
from utils.earlier_runs import move_earlier_run
from utils.files import FolderInUse, FolderLock


def _write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _fit_run(folder: Path, categories: list[str], asked: list[str] | None = None,
             started: str = "2026-11-24T01:20:48Z", method: str = "patchcore") -> None:
    """The files a fit run writes, as its metrics.json names them."""
    _write(folder / "metrics.json", json.dumps({
        "method": method, "config": {"categories": asked or categories},
        "environment": {"started_utc": started},
        "categories": {name: {} for name in categories}}))
    for name in ("results.md", "roc_curve.png"):
        _write(folder / name)
    for category in asked or categories:
        for name in (f"pred_dist/{category}.png", f"localization/{category}/good_000.png",
                     f"scores/{category}.csv", f"roc/{category}.json", f"models/{category}.pt",
                     f"anomaly_maps/{category}/test/good/000.tiff"):
            _write(folder / name)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _cli(weights, root, result, *extra) -> list:
    """main.py's flags for a quick run on the synthetic categories into ``result``."""
    return ["--backbone", "resnet18", "--weights", weights, "--data-root", root, "--custom",
            "--resize", 64, "--crop", 64, "--result-dir", result, "--no-cache", *extra]


def test_an_earlier_fit_moves_whole_and_nothing_else_moves(tmp_path):
    result = tmp_path / "result"
    # 'cable' was asked for but failed mid-way: its figures are that run's too
    _fit_run(result, ["bottle"], asked=["bottle", "cable"])
    earlier = _files(result)
    mine = {_write(result / "notes.txt"), _write(result / "models" / "mine.pt"),
            _write(result / "r18" / "metrics.json", json.dumps({"method": "padim",
                                                                 "categories": {}}))}
    archive = move_earlier_run(result)
    assert archive == result / "previous" / "20261124T012048Z-patchcore"
    assert _files(archive) == earlier
    assert _files(result) == {str(p.relative_to(result)) for p in mine} | \
        {f"previous/20261124T012048Z-patchcore/{name}" for name in earlier}
    for emptied in ("pred_dist", "localization", "scores", "roc", "anomaly_maps"):
        assert not (result / emptied).exists()
    assert move_earlier_run(result) is None  # nothing left to move


def test_a_file_a_run_writes_moves_even_when_no_record_names_it(tmp_path, caplog):
    """An unreadable metrics.json (edited by hand, say) or the user's own results.md would be
    written over: they move, and nothing else does."""
    result = tmp_path / "result"
    _write(result / "metrics.json", "{not json")
    _write(result / "results.md", "my notes")
    _write(result / "notes.txt")
    with caplog.at_level("INFO", logger="pipeline"):
        archive = move_earlier_run(result)
    assert archive.parent == result / "previous"
    assert _files(archive) == {"metrics.json", "results.md"}
    assert (archive / "results.md").read_text() == "my notes"
    assert _files(result) == {"notes.txt"} | {f"previous/{archive.name}/{name}"
                                               for name in ("metrics.json", "results.md")}
    assert f"{result} held metrics.json, results.md, which a run writes: moved to {archive}" \
        in caplog.text
    assert move_earlier_run(result, predictions_only=True) is None


def test_an_earlier_sweep_moves_its_comparison_and_each_configurations_runs(tmp_path):
    result = tmp_path / "out"
    _write(result / "summary.json", json.dumps({
        "method": "spade", "environment": {"started_utc": "2026-11-24T02:00:00Z"},
        "configurations": [{"label": "k=3", "result_dirs": ["out/k=3/seed-0", "out/k=3/seed-1"]},
                           {"label": "k=5", "result_dirs": ["elsewhere/out/k=5/seed-0",
                                                            "elsewhere/out/k=5/seed-1"]}]}))
    _write(result / "results.md")
    for folder in ("k=3/seed-0", "k=3/seed-1", "k=5/seed-0", "k=5/seed-1"):
        _fit_run(result / folder, ["bottle"], method="spade")
    earlier = _files(result)
    archive = move_earlier_run(result)
    assert archive.name == "20261124T020000Z-spade"
    assert _files(archive) == earlier
    assert [p.name for p in result.iterdir()] == ["previous"]  # the emptied folders are gone


def test_a_prediction_moves_only_an_earlier_prediction(tmp_path, caplog):
    result = tmp_path / "result"
    _fit_run(result, ["bottle"])
    fitted = _files(result)
    _write(result / "predictions.csv")
    _write(result / "predictions" / "a.png")
    with caplog.at_level("INFO", logger="pipeline"):
        archive = move_earlier_run(result, predictions_only=True)
    assert caplog.messages == [f"{result} held an earlier prediction: moved to {archive}"]
    assert archive.name.endswith("-predict")
    assert _files(archive) == {"predictions.csv", "predictions/a.png"}
    assert {p for p in _files(result) if not p.startswith("previous/")} == fitted


def test_a_second_run_into_one_folder_keeps_the_first(tmp_path, capsys, synthetic_root,
                                                      resnet18_weights):
    result = tmp_path / "result"
    common = _cli(resnet18_weights, synthetic_root, result, "--coreset", 0.5, "--plots", 1)
    assert run_cli(common + ["--categories", "cubes", "--save-models"]) == 0
    first = json.loads((result / "metrics.json").read_text())
    capsys.readouterr()
    assert run_cli(common + ["--categories", "grid"]) == 0
    (archive,) = (result / "previous").iterdir()
    assert f"{result} held an earlier run: moved to {archive}" in capsys.readouterr().err
    assert json.loads((archive / "metrics.json").read_text()) == first
    assert (archive / "models" / "cubes.pt").is_file()
    assert list(json.loads((result / "metrics.json").read_text())["categories"]) == ["grid"]
    # nothing of the first run is left beside the second's outputs
    assert not any("cubes" in p for p in _files(result) if not p.startswith("previous/"))


@pytest.mark.parametrize("sweep", [[], ["--coreset", 0.5, 1.0]])
def test_a_run_into_a_folder_another_run_is_writing_is_refused(sweep, tmp_path, capsys,
                                                                synthetic_root, resnet18_weights):
    """It used to move the running one's outputs to previous/ mid-way, after which both wrote
    the same files: one run's results lost, the folder a mix of the two."""
    result = tmp_path / "result"
    _fit_run(result, ["cubes"])
    earlier = _files(result)
    other = FolderLock(result)
    other.hold()  # as a run still writing there holds it
    try:
        assert run_cli(_cli(resnet18_weights, synthetic_root, result, "--categories", "cubes",
                            "--plots", 0, *sweep)) == 2
        holder = f"process {os.getpid()} on {socket.gethostname()}, started "
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"error: --result-dir {result} is in use by another run ({holder}")
        assert err.endswith(" UTC); wait for it to end, or give another --result-dir")
        assert _files(result) == earlier | {".run.lock"}
    finally:
        other.release()
    assert _files(result) == earlier
    assert run_cli(_cli(resnet18_weights, synthetic_root, result, "--categories", "cubes",
                        "--plots", 0, *sweep)) == 0  # once it has ended
    assert (result / "previous").is_dir() and ".run.lock" not in _files(result)


def test_a_folder_held_by_a_process_that_died_is_free(tmp_path):
    """The system drops the lock with its process, so a crash or kill -9 never blocks a run;
    the first run into a folder that nothing else made removes it again when it wrote nothing."""
    folder = tmp_path / "new" / "result"
    script = ("import os, sys; from utils.files import FolderLock; "
              "FolderLock(sys.argv[1]).hold(); os._exit(9)")
    done = subprocess.run([sys.executable, "-c", script, str(folder)],
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 9 and (folder / ".run.lock").is_file()
    with FolderLock(folder) as lock:
        lock.hold()
        with pytest.raises(FolderInUse) as held:
            FolderLock(folder).hold()
        assert held.value.holder.startswith(f"process {os.getpid()} on ")
    assert not (folder / ".run.lock").exists()
    made = FolderLock(tmp_path / "made")
    made.hold()
    made.release()
    assert not (tmp_path / "made").exists()


def test_a_file_system_without_locks_leaves_the_folder_unguarded(tmp_path, monkeypatch):
    """Some network file systems answer flock with ENOLCK: that is no other run, and must not
    stop this one."""
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    FolderLock(tmp_path).hold()


@pytest.mark.parametrize("resume", [[], ["--resume"]])  # a sweep is no plain run to resume
def test_a_run_after_a_sweep_keeps_the_sweep(resume, tmp_path, synthetic_root,
                                             resnet18_weights):
    result = tmp_path / "result"
    common = _cli(resnet18_weights, synthetic_root, result, "--plots", 0, "--categories", "cubes")
    assert run_cli(common + ["--coreset", 0.5, 1.0]) == 0
    sweep = _files(result)
    assert run_cli(common + ["--coreset", 0.5] + resume) == 0
    (archive,) = (result / "previous").iterdir()
    assert _files(archive) == sweep
    assert not (result / "summary.json").exists() and not (result / "coreset=0.5").exists()


def test_a_setting_the_backbone_cannot_serve_moves_nothing(tmp_path, capsys, synthetic_root,
                                                           resnet18_weights):
    result = tmp_path / "result"
    _fit_run(result, ["cubes"])
    earlier = _files(result)
    assert run_cli(["--method", "padim", "--padim-dims", 5000, "--backbone", "resnet18",
                    "--weights", resnet18_weights, "--data-root", synthetic_root, "--custom",
                    "--result-dir", result]) == 2
    assert "--padim-dims 5000 is larger than the 448 channels" in capsys.readouterr().err
    assert _files(result) == earlier


def _resume_flags(weights, root, result):
    return _cli(weights, root, result, "--coreset", 0.5, "--plots", 1, "--categories", "cubes",
                "grid")


def test_resume_keeps_what_an_interrupted_run_finished_and_runs_the_rest(
        tmp_path, capsys, monkeypatch, synthetic_root, resnet18_weights):
    import pipeline
    result = tmp_path / "result"
    flags = _resume_flags(resnet18_weights, synthetic_root, result)
    load = pipeline.load_category

    def interrupted_at_grid(config, category, *args, **kwargs):
        if category == "grid":
            raise KeyboardInterrupt
        return load(config, category, *args, **kwargs)

    monkeypatch.setattr(pipeline, "load_category", interrupted_at_grid)
    assert run_cli(flags) == 130
    first = json.loads((result / "metrics.json").read_text())
    assert list(first["categories"]) == ["cubes"]
    # as a run from before --save-maps, --patch-size and --layers existed recorded it: it ran
    # with their defaults (a run setting and two of the method's own)
    del first["config"]["save_maps"]
    for name in ("patch_size", "layers"):
        del first["config"]["method_settings"][name]
    (result / "metrics.json").write_text(json.dumps(first))
    monkeypatch.setattr(pipeline, "load_category", load)
    capsys.readouterr()

    assert run_cli(flags + ["--resume", "--batch-size", 2]) == 0  # how it runs may differ
    assert f"resuming {result}: 1 of 2 categories finished (cubes), kept" in \
        capsys.readouterr().err
    resumed = json.loads((result / "metrics.json").read_text())
    assert list(resumed["categories"]) == ["cubes", "grid"]
    kept = resumed["categories"]["cubes"]
    assert kept.pop("kept_from") == {key: first["environment"][key]
                                     for key in ("started_utc", "git_commit")}
    kept["timings"].pop("report")  # the time it took to record it again
    first["categories"]["cubes"]["timings"].pop("report")
    assert kept == first["categories"]["cubes"]  # not computed again: the same fit seconds too
    assert resumed["mean"]["image_auroc"] == (kept["image_auroc"] +
                                              resumed["categories"]["grid"]["image_auroc"]) / 2
    assert not (result / "previous").exists()
    assert (f"Kept by --resume from the run started {first['environment']['started_utc']} at "
            in (result / "results.md").read_text())
    assert (result / "roc" / "grid.json").is_file() and (result / "localization" / "grid").is_dir()


def test_resume_refuses_other_settings_and_dropped_categories(tmp_path, capsys, synthetic_root,
                                                              resnet18_weights):
    result = tmp_path / "result"
    flags = _resume_flags(resnet18_weights, synthetic_root, result)
    assert run_cli(flags) == 0
    earlier = _files(result)
    capsys.readouterr()
    assert run_cli(flags + ["--resume", "--coreset", 0.25, "--seed", 1]) == 2
    assert capsys.readouterr().err == (
        "error: --resume continues only a run with the same settings and library releases, and "
        f"{result}/metrics.json was computed with --seed 0 (now 1), --coreset 0.5 (now 0.25); "
        "match them, or drop --resume to start afresh (the earlier run moves to previous/)\n")
    assert run_cli(flags[:-1] + ["--resume"]) == 2  # grid left out
    assert capsys.readouterr().err == (
        f"error: --resume: {result}/metrics.json also holds grid, which --categories leaves out; "
        "add it, or drop --resume\n")
    assert _files(result) == earlier


def test_a_resumed_sweep_after_a_plain_run_keeps_the_run(tmp_path, synthetic_root,
                                                         resnet18_weights):
    result = tmp_path / "result"
    common = _cli(resnet18_weights, synthetic_root, result, "--plots", 0, "--categories", "cubes")
    assert run_cli(common + ["--coreset", 0.5]) == 0
    plain = _files(result)
    assert run_cli(common + ["--coreset", 0.5, 1.0, "--resume"]) == 0
    (archive,) = (result / "previous").iterdir()
    assert _files(archive) == plain
    assert json.loads((result / "summary.json").read_text())["method"] == "patchcore"


def test_resume_refuses_a_run_measured_with_other_library_releases(tmp_path, capsys,
                                                                     synthetic_root,
                                                                     resnet18_weights):
    result = tmp_path / "result"
    flags = _resume_flags(resnet18_weights, synthetic_root, result)
    assert run_cli(flags) == 0
    earlier = json.loads((result / "metrics.json").read_text())
    torch_version = earlier["environment"]["versions"]["torch"]
    earlier["environment"]["versions"]["torch"] = "2.0.0"
    (result / "metrics.json").write_text(json.dumps(earlier))
    capsys.readouterr()
    assert run_cli(flags + ["--resume"]) == 2
    assert f"was computed with torch 2.0.0 (now {torch_version}); match them" in \
        capsys.readouterr().err

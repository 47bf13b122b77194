"""A result folder shows one run: what an earlier run wrote there is moved to previous/, whole, and
nothing that run did not write is touched."""
import json
from pathlib import Path

from tests.conftest import run_cli
from utils.earlier_runs import move_earlier_run


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
                     f"scores/{category}.csv", f"models/{category}.pt"):
            _write(folder / name)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


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
    for emptied in ("pred_dist", "localization", "scores"):
        assert not (result / emptied).exists()
    assert move_earlier_run(result) is None  # nothing left to move


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
    common = ["--backbone", "resnet18", "--weights", resnet18_weights, "--data-root",
              synthetic_root, "--custom", "--resize", 64, "--crop", 64, "--coreset", 0.5,
              "--plots", 1, "--result-dir", result, "--no-cache"]
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


def test_a_run_after_a_sweep_keeps_the_sweep(tmp_path, synthetic_root, resnet18_weights):
    result = tmp_path / "result"
    common = ["--backbone", "resnet18", "--weights", resnet18_weights, "--data-root",
              synthetic_root, "--custom", "--resize", 64, "--crop", 64, "--plots", 0,
              "--result-dir", result, "--no-cache", "--categories", "cubes"]
    assert run_cli(common + ["--coreset", 0.5, 1.0]) == 0
    sweep = _files(result)
    assert run_cli(common + ["--coreset", 0.5]) == 0
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

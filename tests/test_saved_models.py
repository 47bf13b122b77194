"""--save-models, --calibration-fraction and --predict: a saved model scores like the fitted one."""
import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import main
from models.saved_model import FORMAT_VERSION
from tests.conftest import run_cli

# name -> the method (before any "/") and its flags; the second PatchCore proves that settings
# away from the defaults come back from the file (other stages and neighbourhood, other scores)
FIT_FLAGS = {"patchcore": ["--coreset", 0.5], "spade": ["--k", 3], "padim": [],
             "patchcore/1+2,p5": ["--coreset", 0.5, "--layers", "1+2", "--patch-size", 5],
             "padim/2+3": ["--layers", "2+3"],
             # the model file carries the probe: predict redoes it, or every score would move
             "patchcore/bn-probe": ["--coreset", 0.5, "--official-bn-probe"]}


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, synthetic_root, resnet18_weights):
    """One fitted + saved model per method on the synthetic 'cubes' category."""
    out = {}
    for name, flags in FIT_FLAGS.items():
        result = tmp_path_factory.mktemp("fit")
        assert run_cli(["--method", name.split("/")[0], "--backbone", "resnet18",
                        "--weights", resnet18_weights,
                        "--data-root", synthetic_root, "--custom", "--categories", "cubes",
                        "--resize", 64, "--crop", 64, "--save-models", "--calibration-fraction", 0.25,
                        "--plots", 0, "--result-dir", result, *flags]) == 0
        out[name] = result
    return out


@pytest.mark.parametrize("method", list(FIT_FLAGS))
def test_save_load_predict_reproduces_test_scores(method, fitted, synthetic_root, resnet18_weights,
                                                  tmp_path):
    result = fitted[method]
    model_file = result / "models" / "cubes.pt"
    assert run_cli(["--predict", synthetic_root / "cubes" / "test", "--model", model_file,
                    "--weights", resnet18_weights, "--result-dir", tmp_path, "--batch-size", 5]) == 0
    fitted_scores = {row["path"]: float(row["image_score"])
                     for row in read_csv(result / "scores" / "cubes.csv")}
    rows = read_csv(tmp_path / "predictions.csv")
    assert len(rows) == len(fitted_scores) == 12
    category_dir = synthetic_root / "cubes"
    for row in rows:
        relative = Path(row["path"]).relative_to(category_dir).as_posix()
        # Scored in batches of 5 here and 8 when fitted: the same sums in another order. The
        # rounding of a distance is relative to the features' norms, not to the distance
        # (conftest.assert_distances_close); for these features that stays below 1e-4 of a score.
        assert float(row["image_score"]) == pytest.approx(fitted_scores[relative], rel=1e-4), row
        # the folder's sub-folders kept: good/000.png and blob/000.png are two overlays
        overlay = Path(row["overlay"])
        assert overlay.is_file()
        assert overlay.relative_to(tmp_path / "predictions") == \
            Path(relative).relative_to("test").with_suffix(".png")
    metrics = json.loads((result / "metrics.json").read_text())["categories"]["cubes"]
    calibration = metrics["calibration"]
    # 12 training images: 3 held out for the threshold, 9 in the memory
    assert calibration["n_images"] == 3 and metrics["n_train"] == 9
    threshold = float(rows[0]["threshold"])
    assert threshold == pytest.approx(calibration["image_threshold"])
    assert rows[0]["threshold_source"] == "calibration"
    for row in rows:
        assert row["anomalous"] == str(int(float(row["image_score"]) >= threshold))


def test_overlay_names_never_collide():
    from pipeline import overlay_names

    names = overlay_names([Path("in/good/000.png"), Path("in/crack/000.png"),
                           Path("in/crack/000.jpg"), Path("in/crack/000_png.png")])
    assert names == ["good/000", "crack/000_png", "crack/000_jpg", "crack/000_png_1"]
    assert overlay_names([Path("in/good/000.png")]) == ["000"]


def test_an_overlay_caption_writes_accented_letters(tmp_path):
    """OpenCV's fonts have ASCII only: "défaut.png" was captioned as "d??faut.png"."""
    from utils.plots import write_overlay

    image, heat = np.full((32, 32, 3), 128, np.uint8), np.zeros((32, 32), np.float32)
    bars = {}
    for caption in ("défaut.png", "d??faut.png", "defaut.png"):
        write_overlay(image, heat, (0.0, 1.0), tmp_path / "o.png", caption)
        bars[caption] = cv2.imread(str(tmp_path / "o.png"))[:22]
    assert bars["défaut.png"].shape == (22, 512, 3)  # the 32-px image enlarged, beside its map
    assert not np.array_equal(bars["défaut.png"], bars["d??faut.png"])
    # the accent is drawn: e and é differ only above the letter
    differ = np.flatnonzero((bars["défaut.png"] != bars["defaut.png"]).any(axis=(1, 2)))
    assert len(differ) and differ.max() < 8


def test_a_full_disk_while_predicting_is_one_line(fitted, resnet18_weights, synthetic_root,
                                                   tmp_path, monkeypatch, capsys):
    """The overlays were written by cv2.imwrite, which answers a full disk with False: the run
    then ended in os.replace's FileNotFoundError for the file never written."""
    import errno

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    out = tmp_path / "p"
    assert run_cli(["--predict", synthetic_root / "cubes" / "test", "--model",
                    fitted["patchcore"] / "models" / "cubes.pt", "--weights", resnet18_weights,
                    "--result-dir", out]) == 2
    assert capsys.readouterr().err.endswith(
        f"error: No space left on device (the outputs go to {out}); free some space there, then "
        "run the same command\n")


def test_calibration_images_never_enter_the_memory(fitted):
    payload = torch.load(fitted["patchcore"] / "models" / "cubes.pt", weights_only=True)
    images_in_bank = set(payload["memory"]["provenance"][:, 0].tolist())
    assert images_in_bank <= set(range(9)), "provenance indexes the 9 memory images only"
    assert payload["thresholds"]["image_source"] == "calibration"


def test_predict_takes_any_size_and_format(fitted, resnet18_weights, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "gray.png"), rng.integers(0, 256, (90, 70), dtype=np.uint8))
    cv2.imwrite(str(folder / "rgba.png"), rng.integers(0, 256, (50, 120, 4), dtype=np.uint8))
    cv2.imwrite(str(folder / "photo.jpg"), rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "deep16.png"), rng.integers(0, 65535, (80, 80), dtype=np.uint16))
    cv2.imwrite(str(folder / "scan.tif"), rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "web.webp"), rng.integers(0, 256, (72, 72, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)).convert("P").save(
        folder / "palette.png")
    out = tmp_path / "out"
    assert run_cli(["--predict", folder, "--model", fitted["patchcore"] / "models" / "cubes.pt",
                    "--weights", resnet18_weights, "--result-dir", out]) == 0
    rows = read_csv(out / "predictions.csv")
    assert sorted(r["path"].split("/")[-1] for r in rows) == [
        "deep16.png", "gray.png", "palette.png", "photo.jpg", "rgba.png", "scan.tif", "web.webp"]
    assert all(np.isfinite(float(r["image_score"])) for r in rows)
    assert len(list((out / "predictions").glob("*.png"))) == 7


@pytest.mark.parametrize("flags, named", [
    (["--k", "3"], "--k only applies when fitting: --predict uses the saved model's settings; "
                   "drop it"),
    # the seeds are refused with the sweep, before the rest is resolved
    (["--method", "spade", "--seeds", "0", "1"], "--seeds only applies"),
    (["--method", "spade"], "--method only applies"),
    (["--dry-run"], "--dry-run estimates a fit; it does not apply to --predict"),
    (["--resize", "300", "--categories", "bottle", "--save-models", "--plot-workers", "2"],
     "--categories, --plot-workers, --resize, --save-models only apply when fitting: --predict "
     "uses the saved model's settings; drop them, or refit with --save-models"),
])
def test_predict_refuses_the_settings_only_a_fit_reads(fitted, tmp_path, capsys, flags, named):
    """They used to be ignored without a word (--method spade on a PatchCore model), or to fail
    far from the cause (--seeds 0 1: "--backbone is unknown")."""
    out = tmp_path / "never"
    assert run_cli(["--predict", tmp_path, "--model", fitted["patchcore"] / "models" / "cubes.pt",
                    "--result-dir", out, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {named}") and err.count("\n") == 0
    assert not out.exists()


def test_a_warning_during_a_progress_bar_gets_its_own_line(fitted, resnet18_weights, tmp_path,
                                                           capsys, monkeypatch):
    """Warnings go through tqdm.write while bars are drawn; they used to be appended to the bar's
    line ("predict:   0%|...| 0/1 [00:00<?, ?it/s]warning: skipping ...")."""
    import re

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # bars are drawn on a terminal
    folder = tmp_path / "new"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((64, 64, 3), np.uint8))
    (folder / "broken.png").write_bytes(b"not a png")
    assert main.main(["--predict", str(folder), "--model",
                      str(fitted["patchcore"] / "models" / "cubes.pt"), "--weights",
                      str(resnet18_weights), "--skip-bad-images", "--workers", "0",
                      "--result-dir", str(tmp_path / "out")]) == 0  # progress bars on
    err = capsys.readouterr().err
    assert "predict:" in err, "a progress bar was drawn"
    pieces = re.split(r"[\r\n]", err)
    assert f"warning: skipping {folder / 'broken.png'}: the file is missing, empty, truncated " \
           "or not an image" in pieces


def test_predict_skips_a_bad_image_only_when_asked_and_decodes_each_image_once(
        fitted, resnet18_weights, tmp_path, capsys, monkeypatch):
    import datasets.mvtec

    folder = tmp_path / "new"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        cv2.imwrite(str(folder / f"{name}.png"), rng.integers(0, 256, (64, 64, 3), np.uint8))
    (folder / "broken.png").write_bytes(b"not a png")
    decoded = []
    read = datasets.mvtec.decode_image
    monkeypatch.setattr(datasets.mvtec, "decode_image",
                        lambda path: (decoded.append(Path(path).name), read(path))[1])
    flags = ["--predict", folder, "--model", fitted["patchcore"] / "models" / "cubes.pt",
             "--weights", resnet18_weights, "--batch-size", 2]
    assert run_cli(flags + ["--result-dir", tmp_path / "strict"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot read image {folder / 'broken.png'}")
    # the rows scored before it are kept, and the error says the csv holds only those
    rows = read_csv(tmp_path / "strict" / "predictions.csv")
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.png"]
    assert error.endswith("; predictions.csv holds only the 2 images scored before it\n")
    decoded.clear()
    out = tmp_path / "skipping"
    assert run_cli(flags + ["--skip-bad-images", "--result-dir", out]) == 0
    assert sorted(decoded) == ["a.png", "b.png", "broken.png", "c.png"]  # the overlays included
    rows = read_csv(out / "predictions.csv")
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.png", "c.png"]
    assert sorted(p.name for p in (out / "predictions").glob("*.png")) == ["a.png", "b.png",
                                                                         "c.png"]
    assert "3 images" in capsys.readouterr().out
    broken_only = tmp_path / "broken_only"
    broken_only.mkdir()
    (broken_only / "x.png").write_bytes(b"not a png")
    assert run_cli(["--predict", broken_only, *flags[2:], "--skip-bad-images",
                    "--result-dir", tmp_path / "none"]) == 2
    warning, error = capsys.readouterr().err.splitlines()
    assert warning == (f"warning: skipping {broken_only / 'x.png'}: the file is missing, empty, "
                       "truncated or not an image")
    assert error.startswith("error: the image to predict could not be read (named above)")
    # the same scores as each image predicted on its own (up to the float rounding of another
    # batch size)
    for row in rows:
        alone = tmp_path / f"alone_{Path(row['path']).stem}"
        assert run_cli(["--predict", row["path"], *flags[2:], "--result-dir", alone]) == 0
        assert float(read_csv(alone / "predictions.csv")[0]["image_score"]) == pytest.approx(
            float(row["image_score"]), rel=1e-5)


def test_loading_refuses_other_weights_and_backbone(fitted, tmp_path, capsys):
    model_file = fitted["patchcore"] / "models" / "cubes.pt"
    torch.manual_seed(123)
    other = tmp_path / "other_resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    image = tmp_path / "one.png"
    cv2.imwrite(str(image), np.zeros((64, 64, 3), np.uint8))
    assert run_cli(["--predict", image, "--model", model_file, "--weights", other,
                    "--result-dir", tmp_path / "a"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --model {model_file} was fitted with other resnet18 weights")
    assert err.endswith("pass the fitted ones with --weights") and "\n" not in err
    assert run_cli(["--predict", image, "--model", model_file, "--backbone", "mobilenet_v2",
                    "--result-dir", tmp_path / "b"]) == 2
    assert (f"--model {model_file} was fitted with --backbone resnet18, not mobilenet_v2"
            in capsys.readouterr().err)


def test_a_saved_model_given_as_weights_points_to_predict(fitted, tmp_path, capsys,
                                                          synthetic_root):
    model_file = fitted["spade"] / "models" / "cubes.pt"
    assert run_cli(["--weights", model_file, "--backbone", "resnet18", "--custom", "--data-root",
                    synthetic_root, "--categories", "cubes", "--result-dir", tmp_path / "r"]) == 2
    assert capsys.readouterr().err == (
        f"error: --weights {model_file} is a model saved by --save-models, not backbone weights; "
        f"score images with it: --predict PATH --model {model_file}\n")


def test_loading_refuses_another_format_version(fitted, tmp_path, capsys, resnet18_weights):
    payload = torch.load(fitted["spade"] / "models" / "cubes.pt", weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    changed = tmp_path / "future.pt"
    torch.save(payload, changed)
    (tmp_path / "new").mkdir()
    assert run_cli(["--predict", tmp_path / "new", "--model", changed, "--weights",
                    resnet18_weights, "--result-dir", tmp_path / "r"]) == 2
    assert (f"error: --model {changed} has format version {FORMAT_VERSION + 1}, this code reads "
            f"version {FORMAT_VERSION}; refit with --save-models") in capsys.readouterr().err


def test_predict_needs_a_model_and_a_model_file_that_exists(tmp_path, capsys):
    assert main.main(["--predict", str(tmp_path), "--result-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == (f"error: --predict {tmp_path} needs --model FILE (saved "
                                       "by a run with --save-models)\n")
    new = tmp_path / "new"
    new.mkdir()
    assert run_cli(["--predict", new, "--model", tmp_path / "none.pt",
                    "--result-dir", tmp_path / "r"]) == 2
    assert f"--model {tmp_path / 'none.pt'} does not exist" in capsys.readouterr().err
    assert run_cli(["--predict", new, "--model", tmp_path,
                    "--result-dir", tmp_path / "r"]) == 2
    assert f"--model {tmp_path} is a folder; give one model file in it" in capsys.readouterr().err

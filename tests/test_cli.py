"""main.py end to end on tiny synthetic data, and its one-line errors."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import main
from tests.conftest import interrupted_after, run_cli
from utils.parse import flag_names


def test_end_to_end_writes_every_output(tmp_path, synthetic_root, resnet18_weights):
    out = tmp_path / "result"
    code = run_cli(["--method", "patchcore", "--backbone", "resnet18", "--weights", resnet18_weights,
                    "--data-root", synthetic_root, "--custom", "--resize", 64, "--crop", 64,
                    "--coreset", 0.5, "--plots", 2, "--result-dir", out])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "patchcore" and metrics["backbone"] == "resnet18"
    assert set(metrics["categories"]) == {"cubes", "grid"}
    for name, m in metrics["categories"].items():
        for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_f1_max", "fit_seconds",
                    "test_seconds", "n_train", "n_test"):
            assert key in m, (name, key)
        assert m["n_train"] == 12
        # planted blobs and scratches on a smooth texture: found well above chance
        assert m["pixel_auroc"] > 0.8 and m["image_auroc"] > 0.7, (name, m)
    assert metrics["mean"]["image_auroc"] == pytest.approx(
        sum(m["image_auroc"] for m in metrics["categories"].values()) / 2)
    assert (out / "roc_curve.png").stat().st_size > 10_000
    assert (out / "pred_dist" / "cubes.png").is_file()
    # nested defect types become flat file names; at most --plots figures per type
    grid_figures = sorted(p.name for p in (out / "localization" / "grid").iterdir())
    assert "bent-left_000.png" in grid_figures
    assert len([n for n in grid_figures if n.startswith("scratch_")]) == 2
    table = (out / "results.md").read_text()
    assert "| cubes |" in table and "| **mean** |" in table
    # each defect folder (nested ones by their path) against the category's good test images
    grid_types = metrics["categories"]["grid"]["defect_types"]
    assert sorted(grid_types) == ["bent/left", "bent/right", "scratch"]
    for kind, m in grid_types.items():
        n = sum(1 for p in (synthetic_root / "grid" / "test" / kind).iterdir())
        assert m["n_images"] == n
        assert f"| grid | {kind} | {n} | {m['image_auroc']:.3f} |" in table


def test_unknown_category_is_one_line_listing_names(tmp_path, capsys):
    assert main.main(["--categories", "bottle", "bottel", "--result-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --categories bottel is not an MVTec AD category (did you mean "
                          "bottle?); they are bottle, ")
    assert "zipper" in err and err.count("\n") == 1
    assert main.main(["--categories", "srew", "xyz", "--result-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(
        "error: --categories srew xyz are not MVTec AD categories (did you mean screw?); they are")


@pytest.mark.parametrize("flags", [["--categories", "bottle,cable"], ["--k", "1,3"],
                                   ["--coreset", "0.1,0.2"], ["--seeds", "0,1"]])
def test_a_comma_separated_list_is_told_to_use_spaces(tmp_path, capsys, flags):
    """Read as one value, it was refused as one bad name or number without saying why."""
    with contextlib.suppress(SystemExit):
        assert main.main([*flags, "--result-dir", str(tmp_path), "--dry-run"]) == 2
    last = capsys.readouterr().err.rstrip().splitlines()[-1]  # argparse's usage comes first
    assert last.endswith("(several values go separated by spaces, not commas)")
    assert flags[0] in last and flags[1] in last


@pytest.mark.parametrize("flag,value", [("--coreset", "0"), ("--coreset", "1.5"), ("--k", "0")])
def test_out_of_range_values_are_rejected(flag, value, capsys):
    with pytest.raises(SystemExit):
        main.build_parser().parse_args([flag, value])
    assert flag in capsys.readouterr().err


def test_missing_data_is_one_clear_line(tmp_path, capsys, resnet18_weights):
    code = run_cli(["--backbone", "resnet18", "--weights", resnet18_weights, "--data-root",
                    tmp_path / "nowhere", "--categories", "bottle", "--no-download",
                    "--result-dir", tmp_path / "r"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bottle/train/good" in err and "Traceback" not in err


def test_weights_for_the_wrong_architecture(tmp_path, capsys, resnet18_weights, synthetic_root):
    code = run_cli(["--backbone", "mobilenet_v2", "--weights", resnet18_weights, "--data-root",
                    synthetic_root, "--custom", "--result-dir", tmp_path / "r"])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not fit --backbone mobilenet_v2" in err and "missing" in err
    # the backbone the file does fit is named (found by trying each on the meta device)
    assert "pass --backbone resnet18, which they fit, or weights saved from " \
           "torchvision.models.mobilenet_v2" in err


def test_a_pickled_model_or_a_broken_file_as_weights_is_one_line(tmp_path, capsys, synthetic_root,
                                                               resnet18_weights):
    """torch's own refusal runs to several lines; a whole pickled model gets the one command that
    turns it into a state dict, and that command works."""
    import shlex
    import subprocess
    import sys

    import torch
    import torchvision

    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(resnet18_weights, weights_only=True))
    torch.save(model, tmp_path / "whole_model.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(Path(resnet18_weights).read_bytes()[:4096])
    base = ["--backbone", "resnet18", "--data-root", synthetic_root, "--custom",
            "--result-dir", tmp_path / "r"]
    errors = {}
    for name in ("whole_model.pth", "truncated.pth"):
        assert run_cli(base + ["--weights", tmp_path / name]) == 2
        errors[name] = capsys.readouterr().err.strip()
        assert errors[name].count("\n") == 0 and "PyTorch 2.6" not in errors[name]
    assert run_cli(base + ["--weights", tmp_path]) == 2
    assert capsys.readouterr().err == (f"error: --weights {tmp_path} is a folder; give the path "
                                       "of a saved state dict file in it\n")
    assert errors["truncated.pth"].startswith(
        f"error: --weights {truncated} is not a readable PyTorch state dict (RuntimeError")
    err = errors["whole_model.pth"]
    assert "holds a pickled torchvision.models.resnet.ResNet, not a state dict" in err
    command = shlex.split(err.split("save its state dict once: ", 1)[1])
    assert command[:2] == ["python", "-c"]
    subprocess.run([sys.executable, "-c", command[2]], cwd=tmp_path, check=True)
    converted = torch.load(tmp_path / "weights.pth", weights_only=True)
    reference = torch.load(resnet18_weights, weights_only=True)
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[key], reference[key]) for key in reference)


def test_nan_in_the_weights_or_the_activations_is_one_line_not_a_hang(
        tmp_path, capsys, resnet18_weights, synthetic_root):
    """NaN weights made every feature NaN: PatchCore's candidates greedy then waited forever for
    a bound to settle, and other methods scored NaN. A file holding NaN is refused as it loads;
    activations that overflow from finite weights (here a BatchNorm scale that folds to inf, as
    float16 overflows) are named where each method meets them, before a fit or metric uses them
    (the scores' own check: tests/test_pipeline.py)."""
    import torch

    state = torch.load(resnet18_weights, weights_only=True)
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    state = torch.load(resnet18_weights, weights_only=True)
    state["layer1.0.bn2.weight"].fill_(3e38)  # finite, but not once divided by sqrt(var + eps)
    torch.save(state, tmp_path / "overflow.pth")
    base = ["--backbone", "resnet18", "--data-root", synthetic_root, "--custom", "--categories",
            "cubes", "--resize", 64, "--crop", 64, "--plots", 0, "--result-dir", tmp_path / "r"]
    cause = (" hold NaN or infinite values: the backbone's activations overflowed (with "
             "--precision fp16, use fp32 or bf16) or its --weights are broken")
    with interrupted_after(300):
        assert run_cli(base + ["--weights", tmp_path / "nan.pth"]) == 2
        assert capsys.readouterr().err == (
            f"error: --weights {tmp_path / 'nan.pth'} holds NaN or infinite values "
            "(layer2.0.conv1.weight): a damaged file or a diverged training; pass other weights\n")
        said = {}
        for method in ("patchcore", "padim", "spade"):
            flags = ["--method", method] + ["--k", 3] * (method == "spade")
            assert run_cli(base + flags + ["--weights", tmp_path / "overflow.pth"]) == 2
            said[method] = capsys.readouterr().err.splitlines()[0]
    assert said["patchcore"] == "error: the patch features to subsample" + cause
    assert said["padim"] == "error: the training features" + cause
    assert said["spade"] == "error: the memory bank's features" + cause


def test_k_larger_than_memory_bank(tmp_path, capsys, resnet18_weights, synthetic_root):
    code = run_cli(["--backbone", "resnet18", "--weights", resnet18_weights, "--data-root",
                    synthetic_root, "--custom", "--categories", "cubes", "--resize", 64, "--crop", 64,
                    "--coreset", 0.001, "--k", 50, "--result-dir", tmp_path / "r"])
    assert code == 2
    # 0.1 % of 12 images x 64 patches: the greedy keeps at least one
    assert capsys.readouterr().err.strip() == ("error: --k 50 is larger than the memory bank "
                                               "(1 patch); lower --k or raise --coreset")


def test_same_seed_gives_identical_metrics(tmp_path, synthetic_root, resnet18_weights):
    """Same seed, machine and inputs -> the same numbers (timings aside); PatchCore's random
    projection and coreset start are seeded, so a partial coreset is the case that could drift."""
    def metrics_of(name):
        out = tmp_path / name
        assert run_cli(["--backbone", "resnet18", "--weights", resnet18_weights, "--data-root",
                        synthetic_root, "--custom", "--categories", "cubes", "--resize", 64,
                        "--crop", 64, "--coreset", 0.1, "--plots", 0, "--result-dir", out]) == 0
        cubes = json.loads((out / "metrics.json").read_text())["categories"]["cubes"]
        return {k: v for k, v in cubes.items()
                if k not in ("timings", "fit_seconds", "test_seconds", "test_images_per_second")}

    first, second = metrics_of("a"), metrics_of("b")
    assert first == second
    assert first["memory"] == {"bank_patches": int(12 * 8 * 8 * 0.1)}  # 12 x 8x8 layer2, 10 %


def _category(tmp_path, **kwargs):
    from datasets.synthetic import make_category
    make_category(tmp_path / "data", "part", size=48, seed=3, **kwargs)
    return tmp_path / "data"


def _fit_flags(weights, root, out, method_flags=("--coreset", 0.5)):
    return ["--backbone", "resnet18", "--weights", weights, "--data-root", root, "--custom",
            "--resize", 48, "--crop", 48, *method_flags, "--plots", 0, "--result-dir", out]


def test_a_custom_category_that_is_not_there_is_named_with_those_that_are(tmp_path, capsys,
                                                                          resnet18_weights):
    """Not looked for among MVTec's downloads (the message used to point at MVTec's page)."""
    root = _category(tmp_path, n_train=2, n_test_good=1, defects={"dent": 1})
    flags = _fit_flags(resnet18_weights, root, tmp_path / "r")
    assert run_cli(flags + ["--categories", "part", "bottle"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --categories bottle is not a category folder (with train/good) in --data-root "
        f"{root}, which has: part")
    assert run_cli(flags + ["--categories", "prat"]) == 2
    assert capsys.readouterr().err.strip().endswith("which has: part; did you mean part?")


def test_empty_train_folder_names_it(tmp_path, capsys, resnet18_weights):
    root = _category(tmp_path, n_train=2, n_test_good=1, defects={"dent": 1})
    for image in (root / "part" / "train" / "good").iterdir():
        image.unlink()
    assert run_cli(_fit_flags(resnet18_weights, root, tmp_path / "r")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: no training images in {root / 'part' / 'train' / 'good'}: put the "
                   "normal (defect-free) images there as PNG/JPEG")


def test_defect_type_without_masks_skips_pixel_metrics_with_a_warning(tmp_path, capsys,
                                                                      resnet18_weights):
    root = _category(tmp_path, n_train=4, n_test_good=2, defects={"dent": 2}, masks=False)
    out = tmp_path / "r"
    assert run_cli(_fit_flags(resnet18_weights, root, out)) == 0
    expected = root / "part" / "ground_truth" / "dent" / "000_mask.png"  # what a misnamed one lacks
    assert (f"warning: part: defective images without a mask: 2 of 2 (dent; e.g. no "
            f"{expected}); pixel metrics skipped" in capsys.readouterr().err)
    part = json.loads((out / "metrics.json").read_text())["categories"]["part"]
    assert part["pixel_auroc"] is None and part["image_auroc"] is not None


def test_masks_that_mark_nothing_are_said_not_left_as_n_a(tmp_path, capsys, resnet18_weights):
    """Blank masks (a defect marked in another file, an export gone wrong) gave pixel metrics n/a
    without a word."""
    import cv2
    import numpy as np

    root = _category(tmp_path, n_train=4, n_test_good=2, defects={"dent": 2})
    for mask in (root / "part" / "ground_truth" / "dent").iterdir():
        cv2.imwrite(str(mask), np.zeros((48, 48), np.uint8))
    assert run_cli(_fit_flags(resnet18_weights, root, tmp_path / "r")) == 0
    assert ("warning: part: the masks mark no pixel inside the crop as defect; pixel metrics n/a "
            "(a mask marks its defect with non-zero values)") in capsys.readouterr().err


def test_figures_of_normal_images_in_sub_folders_are_named_apart(tmp_path, resnet18_weights):
    """test/good/day1/000.png and test/good/day2/000.png: one figure each, not one overwritten;
    so too 000.png beside 000.jpg, and good/a-b/ beside good/a/b/, whose names would meet."""
    root = _category(tmp_path, n_train=4, n_test_good=4, defects={"dent": 1})
    good = root / "part" / "test" / "good"
    images = sorted(good.iterdir())
    for day, image in enumerate(images[:2], start=1):
        (good / f"day{day}").mkdir()
        image.rename(good / f"day{day}" / "000.png")
    (good / "day1" / "000.jpg").write_bytes(images[2].read_bytes())  # decoded by its content
    (good / "day2" / "x").mkdir()
    images[3].rename(good / "day2" / "x" / "000.png")
    (good / "day2-x").mkdir()
    (good / "day2-x" / "000.png").write_bytes((good / "day2" / "x" / "000.png").read_bytes())
    images[2].unlink()
    out = tmp_path / "r"
    assert run_cli(_fit_flags(resnet18_weights, root, out)[:-4] + ["--plots", 5,
                                                                   "--result-dir", out]) == 0
    assert sorted(p.name for p in (out / "localization" / "part").iterdir()) == [
        "dent_000.png", "good-day1_000.png", "good-day1_000_1.png", "good-day2-x_000.png",
        "good-day2-x_000_1.png", "good-day2_000.png"]


def test_no_defective_test_images_reports_auroc_not_defined(tmp_path, capsys, resnet18_weights):
    root = _category(tmp_path, n_train=4, n_test_good=3, defects={})
    out = tmp_path / "r"
    assert run_cli(_fit_flags(resnet18_weights, root, out)) == 0
    captured = capsys.readouterr()
    assert ("warning: part: no defective test images; AUROC, F1 and pixel metrics are not "
            "defined (reported as n/a)") in captured.err
    assert "image AUROC n/a" in captured.out
    part = json.loads((out / "metrics.json").read_text())["categories"]["part"]
    assert part["image_auroc"] is None and part["pixel_auroc"] is None
    assert "| part | n/a |" in (out / "results.md").read_text()


def test_no_good_test_images_reports_image_metrics_not_defined(tmp_path, capsys,
                                                                 resnet18_weights):
    """Without normal test images the lowest score flags every image with no false alarm: image
    F1-max was 1.0 and its threshold the lowest score, silently, and a saved model decided by
    that threshold. Pixel metrics stay: a defective image has normal pixels around its defect."""
    root = _category(tmp_path, n_train=4, n_test_good=0, defects={"dent": 3})
    out = tmp_path / "r"
    assert run_cli(_fit_flags(resnet18_weights, root, out) + ["--save-models"]) == 0
    captured = capsys.readouterr()
    assert ("warning: part: no good (normal) test images in test/good; image AUROC and F1 are "
            "not defined (reported as n/a)") in captured.err
    part = json.loads((out / "metrics.json").read_text())["categories"]["part"]
    assert part["image_auroc"] is None
    assert (part["image_f1_max"], part["image_threshold"]) == (None, None)
    assert part["pixel_auroc"] is not None and part["pixel_f1_max"] < 1.0
    from models.saved_model import read_model_file
    thresholds = read_model_file(out / "models" / "part.pt")["thresholds"]
    assert thresholds["image_source"] == "calibration"  # from held-out normal images
    assert thresholds["image_test_f1"] is None


def test_unwritable_result_dir_fails_before_any_work(tmp_path, capsys, resnet18_weights):
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    code = run_cli(_fit_flags(resnet18_weights, tmp_path / "no_data_needed", blocker / "result"))
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --result-dir {blocker / 'result'} is not writable")
    assert err.endswith("choose a folder you can write to")
    assert run_cli(_fit_flags(resnet18_weights, tmp_path / "no_data_needed", blocker)) == 2
    assert capsys.readouterr().err.strip() == \
        f"error: --result-dir {blocker} is a file; give a folder (it is made if missing)"


@pytest.mark.parametrize("flag,value", [("--method", "padin"), ("--backbone", "resnet19")])
def test_unknown_method_or_backbone_lists_the_choices(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.build_parser().parse_args([flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: invalid choice: '{value}'" in err
    assert ("patchcore" in err) if flag == "--method" else ("wide_resnet50_2" in err)


@pytest.mark.parametrize("stop_at, coreset, said", [
    ("grid", [0.5], "interrupted: the finished categories are in {out}/metrics.json; the same "
                    "command with --resume runs the rest"),
    ("cubes", [0.5], "interrupted before any category finished; nothing was kept"),
    ("grid", [0.5, 0.25], "interrupted: the finished categories are in each configuration's "
                          "folder under {out}; the same command with --resume runs the rest"),
])
def test_ctrl_c_keeps_finished_categories(stop_at, coreset, said, tmp_path, capsys, monkeypatch,
                                          synthetic_root, resnet18_weights):
    import pipeline

    real = pipeline.Run.category

    def interrupted(run, category, *rest):
        if category == stop_at:
            raise KeyboardInterrupt
        return real(run, category, *rest)

    monkeypatch.setattr(pipeline.Run, "category", interrupted)
    out = tmp_path / "r"
    code = run_cli(["--backbone", "resnet18", "--weights", resnet18_weights, "--data-root",
                    synthetic_root, "--custom", "--resize", 64, "--crop", 64, "--coreset",
                    *coreset, "--plots", 0, "--result-dir", out])
    assert code == 130
    assert capsys.readouterr().err.endswith("\n" + said.format(out=out) + "\n")
    first = out / "coreset=0.5" if len(coreset) > 1 else out
    finished = ["cubes"] if stop_at == "grid" else []
    assert list(json.loads((first / "metrics.json").read_text())["categories"]) == finished \
        if finished else not (first / "metrics.json").exists()


@pytest.mark.parametrize("setup, noted", [("fresh", True), ("earlier run", False),
                                           ("resumed", True)])
def test_an_error_in_a_later_category_says_where_the_finished_ones_are(
        setup, noted, tmp_path, capsys, monkeypatch, synthetic_root, resnet18_weights):
    """The error is the message; the line after it says what was kept, and only when this run
    kept something: an earlier run's metrics.json there is not this run's, a resumed one is."""
    import os

    import pipeline
    from utils.errors import DataError

    flags = ["--backbone", "resnet18", "--weights", resnet18_weights, "--data-root",
             synthetic_root, "--custom", "--resize", 64, "--crop", 64, "--plots", 0,
             "--result-dir", tmp_path / "r"]
    out = tmp_path / "r"
    if setup == "resumed":  # cubes finished by an earlier run, kept; grid fails
        assert run_cli(flags + ["--categories", "cubes"]) == 0
        os.utime(out / "metrics.json", (1e9, 1e9))
        flags.append("--resume")
    real = pipeline.Run.category
    fail_at = "cubes" if setup == "earlier run" else "grid"

    def failing(run, category, *rest):
        if category == fail_at:
            raise DataError(f"cannot read image {category}/000.png")
        return real(run, category, *rest)

    monkeypatch.setattr(pipeline.Run, "category", failing)
    if setup == "earlier run":  # e.g. an error met before the earlier run is moved to previous/
        monkeypatch.setattr(pipeline, "move_earlier_run", lambda *args, **kwargs: None)
        out.mkdir()
        (out / "metrics.json").write_text("{}")
        os.utime(out / "metrics.json", (1e9, 1e9))
    capsys.readouterr()
    assert run_cli(flags) == 2
    err = capsys.readouterr().err.splitlines()
    if noted:
        assert err[-1] == (f"the finished categories are in {out}/metrics.json; once that is "
                           "fixed, the same command with --resume runs the rest")
        err.pop()
    assert err[-1] == f"error: cannot read image {fail_at}/000.png"


def test_a_full_disk_mid_run_is_one_line_and_says_what_was_kept(tmp_path, capsys, monkeypatch,
                                                                synthetic_root, resnet18_weights):
    """It ended in the traceback of whichever writer met it first (PIL, json, OpenCV)."""
    import errno

    import utils.report

    real, written = utils.report.write_text_atomically, []

    def fills_up(path, text):  # room for the first category's metrics.json and results.md
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        real(path, text)

    monkeypatch.setattr(utils.report, "write_text_atomically", fills_up)
    out = tmp_path / "r"
    assert run_cli(["--backbone", "resnet18", "--weights", resnet18_weights, "--data-root",
                    synthetic_root, "--custom", "--resize", 64, "--crop", 64, "--plots", 0,
                    "--result-dir", out]) == 2
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"error: No space left on device (the outputs go to {out}); free some space there, then "
        "run the same command with --resume",
        f"the finished categories are in {out}/metrics.json; once that is fixed, the same "
        "command with --resume runs the rest"]


def test_ctrl_c_under_torchrun_is_reported_by_rank_0_only(tmp_path, capsys, monkeypatch,
                                                          synthetic_root, resnet18_weights):
    """torchrun passes Ctrl-C to every process: each used to print its own 'interrupted' line."""
    import pipeline

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Run, "category", interrupted)
    monkeypatch.setenv("RANK", "1")
    code = run_cli(["--backbone", "resnet18", "--weights", resnet18_weights, "--data-root",
                    synthetic_root, "--custom", "--resize", 64, "--crop", 64, "--plots", 0,
                    "--result-dir", tmp_path / "r"])
    assert code == 130 and "interrupted" not in capsys.readouterr().err


def test_stdout_closed_early_stops_quietly(tmp_path, synthetic_root, resnet18_weights):
    """`python main.py | head -1`: the first category's line is read and the pipe closed; the
    next print used to end in a BrokenPipeError traceback. Its stderr, a pipe as a log file
    is, gets no progress bar: they are for a terminal."""
    import subprocess
    import sys

    from tests.conftest import REPO

    command = [sys.executable, str(REPO / "main.py"), "--backbone", "resnet18", "--weights",
               str(resnet18_weights), "--data-root", str(synthetic_root), "--custom",
               "--resize", "64", "--crop", "64", "--coreset", "0.5", "--plots", "0",
               "--result-dir", str(tmp_path / "r")]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        first = process.stdout.readline()
        process.stdout.close()
        err = process.stderr.read().decode()
    assert first.startswith(b"cubes: image AUROC")
    assert process.returncode == 141 and "Traceback" not in err, err
    assert "it/s" not in err and "\r" not in err, err
    assert "cubes" in json.loads((tmp_path / "r" / "metrics.json").read_text())["categories"]


def _living_in_group(group: int) -> list[str]:
    """The processes of process group ``group`` that have not exited (a zombie has: whether it
    is reaped is up to the machine's init), as their command lines; Linux's /proc."""
    living = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, process_group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(process_group) == group and state != "Z":
                living.append((stat.parent / "cmdline").read_text().replace("\0", " ")[:120])
        except (OSError, ValueError, IndexError):
            continue  # ended while being read
    return living


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads Linux's /proc")
@pytest.mark.parametrize("stop", ["SIGINT to the group", "SIGTERM to the group", "SIGTERM",
                                  "SIGKILL"])
def test_a_killed_run_leaves_no_process_behind(stop, tmp_path):
    """Ctrl-C typed in a terminal (SIGINT to the whole process group) used to stop every
    decoding and drawing process with a traceback of its own, and drop the queued figures; now
    they are drawn, and the run alone says it stopped. SIGTERM takes Ctrl-C's way: the finished
    category is said and kept, with its ROC figure, and its queued figures are drawn. Sent to
    the whole process group (as batch systems do), no DataLoader "worker killed by signal" error
    is met on the way, and before Python 3.11 the run no longer waits for ever on a drawing
    pool it broke. SIGKILL to the run alone (the out-of-memory killer) runs no clean-up at all.
    Every way, the drawing, decoding and loader processes used to wait for ever on their queues:
    they must be gone within seconds."""
    import contextlib
    import signal
    import subprocess
    import sys
    import time

    import torch
    import torchvision

    from datasets.synthetic import make_category
    from tests.conftest import REPO

    root = tmp_path / "data"
    # figures enough that drawing them outlasts the signal's way to the run even on a loaded
    # machine: with one a side, they were sometimes all drawn before the run took the signal
    make_category(root, "first", n_train=4, n_test_good=6, defects={"blob": 6}, size=64)
    # big enough that the run is still on it when the first category's line is read
    make_category(root, "slow", n_train=400, n_test_good=2, defects={"blob": 2}, size=64)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = tmp_path / "r"
    helpers = (["--workers", "2", "--no-cache"] if stop == "SIGTERM to the group" else
               ["--decode-ahead", "2", "--cache-dir", str(tmp_path / "cache")])
    command = [sys.executable, str(REPO / "main.py"), "--backbone", "resnet18", "--weights",
               str(weights), "--data-root", str(root), "--custom", "--categories", "first",
               "slow", "--resize", "224", "--crop", "224", "--coreset", "0.01", "--plots", "6",
               "--plot-workers", "2", "--no-progress", "--result-dir", str(out), *helpers]
    # stderr to a file: a process left behind would hold a pipe open, and reading it would hang
    # (SIGINT as a terminal leaves it: a test runner started in the background ignores it)
    with open(tmp_path / "stderr", "wb") as stderr, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as process:
        first = process.stdout.readline()
        process.stdout.close()
        if stop.endswith(" to the group"):
            os.killpg(process.pid, getattr(signal, stop.split()[0]))
        else:
            process.send_signal(getattr(signal, stop))
        process.wait(timeout=60)
    err = (tmp_path / "stderr").read_text()
    assert first.startswith(b"first: image AUROC"), (first, err)
    deadline = time.monotonic() + 20
    while _living_in_group(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _living_in_group(process.pid)
    if left:  # ended, so that a failure does not leave them to the next tests
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert left == []
    if stop != "SIGKILL":
        assert process.returncode == (130 if stop.startswith("SIGINT") else 143)
        assert err.endswith(f"interrupted: the finished categories are in {out}/metrics.json; "
                            "the same command with --resume runs the rest\n"), err
        assert "Traceback" not in err and "Exception ignored" not in err, err
        assert list(json.loads((out / "metrics.json").read_text())["categories"]) == ["first"]
        assert (out / "roc_curve.png").is_file() and not (out / ".run.lock").exists()
    if stop != "SIGKILL":
        assert "drawing the " in err and "figures still queued before stopping" in err, err
        assert sorted(p.name for p in (out / "localization" / "first").iterdir()) == [
            f"{kind}_{i:03d}.png" for kind in ("blob", "good") for i in range(6)]
        assert (out / "pred_dist" / "first.png").is_file()


def test_main_runs_off_the_main_thread(tmp_path, capsys):
    """A notebook or a service may call main() from a thread, where Python sets no signal
    handler: the SIGTERM handler is left out there instead of raising ValueError."""
    import threading

    codes = []
    thread = threading.Thread(target=lambda: codes.append(main.main(
        ["--data-root", str(tmp_path), "--custom", "--dry-run"])))
    thread.start()
    thread.join()
    assert codes == [2]
    assert capsys.readouterr().err == (f"error: no category folders with train/good under "
                                       f"--data-root {tmp_path}\n")


def test_calibration_fraction_that_leaves_no_training_image(tmp_path, capsys, resnet18_weights):
    root = _category(tmp_path, n_train=2, n_test_good=1, defects={"dent": 1})
    code = run_cli(_fit_flags(resnet18_weights, root, tmp_path / "r", method_flags=()) +
                   ["--method", "padim", "--calibration-fraction", 0.5])
    assert code == 2
    assert (f"error: --calibration-fraction 0.5 leaves 1 of 2 training images in "
            f"{root / 'part' / 'train'}, and the method needs at least 2; lower it "
            "(--calibration-fraction 0 holds none out, as the papers) or add normal images"
            ) in capsys.readouterr().err


def test_cuda_out_of_memory_retries_with_smaller_batches(tmp_path, resnet18_weights, caplog):
    """A step that runs out of GPU memory is retried at half the batch until it fits; the scores
    equal the unsplit ones. At one image per batch the error says what to lower."""
    import torch

    from models.patchcore import PatchCore
    from tests.conftest import assert_distances_close, fit_on_synthetic
    from utils.errors import UserError

    model, batch = fit_on_synthetic(tmp_path, resnet18_weights, PatchCore, size=64,
                                    coreset_fraction=0.5)
    expected = model.predict(batch["image"])
    embed, sizes = model.embed, []

    def embed_fitting_two(images):
        sizes.append(len(images))
        if len(images) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return embed(images)

    model.embed = embed_fitting_two
    scores, grid = model.predict(batch["image"])
    # the kNN ran on 2 images' patches at a time instead of 6: same distances up to rounding
    # (the maps are convex combinations of such distances: the same bound holds)
    norms = torch.cat([embed(batch["image"]).flatten(0, 2), model.memory_bank]).square().sum(1)
    assert_distances_close(scores, expected.image_scores, norms.max())
    assert_distances_close(grid, expected.anomaly_maps, norms.max())
    assert sizes[:3] == [6, 3, 2] and model.max_batch == 2
    assert "CUDA out of memory at 6 images per batch; retrying with 3" in caplog.text

    def never_fits(images):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    model.embed = never_fits
    with pytest.raises(UserError) as error:
        model.predict(batch["image"])
    # the library names its settings; the command line renders them as flags
    assert str(error.value).startswith("CUDA out of memory even at 1 image per batch; lower "
                                       "resize/crop, pick a smaller backbone or coreset_fraction")
    assert error.value.render(flag_names(main.build_parser())) == (
        "CUDA out of memory even at 1 image per batch; lower --resize/--crop, pick a smaller "
        "--backbone or --coreset, or use --device cpu")


def test_background_figure_workers_write_the_same_figures(tmp_path, synthetic_root,
                                                          resnet18_weights):
    """Figures drawn by spawned workers must be the ones drawn in turn, byte for byte -- the
    final ROC figure included, although earlier ROC figures may finish in any order."""
    written = {}
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        assert run_cli(["--backbone", "resnet18", "--weights", resnet18_weights, "--data-root",
                        synthetic_root, "--custom", "--resize", 64, "--crop", 64, "--coreset",
                        0.5, "--plots", 1, "--plot-workers", workers, "--result-dir", out]) == 0
        written[workers] = {p.relative_to(out).as_posix(): p.read_bytes()
                            for p in out.rglob("*.png")}
    assert "roc_curve.png" in written[0] and "localization/grid/scratch_000.png" in written[0]
    assert written[2] == written[0]


def test_a_drawing_process_runs_main_py_without_loading_torch():
    """A spawned drawing process runs the parent's main file as __mp_main__ (as multiprocessing
    does, with runpy) before its first figure; main.py must not load torch there, or every drawing
    process pays for importing torch."""
    import subprocess
    import sys

    from tests.conftest import REPO

    check = ("import runpy, sys; runpy.run_path('main.py', run_name='__mp_main__'); "
             "import utils.plots; print(sorted(m for m in ('torch', 'pipeline', 'utils.plots') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True,
                          text=True, check=True)
    assert done.stdout.split() == ["['utils.plots']"], done.stdout + done.stderr


def test_roc_redraws_go_one_at_a_time_and_the_last_one_written_holds_every_category(
        tmp_path, resnet18_weights, monkeypatch):
    """Background redraws of roc_curve.png may finish in any order, so only one runs at a time
    and the end of the run draws it once more only when the last redraw lacks a category."""
    from concurrent.futures import Future

    import pipeline
    from config import resolve_config

    drawn = []
    monkeypatch.setattr(pipeline, "plot_roc_curves",
                        lambda curves, path, title: drawn.append(sorted(curves)))

    class Figures:  # background figures whose jobs finish when the test says so
        background = True

        def __init__(self):
            self.jobs = []

        def submit(self, function, curves, path, title):
            self.jobs.append((Future(), sorted(curves)))
            return self.jobs[-1][0]

    run = pipeline.Run(resolve_config(backbone="resnet18", weights=resnet18_weights,
                                      data_root=tmp_path / "data", result_dir=tmp_path / "r",
                                      progress=False))
    figures = Figures()

    def finish(category):
        run._finished(category, {"timings": {}}, {"image": None, "pixel": None}, figures, None)

    finish("a")
    finish("b")  # the redraw holding "a" still runs: none submitted
    assert [held for _, held in figures.jobs] == [["a"]]
    figures.jobs[0][0].set_result(None)
    finish("c")
    assert [held for _, held in figures.jobs] == [["a"], ["a", "b", "c"]]
    figures.jobs[1][0].set_result(None)
    run._draw_roc()
    assert drawn == []  # the last redraw written holds every category
    finish("d")
    figures.jobs[2][0].cancel()  # e.g. dropped by Ctrl-C before it started
    run._draw_roc()
    run._draw_roc()
    assert drawn == [["a", "b", "c", "d"]]


def test_figures_drawn_in_turn_draw_the_roc_figure_once_also_after_an_error(
        tmp_path, synthetic_root, resnet18_weights, monkeypatch):
    import pipeline

    drawn = []
    draw = pipeline.plot_roc_curves
    monkeypatch.setattr(pipeline, "plot_roc_curves", lambda curves, path, title: (
        drawn.append(sorted(curves)), draw(curves, path, title)))
    args = ["--backbone", "resnet18", "--weights", resnet18_weights, "--data-root",
            synthetic_root, "--custom", "--resize", 64, "--crop", 64, "--coreset", 0.5,
            "--plots", 0, "--plot-workers", 0]
    assert run_cli(args + ["--result-dir", tmp_path / "all"]) == 0
    assert drawn == [["cubes", "grid"]]
    drawn.clear()
    evaluate = pipeline.evaluate

    def fail_on_grid(test, scores, device="cpu"):
        if test.category_dir.name == "grid":
            raise RuntimeError("grid failed")
        return evaluate(test, scores, device)

    monkeypatch.setattr(pipeline, "evaluate", fail_on_grid)
    with pytest.raises(RuntimeError, match="grid failed"):
        run_cli(args + ["--result-dir", tmp_path / "failed"])
    assert drawn == [["cubes"]] and (tmp_path / "failed" / "roc_curve.png").is_file()


def test_a_failing_background_figure_is_raised_not_lost(tmp_path):
    from utils.plots import FigureQueue, plot_score_distribution

    figures = FigureQueue(1)
    figures.submit(plot_score_distribution, [], [], tmp_path / "empty.png", "no scores")
    with pytest.raises(ValueError):
        figures.wait()
    figures.close()


def test_figures_are_drawn_with_the_collector_paused_and_freed_after(tmp_path, monkeypatch):
    """The cyclic collector is off while a figure's objects are made (else it walks them again
    and again) and on again afterwards, also when drawing fails; the closed figures are freed."""
    import gc

    import numpy as np

    from utils import plots

    seen = []
    subplots = plots.plt.subplots
    monkeypatch.setattr(plots.plt, "subplots",
                        lambda *a, **k: (seen.append(gc.isenabled()), subplots(*a, **k))[1])
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    heat = rng.random((32, 32)).astype(np.float32)
    plots.plot_localization(image, None, heat, 0.5, (0.0, 1.0), tmp_path / "first.png", "first")
    gc.collect()
    before = len(gc.get_objects())
    for i in range(10):
        plots.plot_localization(image, None, heat, 0.5, (0.0, 1.0), tmp_path / f"{i}.png", "x")
        plots.plot_score_distribution(np.array([0, 1]), np.array([0.2, 0.7]),
                                      tmp_path / f"h{i}.png", "h")
    with pytest.raises(ValueError):
        plots.plot_score_distribution([], [], tmp_path / "empty.png", "no scores")
    assert gc.isenabled()
    assert len(seen) == 21 and not any(seen)
    gc.collect()
    assert len(gc.get_objects()) < before + 2000, "closed figures must not stay referenced"
    assert plots.plt.get_fignums() == [], "a figure that failed stays open"


def test_main_reads_on_old_pythons_so_their_users_get_the_version_line():
    """A file is compiled whole before its first line runs: one newer construct in main.py and an
    old Python meets a SyntaxError instead of main.py's line saying which version it needs.
    ``ast`` checks syntax back to 3.7; ``from __future__ import annotations`` fails on 3.6."""
    import ast

    source = (Path(__file__).resolve().parents[1] / "main.py").read_text()
    ast.parse(source, feature_version=(3, 7))
    assert "from __future__ import annotations" not in source
    assert "if sys.version_info < (3, 9):" in source


def test_a_category_keeps_its_look_on_both_roc_panels(tmp_path, monkeypatch):
    """A category without pixel metrics shifted every later category's colour on the pixel
    panel; beyond ten categories the colours repeat, the next ten dashed."""
    import numpy as np

    from utils import plots

    drawn = []

    def looks(fig, path, **kwargs):
        drawn.append([{line.get_label(): (line.get_color(), line.get_linestyle())
                       for line in ax.lines if ":" in line.get_label()} for ax in fig.axes])
        plots.plt.close(fig)

    monkeypatch.setattr(plots, "_save", looks)
    fpr = np.linspace(0, 1, 5)
    curves = {f"part{i}": {"image": (fpr, fpr, 0.5), "pixel": None if i == 0 else (fpr, fpr, 0.5)}
              for i in range(12)}
    plots.plot_roc_curves(curves, tmp_path / "roc.png", "roc")
    image, pixel = ({label.split(":")[0]: look for label, look in panel.items()}
                    for panel in drawn[0])
    assert set(image) - set(pixel) == {"part0"}
    assert all(pixel[name] == image[name] for name in pixel)
    assert len(set(image.values())) == 12 and image["part10"][1] == "--"


@pytest.mark.parametrize("side", [1, 2])
def test_a_localization_figure_of_the_smallest_crops_is_drawn(tmp_path, side):
    """``--crop 1`` gives one-pixel maps; matplotlib outlines a region on 2 x 2 pixels at least,
    so the predicted region of a smaller map is shaded instead of traced."""
    import numpy as np

    from utils import plots

    image = np.full((side, side, 3), 128, np.uint8)
    heat = np.ones((side, side), np.float32)
    plots.plot_localization(image, np.ones((side, side)), heat, 0.5, (0.0, 1.0),
                            tmp_path / "one.png", "one pixel")
    assert (tmp_path / "one.png").stat().st_size > 0


def test_every_flag_is_in_the_readme_usage_and_flag_table():
    # The README is where a newcomer learns the flags; one added to the parser alone is invisible.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    usage = readme.split("## Usage", 1)[1].split("Examples:", 1)[0]
    flags = {s for a in main.build_parser()._actions for s in a.option_strings
             if s.startswith("--") and s != "--help"}
    missing_usage = sorted(f for f in flags if f"[{f}" not in usage and f"{f} " not in usage)
    missing_table = sorted(f for f in flags if f"`{f}" not in usage)
    assert not missing_usage and not missing_table, (missing_usage, missing_table)


def test_every_link_within_the_readme_finds_its_section():
    # GitHub's heading anchors: lower case, punctuation but hyphens dropped, spaces as hyphens; a
    # renamed section must not leave the contents line pointing nowhere
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    readme = re.sub(r"^```.*?^```", "", readme, flags=re.M | re.S)  # a shell comment is no heading
    sections = {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
                for heading in re.findall(r"^#+ (.+)$", readme, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", readme)
    assert len(links) >= 13 and not [link for link in links if link not in sections]


@pytest.mark.parametrize("flags,said", [
    (["--plots", "-1"], "argument --plots: must be a whole number >= 0, got -1"),
    # a quantile's hint, not a fraction's ("0.1 keeps 10%" would mislead here)
    (["--calibration-quantile", "1.5"],
     "argument --calibration-quantile: must be in (0, 1], got 1.5; e.g. 0.99 is the 99th "
     "percentile"),
    (["--patch-size", "4"], "argument --patch-size: must be an odd whole number >= 1 (a "
                            "neighbourhood centred on its patch), got 4; e.g. 3"),
    (["--layers", "2+5"], "argument --layers: must be distinct stages 1-4 joined by '+', got "
                          "2+5; e.g. 2+3 (PatchCore's) or 1+2+3"),
])
def test_an_out_of_range_value_is_refused_by_the_parser(flags, said, capsys):
    with pytest.raises(SystemExit) as exited:
        main.main(flags)
    assert exited.value.code == 2
    assert said in capsys.readouterr().err


def test_a_tilde_in_a_path_flag_is_the_home_folder(tmp_path, monkeypatch):
    # the shell expands ~ only at the start of a word: --data-root=~/mvtec reaches Python as is
    monkeypatch.setenv("HOME", str(tmp_path))
    args = main.build_parser().parse_args([
        "--data-root=~/mvtec", "--result-dir=~/result", "--cache-dir", "~/cache", "--weights",
        "~/w.pth", "--predict", "~/new", "~/more.png", "--model=~/models/bottle.pt"])
    assert args.data_root == tmp_path / "mvtec" and args.result_dir == tmp_path / "result"
    assert args.cache_dir == tmp_path / "cache" and args.weights == tmp_path / "w.pth"
    assert args.predict == [tmp_path / "new", tmp_path / "more.png"]
    assert args.model == tmp_path / "models" / "bottle.pt"


def _python_3_8() -> str | None:
    """A Python 3.8 interpreter on this machine (PATH, or pyenv's), if there is one that runs."""
    found = [shutil.which("python3.8"),
             *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python")))]
    for path in filter(None, found):
        if subprocess.run([path, "-c", ""], capture_output=True).returncode == 0:
            return path
    return None


def test_a_python_older_than_3_9_is_one_line():
    python = _python_3_8()
    if python is None:
        pytest.skip("no Python 3.8 interpreter on this machine (PATH or ~/.pyenv/versions)")
    done = subprocess.run([python, "main.py", "--help"], capture_output=True, text=True,
                          cwd=Path(main.__file__).parent)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: this project needs Python 3.9 or newer; this is 3.8.")
    assert done.stderr.count("\n") == 1


def test_help_names_each_setting_once_per_meaning_with_each_methods_default():
    from models.registry import setting_help
    assert setting_help("k") == (
        "patchcore, sa_patchcore: nearest bank patches averaged into a patch score (default 1); "
        "spade: nearest training images: the image score's and the pixel gallery's (default 50)")
    assert setting_help("coreset_fraction").endswith(
        "(default patchcore 0.1, sa_patchcore 0.01)")
    assert setting_help("reweight").count("default") == 1  # the help states it: not repeated


def test_a_dollar_in_a_folder_name_is_drawn_as_written(tmp_path):
    """matplotlib parsed a $ pair in a title or legend as TeX: a custom category "w$\\q$" stopped
    the run with its traceback, before the category's outputs were written."""
    import numpy as np

    from utils import plots

    name = "w$\\q$"
    labels, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])
    plots.plot_score_distribution(labels, scores, tmp_path / "dist.png", f"{name}: scores")
    curve = (np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.5)
    plots.plot_roc_curves({name: {"image": curve, "pixel": None}}, tmp_path / "roc.png", name)
    image = np.zeros((32, 32, 3), np.uint8)
    plots.plot_localization(image, None, np.zeros((32, 32), np.float32), 0.5, (0.0, 1.0),
                            tmp_path / "loc.png", f"{name}/a$b$")
    assert all((tmp_path / f).stat().st_size > 0 for f in ("dist.png", "roc.png", "loc.png"))

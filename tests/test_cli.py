"""main.py end to end on tiny synthetic data, and its one-line errors."""
import json

import pytest

import main


def run(args):
    return main.main([str(a) for a in args] + ["--no-progress", "--workers", "0"])


def test_end_to_end_writes_every_output(tmp_path, synthetic_root, resnet18_weights):
    out = tmp_path / "result"
    code = run(["--method", "patchcore", "--backbone", "resnet18", "--weights", resnet18_weights,
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


def test_unknown_category_is_an_argparse_error_listing_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(["--categories", "bottle", "bottel"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "bottel" in err and "zipper" in err


@pytest.mark.parametrize("flag,value", [("--coreset", "0"), ("--coreset", "1.5"), ("--k", "0")])
def test_out_of_range_values_are_rejected(flag, value, capsys):
    with pytest.raises(SystemExit):
        main.parse_args([flag, value])
    assert flag in capsys.readouterr().err


def test_missing_data_is_one_clear_line(tmp_path, capsys, resnet18_weights):
    code = run(["--backbone", "resnet18", "--weights", resnet18_weights, "--data-root",
                tmp_path / "nowhere", "--categories", "bottle", "--no-download",
                "--result-dir", tmp_path / "r"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bottle/train/good" in err and "Traceback" not in err


def test_weights_for_the_wrong_architecture(tmp_path, capsys, resnet18_weights, synthetic_root):
    code = run(["--backbone", "mobilenet_v2", "--weights", resnet18_weights, "--data-root",
                synthetic_root, "--custom", "--result-dir", tmp_path / "r"])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not fit --backbone mobilenet_v2" in err and "missing" in err


def test_k_larger_than_memory_bank(tmp_path, capsys, resnet18_weights, synthetic_root):
    code = run(["--backbone", "resnet18", "--weights", resnet18_weights, "--data-root",
                synthetic_root, "--custom", "--categories", "cubes", "--resize", 64, "--crop", 64,
                "--coreset", 0.01, "--k", 50, "--result-dir", tmp_path / "r"])
    assert code == 2
    assert "--k 50 is larger than the memory bank" in capsys.readouterr().err


def test_same_seed_gives_identical_metrics(tmp_path, synthetic_root, resnet18_weights):
    """Same seed, machine and inputs -> the same numbers (timings aside); PatchCore's random
    projection and coreset start are seeded, so a partial coreset is the case that could drift."""
    def metrics_of(name):
        out = tmp_path / name
        assert run(["--backbone", "resnet18", "--weights", resnet18_weights, "--data-root",
                    synthetic_root, "--custom", "--categories", "cubes", "--resize", 64,
                    "--crop", 64, "--coreset", 0.1, "--plots", 0, "--result-dir", out]) == 0
        cubes = json.loads((out / "metrics.json").read_text())["categories"]["cubes"]
        return {k: v for k, v in cubes.items()
                if k not in ("timings", "fit_seconds", "test_seconds", "test_images_per_second")}

    first, second = metrics_of("a"), metrics_of("b")
    assert first == second
    assert first["memory_size"] == int(12 * 8 * 8 * 0.1)  # 12 images x 8x8 layer2 grid, 10 %

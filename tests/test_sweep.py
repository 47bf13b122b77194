"""Sweeps: several values per setting and several seeds run as one, and give one table."""
import json
import logging

import pytest

import main
from datasets import MVTEC_CATEGORIES


def test_a_sweep_writes_each_configuration_and_one_table(tmp_path, synthetic_root,
                                                         resnet18_weights):
    out = tmp_path / "sweep"
    assert main.main(["--method", "patchcore", "--coreset", "0.1", "0.5", "--seeds", "0", "1",
                      "--backbone", "resnet18", "--weights", str(resnet18_weights),
                      "--data-root", str(synthetic_root), "--custom", "--resize", "64",
                      "--crop", "64", "--plots", "0", "--no-progress", "--workers", "0",
                      "--result-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [c["label"] for c in summary["configurations"]] == ["coreset=0.1", "coreset=0.5"]
    first_run = json.loads((out / "coreset=0.1" / "seed-0" / "metrics.json").read_text())
    assert summary["environment"] == first_run["environment"]
    assert f"Measured {first_run['environment']['started_utc']} at " in \
        (out / "results.md").read_text()
    assert summary["seeds"] == [0, 1]
    for label in ("coreset=0.1", "coreset=0.5"):
        per_seed = [json.loads((out / label / f"seed-{s}" / "metrics.json").read_text())
                    for s in (0, 1)]
        # each configuration and seed has its usual outputs, with its own settings
        for seed, metrics in zip((0, 1), per_seed):
            assert metrics["config"]["seed"] == seed
            assert metrics["config"]["method_settings"]["coreset_fraction"] == float(label[8:])
            assert (out / label / f"seed-{seed}" / "roc_curve.png").is_file()
        cell = summary["metrics"]["image_auroc"]["grid"][label]
        assert cell["values"] == [100 * m["categories"]["grid"]["image_auroc"] for m in per_seed]
        assert abs(cell["mean"] - sum(cell["values"]) / 2) < 1e-9
        mean_row = summary["metrics"]["pixel_auroc"]["mean"][label]["values"]
        # the mean of percentages, against 100 x the mean: equal up to rounding
        assert mean_row == pytest.approx([100 * m["mean"]["pixel_auroc"] for m in per_seed])
    # the bank grows with the coreset: the sweep really ran different settings
    banks = [json.loads((out / label / "seed-0" / "metrics.json").read_text())
             ["categories"]["cubes"]["memory"]["bank_patches"] for label in ("coreset=0.1",
                                                                          "coreset=0.5")]
    assert banks == [int(12 * 64 * 0.1), int(12 * 64 * 0.5)]
    table = (out / "results.md").read_text()
    assert table.startswith(f"# patchcore on custom data in {synthetic_root.name}/ (resnet18)")
    # custom data beside MVTec AD's published numbers would compare two datasets
    assert "| Category | coreset=0.1 | coreset=0.5 |" in table and "Paper" not in table
    assert "## Seconds per category (fit + test)" in table
    assert " ± " in table
    assert (out / "roc_curve.png").stat().st_size > 10_000
    assert not (out / "metrics.json").exists(), "the top level holds the comparison only"


@pytest.mark.parametrize("categories, image_mean, aupro_mean", [
    (("bottle", "cable"), 99.7, None),  # the paper's bottle and cable; it gives AUPRO's mean only
    (MVTEC_CATEGORIES, 99.0, 93.5),     # all 15: its own means
])
def test_the_paper_column_compares_the_same_categories(categories, image_mean, aupro_mean):
    from utils.sweep_report import markdown, summarize

    runs = [{"label": "k=1", "settings": {"k": 1}, "seed": 0, "result_dir": "/r",
             "report": {"config": {"custom": False, "data_root": "mvtec_anomaly_detection"},
                        "categories": {c: {"image_auroc": 0.9, "pixel_auroc": 0.9,
                                           "pixel_aupro": 0.9} for c in categories}}}]
    summary = summarize("patchcore", "wide_resnet50_2", runs)
    assert summary["metrics"]["image_auroc"]["mean"]["paper"] == pytest.approx(image_mean)
    assert summary["metrics"]["pixel_aupro"]["mean"]["paper"] == aupro_mean
    assert summary["metrics"]["image_auroc"]["cable"]["paper"] == 99.4
    assert markdown(summary).startswith("# patchcore on MVTec AD (wide_resnet50_2): sweep")


@pytest.mark.parametrize("custom", [False, True])
def test_a_plain_runs_table_has_the_papers_numbers_for_mvtec_categories(tmp_path, custom):
    from utils.report import Report

    report = Report(tmp_path, "patchcore", "wide_resnet50_2",
                    {"custom": custom, "data_root": "mvtec_anomaly_detection"})
    for category in ("bottle", "cable"):
        report.add(category, {"image_auroc": 0.9, "pixel_auroc": 0.8, "pixel_aupro": 0.7,
                              "pixel_f1_max": 0.6, "fit_seconds": 1.0, "test_seconds": 1.0})
    table = (tmp_path / "results.md").read_text().splitlines()
    if custom:
        assert table[0] == "# patchcore on custom data in mvtec_anomaly_detection/ " \
                           "(wide_resnet50_2)"
        assert table[2] == ("| Category | Image AUROC | Pixel AUROC | AUPRO | Pixel F1-max | "
                            "Time (s) |")
        return
    # the paper gives PatchCore's AUPRO as a 15-category mean only: no AUPRO column for two
    assert table[2] == ("| Category | Image AUROC | Paper | Pixel AUROC | Paper | AUPRO | "
                        "Pixel F1-max | Time (s) |")
    assert table[4] == "| bottle | 0.900 | 1.000 | 0.800 | 0.986 | 0.700 | 0.600 | 2.0 |"
    pixel_mean = (98.6 + 98.5) / 2 / 100  # the paper's bottle and cable: these two's mean
    assert table[6] == (f"| **mean** | 0.900 | 0.997 | 0.800 | {pixel_mean:.3f} | 0.700 | 0.600 "
                        "| 2.0 |")


def test_a_mean_over_fewer_categories_than_the_table_says_so(tmp_path):
    """A category without masks has no pixel metrics; the mean row of those is over the others
    only, which the tables used to leave to be guessed (and the sweep's showed a blank cell)."""
    from utils.report import Report
    from utils.sweep_report import markdown, summarize

    masked = {"image_auroc": 0.9, "pixel_auroc": 0.8, "pixel_aupro": 0.7, "pixel_f1_max": 0.6,
              "fit_seconds": 1.0, "test_seconds": 1.0}
    unmasked = dict(masked, pixel_auroc=None, pixel_aupro=None, pixel_f1_max=None)
    config = {"custom": True, "data_root": "parts"}
    report = Report(tmp_path, "patchcore", "resnet18", config)
    report.add("gear", masked)
    assert "where" not in (tmp_path / "results.md").read_text()
    report.add("plate", unmasked)
    report.add("a|b", dict(masked, defect_types={"dent|deep": {"n_images": 2,
                                                               "image_auroc": 1.0}}))
    table = (tmp_path / "results.md").read_text().splitlines()
    # a "|" in a folder's name stays in its cell, not splitting it into two columns
    assert "| a\\|b | 0.900 | 0.800 | 0.700 | 0.600 | 2.0 |" in table
    assert "| a\\|b | dent\\|deep | 2 | 1.000 |" in table
    assert table[table.index("| **mean** | 0.900 | 0.800 | 0.700 | 0.600 | 2.0 |") + 2] == (
        "The means of Pixel AUROC, AUPRO and Pixel F1-max are over the 2 of 3 categories where "
        "they are defined.")
    runs = [{"label": label, "settings": {}, "seed": 0, "result_dir": "/r",
             "report": {"config": config, "categories": {"gear": masked, "plate": unmasked}}}
            for label in ("k=1", "k=3")]
    sweep = markdown(summarize("patchcore", "resnet18", runs)).split("## ")
    aupro = next(part for part in sweep if part.startswith("AUPRO"))
    assert "| plate | n/a | n/a |" in aupro and "| **mean** | 70.0 | 70.0 |" in aupro
    assert "The mean row is over the 1 of 2 categories where this metric is defined." in aupro
    assert "where" not in next(part for part in sweep if part.startswith("Image AUROC"))


def test_one_setting_and_one_seed_keep_the_plain_layout(tmp_path, synthetic_root,
                                                        resnet18_weights):
    out = tmp_path / "plain"
    assert main.main(["--method", "spade", "--k", "3", "--seeds", "1", "--backbone", "resnet18",
                      "--weights", str(resnet18_weights), "--data-root", str(synthetic_root),
                      "--custom", "--categories", "cubes", "--resize", "64", "--crop", "64",
                      "--plots", "0", "--no-progress", "--workers", "0",
                      "--result-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "pred_dist", "results.md",
                                                     "roc", "roc_curve.png", "scores"]
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 1


@pytest.mark.parametrize("flags, named", [
    (["--seeds", "0", "1", "0"], "--seeds 0 1 0 lists 0 more than once"),
    (["--seed", "0", "1", "0"], "--seed 0 1 0 lists 0 more than once"),
    (["--coreset", "0.1", "0.10"], "--coreset 0.1 0.1 lists 0.1 more than once"),
    (["--categories", "a", "b", "a"], "--categories a b a lists a more than once"),
])
def test_a_value_listed_twice_is_refused_before_any_work(tmp_path, capsys, flags, named):
    """It would run twice, and a sweep's mean +- std would count the repeat as another seed."""
    out = tmp_path / "never"
    assert main.main(["--data-root", str(tmp_path / "no_data"), "--custom", "--result-dir",
                      str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {named}; give each value once"
    assert not out.exists()


@pytest.mark.parametrize("flag, seeds", [("--seed", ["-5"]), ("--seeds", ["0", "4294967296"])])
def test_a_seed_outside_numpys_range_is_one_line(tmp_path, capsys, flag, seeds):
    """It used to end in numpy's traceback ("Seed must be between 0 and 2**32 - 1"). The error
    names the flag as typed."""
    assert main.main(["--data-root", str(tmp_path), "--custom", flag, *seeds,
                      "--result-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {flag} {seeds[-1]} is outside 0 .. 2**32 - 1; give a whole number in that range")


def test_the_library_checks_the_seed_range_too(tmp_path):
    from config import resolve_config
    from utils.errors import SettingError
    with pytest.raises(SettingError, match=r"^seeds -1 is outside 0 \.\. 2\*\*32 - 1"):
        resolve_config(seed=-1, result_dir=tmp_path / "r")


def test_a_sweep_over_stages_loads_one_backbone_tapping_all_of_them(tmp_path, synthetic_root,
                                                                   resnet18_weights, monkeypatch,
                                                                   capsys):
    import torch

    import pipeline
    built = []
    build = pipeline.build_extractor
    monkeypatch.setattr(pipeline, "build_extractor",
                        lambda config, layers=None: built.append(layers) or build(config, layers))
    out = tmp_path / "stages"
    assert main.main(["--layers", "2+3", "layer2+layer1", "--backbone", "resnet18",
                      "--weights", str(resnet18_weights), "--data-root", str(synthetic_root),
                      "--custom", "--categories", "cubes", "--resize", "64", "--crop", "64",
                      "--save-models", "--plots", "0", "--no-progress", "--workers", "0",
                      "--verbose", "--result-dir", str(out)]) == 0
    assert built == [("layer2", "layer3", "layer1")]
    # --verbose: the one backbone's torchinfo summary, once; it runs up to layer3 (ResNet-18's
    # 256 channels at stride 16: 4 x 4 at 64 px)
    summary = capsys.readouterr().err
    assert summary.count("Total params") == 1 and "[1, 256, 4, 4]" in summary
    banks = {}
    for label, stages in (("layers=2+3", ["layer2", "layer3"]),
                          ("layers=1+2", ["layer1", "layer2"])):
        metrics = json.loads((out / label / "metrics.json").read_text())
        assert metrics["config"]["method_settings"]["layers"] == label[7:]
        banks[label] = metrics["categories"]["cubes"]["memory"]["bank_patches"]
        # a saved model rebuilds only its own stages, not all that the shared backbone tapped
        saved = torch.load(out / label / "models" / "cubes.pt", weights_only=True)
        assert saved["layers"] == stages
    # layer1's grid has 4x layer2's patches (16 x 16 against 8 x 8 at 64 px)
    assert banks["layers=1+2"] > 3 * banks["layers=2+3"]


@pytest.mark.parametrize("method", ["spade", "padim", "patchcore"])
def test_seeds_of_a_method_without_a_random_part_are_said_to_repeat_one_result(
        tmp_path, caplog, monkeypatch, method):
    from config import resolve_sweep
    with caplog.at_level(logging.WARNING):
        points = resolve_sweep(method, seeds=[0, 1, 2], result_dir=tmp_path / "r")
    assert [p.seed for p in points] == [0, 1, 2]  # still run as asked
    said = [r.getMessage() for r in caplog.records if "random part" in r.getMessage()]
    assert said == ([] if method != "spade" else [
        "spade has no random part: seeds 0 1 2 give the same numbers, so each configuration "
        "runs 3 times to one result; one seed is enough"])
    if method == "spade":  # under torchrun every process resolves it; only the first says so
        caplog.clear()
        monkeypatch.setenv("RANK", "1")
        with caplog.at_level(logging.WARNING):
            resolve_sweep(method, seeds=[0, 1, 2], result_dir=tmp_path / "r")
        assert not [r for r in caplog.records if "random part" in r.getMessage()]


def test_a_sweep_from_python_takes_its_folder_as_text(tmp_path, synthetic_root, resnet18_weights):
    """The library's sweep, as a notebook writes it: paths as text, as resolve_sweep takes them,
    and the comparison in resolve_sweep's folder unless told otherwise."""
    import pipeline
    from config import resolve_sweep
    out = str(tmp_path / "sweep")
    points = resolve_sweep("spade", {"k": [1, 2]}, result_dir=out, backbone="resnet18",
                           weights=str(resnet18_weights), data_root=str(synthetic_root),
                           custom=True, categories="cubes", resize=64, crop=64, plots=0,
                           workers=0, progress=False)
    summary = pipeline.run_sweep(points)
    assert [c["label"] for c in summary["configurations"]] == ["k=1", "k=2"]
    assert (tmp_path / "sweep" / "results.md").is_file()
    assert (tmp_path / "sweep" / "k=2" / "metrics.json").is_file()
    pipeline.run_sweep(points, out)  # the same folder given as text: the first run moves aside
    assert (tmp_path / "sweep" / "results.md").is_file()
    assert len(list((tmp_path / "sweep" / "previous").iterdir())) == 1


def test_fp16_asked_for_on_a_cpu_is_said_to_be_slow_once_per_run(tmp_path, caplog):
    """A GPU command run on a CPU: float16 autocast falls back to slow kernels there. It still
    runs as asked, and a sweep of several points says so once."""
    import config
    from utils.distributed import said_once
    said_once.clear()  # another test of this process may have said it
    with caplog.at_level(logging.WARNING):
        points = config.resolve_sweep("patchcore", seeds=[0, 1], device="cpu", precision="fp16",
                                      result_dir=tmp_path / "r")
        assert config.resolve_sweep("patchcore", device="cpu", precision="auto",
                                    result_dir=tmp_path / "r")[0].config.precision == "fp32"
    assert [p.config.precision for p in points] == ["fp16", "fp16"]
    said = [r.getMessage() for r in caplog.records if "fp16" in r.getMessage()]
    assert said == ["--precision fp16 on a CPU is several times slower than fp32 (few CPUs "
                    "compute in float16); --precision auto picks fp32 there"]

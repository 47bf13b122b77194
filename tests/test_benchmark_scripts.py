"""The benchmark scripts (run from the command line, as README's Benchmark section shows): bad
input is one line, like main.py's, not a traceback; what they record is what suite_report.py
turns into RESULTS.md's tables."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _suite_report():
    spec = importlib.util.spec_from_file_location("suite_report",
                                                  REPO / "benchmarks" / "suite_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_benchmark_with_a_missing_category_is_one_line(tmp_path):
    done = _run("benchmarks/benchmark.py", "profile", "--backbone", "mobilenet_v2",
                "--data-root", tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: no training images in {tmp_path}/bottle/train/good: "
                                   "put the normal (defect-free) images there as PNG/JPEG")


def test_benchmark_errors_name_its_own_flags(tmp_path):
    """The library names a setting by its RunConfig name (data_root, download); the script's
    line names its flag, and says that the download is main.py's, which this script never does."""
    done = _run("benchmarks/benchmark.py", "table", "--rows", "pc1", "--backbone", "mobilenet_v2",
                "--data-root", tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: category 'bottle' not found in --data-root {tmp_path}: put it so that "
        f"{tmp_path}/bottle/train/good exists (from https://www.mvtec.com/company/research/"
        "datasets/mvtec-ad), or drop --no-download in a main.py run first (benchmark.py reads "
        "local data)")


def test_official_side_by_side_needs_the_official_package_before_any_work(tmp_path):
    done = _run("benchmarks/official.py", "--official-src", tmp_path, "--weights",
                tmp_path / "w.pth", "--data-root", tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().endswith(f"error: --official-src {tmp_path} holds no patchcore "
                                        "package; give the src folder of a patchcore-inspection "
                                        "checkout")


def test_official_side_by_sides_errors_name_its_own_flags(tmp_path, resnet18_weights):
    from datasets.synthetic import make_category

    make_category(tmp_path, "part", n_train=2, n_test_good=1, defects={"blob": 1}, size=32,
                  seed=4)
    done = _run("benchmarks/official.py", "--official-src", tmp_path, "--only", "this",
                "--backbone", "resnet18", "--weights", resnet18_weights, "--device", "cpu",
                "--data-root", tmp_path, "--category", "part", "--work-dir", tmp_path / "work")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: --category part is not an MVTec AD category (did you mean carpet?); they are "
        "bottle, cable, capsule, carpet, grid, hazelnut, leather, metal_nut, pill, screw, tile, "
        "toothbrush, transistor, wood, zipper; use main.py --custom for your own folders")


@pytest.mark.parametrize("eval_first", [False, True])
def test_official_side_by_side_runs_this_project_with_the_official_sides_batchnorm(
        eval_first, tmp_path, resnet18_weights):
    """The official run script's shape probe moves its BatchNorm statistics (README, Faithfulness
    notes): this project's side runs the same way, and with the same seed, so that the two AUROCs
    compare; each side records which statistics it ran with."""
    from datasets.synthetic import make_category

    make_category(tmp_path / "data", "bottle", n_train=6, n_test_good=2, defects={"blob": 2},
                  size=64, seed=4)
    done = _run("benchmarks/official.py", "--official-src", tmp_path, "--only", "this",
                "--backbone", "resnet18", "--weights", resnet18_weights, "--device", "cpu",
                "--data-root", tmp_path / "data", "--category", "bottle", "--workers", "0",
                "--work-dir", tmp_path / "work", "--json", tmp_path / "out.json", "--seed", "3",
                *["--official-eval-first"] * eval_first)
    assert done.returncode == 0, done.stderr
    ran = json.loads((tmp_path / "work" / "this_project" / "metrics.json").read_text())
    assert ran["config"]["official_bn_probe"] is not eval_first
    assert ran["config"]["seed"] == 3  # the official side's seed too
    assert json.loads((tmp_path / "out.json").read_text())["this"]["batchnorm"] == (
        "the weights' own" if eval_first else "after the official probe")


def test_synthetic_benchmark_times_each_run_in_an_emptied_folder(tmp_path, resnet18_weights):
    """Invoked again with the same --work-dir (as gpu_suite.sh's figures part does), the benchmark
    times fresh runs: none of them first moves the last invocation's outputs to previous/."""
    from datasets.synthetic import make_category

    make_category(tmp_path / "data", "toothbrush", n_train=6, n_test_good=2, size=64, seed=1,
                  defects={"blob": 2})
    flags = ["benchmarks/benchmark.py", "synthetic", "--synthetic-root", tmp_path / "data",
             "--categories", "toothbrush", "--backbone", "resnet18", "--weights",
             resnet18_weights, "--device", "cpu", "--runs", "2", "--plots", "0",
             "--work-dir", tmp_path / "work"]
    for invocation in range(2):
        done = _run(*flags, "--json", tmp_path / f"{invocation}.json")
        assert done.returncode == 0, done.stderr
    assert not list((tmp_path / "work").glob("*/previous"))
    runs = json.loads((tmp_path / "1.json").read_text())["result"]["runs"]
    assert [(r["cache"], r["n_train"], r["n_test"]) for r in runs] == [("cold", 6, 4),
                                                                       ("warm", 6, 4)]

    # suite_report.py reads it as gpu_suite.sh names it, beside the earlier invocation as
    # --before: each target cell holds its run's number and whether it meets the target
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "synthetic_patchcore_abc1234.json").write_text((tmp_path / "1.json").read_text())
    report = _suite_report().report(suite, tmp_path / "0.json")
    earlier = json.loads((tmp_path / "0.json").read_text())["result"]["runs"]
    warm, cold = runs[1], runs[0]

    def cell(value, target, more_is_better=False):
        met = round(value, 1) >= target if more_is_better else round(value, 1) <= target
        return f"{value:,.1f} ({'met' if met else 'not met'})"

    assert ("| warm, all 15 categories (s) | "
            f"{cell(earlier[1]['total_seconds'], 20)} | {cell(warm['total_seconds'], 20)} | 20 |"
            in report)
    assert f"| cold, decode included (s) | {cell(earlier[0]['total_seconds'], 40)} | " in report
    assert (f"| {cell(warm['test_images_per_second'], 1500, True)} | 1,500 |" in report)
    assert (f"| {cell(warm['stages_summed']['unattributed'], 0)} | 0 |" in report)
    assert f"| **total, main.py** | **{cold['total_seconds']:,.2f}** | " in report
    for stage in warm["stages_summed"]:
        assert f"| {stage} | " in report, stage


def test_knn_benchmark_scores_one_bank_with_each_index(tmp_path, resnet18_weights):
    """`benchmark.py knn` (RESULTS.md's index comparison): one bank per fraction, every index
    on it, the exact one without loss, and `hnsw@N`'s build effort confined to its own row."""
    import models.knn
    from datasets.synthetic import make_category

    make_category(tmp_path / "data", "cubes", n_train=4, n_test_good=2, size=64, seed=1,
                  defects={"blob": 2})
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "benchmarks" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.main(["knn", "--data-root", str(tmp_path / "data"), "--category", "cubes",
                    "--backbone", "resnet18", "--weights", str(resnet18_weights), "--device",
                    "cpu", "--fractions", "0.5", "1.0", "--indexes", "flat", "hnsw@8", "ivf-flat",
                    "--work-dir", str(tmp_path / "work"), "--json", str(tmp_path / "knn.json")])
    rows = json.loads((tmp_path / "knn.json").read_text())["result"]
    assert [(r["coreset"], r["index"]) for r in rows] == [
        (fraction, index) for fraction in (0.5, 1.0) for index in ("flat", "hnsw@8", "ivf-flat")]
    patches = 4 * 28 * 28  # 224-px crops, PatchCore's stride-8 grid
    assert [r["bank_patches"] for r in rows] == [patches // 2] * 3 + [patches] * 3
    for row in rows:
        assert row["queries"] == 4 * 28 * 28  # the test split's first (and only) batch
        if row["index"] == "flat":
            assert (row["recall_at_1"], row["distance_excess_max"]) == (1.0, 0.0)
    assert models.knn.HNSW_BUILD == 200  # restored after the hnsw@8 row


def _accuracy_sweep(configurations: dict[str, dict], pixel_auroc: dict[str, list[float]],
                    seeds: list[int]) -> dict:
    """A sweep's summary.json, made by the code that writes it, from given bottle metrics."""
    from utils.sweep_report import summarize

    runs = [{"label": label, "settings": settings, "seed": seed, "result_dir": f"/r/{label}",
             "report": {"config": {"custom": False, "data_root": "mvtec"},
                        "categories": {"bottle": {
                 "image_auroc": 1.0, "pixel_auroc": pixel_auroc[label][i] / 100,
                 "pixel_aupro": 0.93, "fit_seconds": 1.0, "test_seconds": 1.0}}}}
            for label, settings in configurations.items() for i, seed in enumerate(seeds)]
    return summarize("patchcore", "mobilenet_v2", runs)


def test_suite_report_holds_each_approximation_to_the_bound_against_the_exact_path(tmp_path):
    """gpu_suite.sh's accuracy part: each approximation's largest difference over the seeds from
    the exact path at the same coreset fraction, beyond 0.1 points flagged, the seeds matched."""
    exact = {"coreset_fraction": 0.01, "coreset_precision": "fp32", "knn_index": "flat",
             "coreset_order": "auto"}
    levers = _accuracy_sweep(
        {"exact": exact, "fp16": {**exact, "coreset_precision": "fp16"},
         "ten exact": {**exact, "coreset_fraction": 0.1},
         "ten knn": {**exact, "coreset_fraction": 0.1, "knn_index": "flat-fp16"}},
        {"exact": [97.50, 97.53, 96.87], "fp16": [97.45, 97.33, 96.87],
         "ten exact": [97.80, 97.70, 97.60], "ten knn": [97.81, 97.70, 97.62]}, seeds=[0, 1, 2])
    # another sweep, other seeds: compared only at the seed both ran (seed 2)
    candidates = _accuracy_sweep({"order": {**exact, "coreset_order": "candidates"}},
                                 {"order": [96.90, 50.0]}, seeds=[2, 7])
    (tmp_path / "accuracy_levers_abc1234.json").write_text(json.dumps(levers))
    (tmp_path / "accuracy_candidates_abc1234.json").write_text(json.dumps(candidates))
    report = _suite_report().report(tmp_path, None)
    rows = [line for line in report.splitlines() if line.startswith("| 0.")]
    assert rows == [
        "| 0.01 | coreset_precision=fp16 | 0.0000 | 0.2000 (seed 1) | 0.0000 | **no** |",
        "| 0.1 | knn_index=flat-fp16 | 0.0000 | 0.0200 (seed 2) | 0.0000 | yes |",
        "| 0.01 | coreset_order=candidates | 0.0000 | 0.0300 (seed 2) | 0.0000 | yes |"]
    assert "1 of 3 configurations exceed the bound." in report


def test_suite_report_of_a_folder_without_suite_output_is_one_line(tmp_path):
    done = _run("benchmarks/suite_report.py", tmp_path, "--before", "none")
    assert done.returncode == 1
    assert done.stderr.strip() == (f"error: {tmp_path} holds no gpu_suite.sh JSON (synthetic_*, "
                                   "official_*, coreset_*, accuracy_*); give the OUT_DIR the "
                                   "suite wrote to")


def test_suite_report_reads_the_recorded_official_and_coreset_runs(tmp_path):
    """The official side by side and the coreset part as they were recorded (benchmarks/runs),
    read back into the numbers RESULTS.md quotes from them."""
    runs = REPO / "benchmarks" / "runs"
    (tmp_path / "official_bottle_abc1234.json").write_text(
        (runs / "cpu_official_bottle_mobilenet.json").read_text())
    (tmp_path / "coreset_abc1234.json").write_text((runs / "h100_coreset_80ea888.json").read_text())
    report = _suite_report().report(tmp_path, None)
    # recorded before the sides said which BatchNorm statistics they ran with: as they ran then
    assert "| official | 28.39 | 7.92 | 1.0000 | 0.9753 | after the official probe | n/a |" \
        in report
    assert re.search(r"\| this \| [\d.]+ \| [\d.]+ \| 1.0000 \| [\d.]+ \| the weights' own \| "
                     r"n/a \|", report)
    assert "Fit: the official code takes 7.8x this project's time." in report
    assert "| 163,856 | 16,385 | 1.45 (88) | 0.84 (51) | 0.84 (51) | 29 | True |" in report


def test_table_benchmark_runs_each_readme_row_cold_then_warm(tmp_path, resnet18_weights):
    """`benchmark.py table` (the README's table, rerun): each chosen row with its README flags
    and every other setting the default, cold then warm, their metrics alike."""
    from datasets.synthetic import make_category

    make_category(tmp_path / "data", "bottle", n_train=8, n_test_good=2, size=64, seed=1,
                  defects={"blob": 2})
    done = _run("benchmarks/benchmark.py", "table", "--data-root", tmp_path / "data",
                "--backbone", "resnet18", "--weights", resnet18_weights, "--device", "cpu",
                "--rows", "padim", "spade5", "--work-dir", tmp_path / "work",
                "--json", tmp_path / "table.json")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "table.json").read_text())["result"]
    rows = result["rows"]
    assert list(rows) == ["padim", "spade5"]
    assert (rows["padim"]["method"], rows["padim"]["method_settings"]["dims"]) == ("padim", 100)
    assert (rows["spade5"]["method"], rows["spade5"]["method_settings"]["k"]) == ("spade", 5)
    assert rows["padim"]["method_settings"]["eps"] == 0.01  # the default, as the README's row
    for row in rows.values():
        for name in ("image_auroc", "pixel_auroc", "pixel_aupro"):
            assert row["cold"][name] == row["warm"][name]
            assert 0.0 <= row["warm"][name] <= 1.0
        assert row["environment"]["versions"]["torch"]
    assert result["cold_and_warm_metrics_differ"] == []
    # one printed table line per row, in the README's columns
    printed = [line for line in done.stdout.splitlines() if line.startswith("| padim ")
               or line.startswith("| spade ")]
    assert len(printed) == 2

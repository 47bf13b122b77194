"""The benchmark scripts (run from the command line, as README's Benchmark section shows) report
bad input in one line, like main.py, instead of a traceback."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_benchmark_with_a_missing_category_is_one_line(tmp_path):
    done = _run("benchmarks/benchmark.py", "profile", "--backbone", "mobilenet_v2",
                "--data-root", tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: no training images in {tmp_path}/bottle/train/good: "
                                   "put the normal (defect-free) images there as PNG/JPEG")


def test_official_side_by_side_needs_the_official_package_before_any_work(tmp_path):
    done = _run("benchmarks/official.py", "--official-src", tmp_path, "--weights",
                tmp_path / "w.pth", "--data-root", tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().endswith(f"error: --official-src {tmp_path} holds no patchcore "
                                        "package; give the src folder of a patchcore-inspection "
                                        "checkout")


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


def test_knn_benchmark_scores_one_bank_with_each_index(tmp_path, resnet18_weights):
    """`benchmark.py knn` (RESULTS.md's index comparison): one bank per fraction, every index
    on it, the exact one without loss, and `hnsw@N`'s build effort confined to its own row."""
    import importlib.util
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

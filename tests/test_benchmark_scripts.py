"""The benchmark scripts (run from the command line, as README's Benchmark section shows) report
bad input in one line, like main.py, instead of a traceback."""
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

"""torchrun with 2 CPU processes (gloo) gives the same banks and metrics as one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datasets.synthetic import make_category
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this torch build has no torch.distributed")


@pytest.fixture(scope="module")
def two_categories(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed_data")
    make_category(root, "cubes", n_train=12, n_test_good=4, size=64, seed=1)
    make_category(root, "grid", n_train=12, n_test_good=4, size=64, grayscale=True, seed=2)
    return root


def launch(flags, processes: int, out, monitor_interval=None
           ) -> subprocess.CompletedProcess:
    """main.py in fresh processes: one plain, or several under torchrun on this machine. Temporary
    files go beside ``out``: torchrun leaves a log folder in the temporary folder of every job.
    ``monitor_interval``: seconds between torchrun's looks at its processes; at the first look
    that finds one failed it lists the failed ones and stops the rest, so a longer interval lets
    processes that fail together all be listed."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(processes)] if processes > 1 else [sys.executable])
    if processes > 1 and monitor_interval is not None:
        launcher[-2:-2] = ["--monitor-interval", str(monitor_interval)]
    return subprocess.run(launcher + ["main.py", *map(str, flags), "--device", "cpu",
                                      "--result-dir", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                       "TMPDIR": str(Path(out).parent)})


def run(flags, processes: int, out) -> subprocess.CompletedProcess:
    done = launch(flags, processes, out)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def common(root, weights, *extra):
    return ["--backbone", "resnet18", "--weights", weights, "--data-root", root, "--custom",
            "--resize", 64, "--crop", 64, "--plots", 1, "--no-progress", "--workers", 0, *extra]


def numbers(out):
    categories = json.loads((out / "metrics.json").read_text())["categories"]
    return {name: {k: m[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "memory",
                                      "n_train", "n_test")} for name, m in categories.items()}


def assert_same_numbers(one, two):
    assert one.keys() == two.keys()
    for name in one:
        for key, value in one[name].items():
            if isinstance(value, float):  # the sums of the pixel metrics in another order
                assert two[name][key] == pytest.approx(value, abs=1e-9), (name, key)
            else:
                assert two[name][key] == value, (name, key)


@pytest.mark.parametrize("case", ["one category, its coreset shards spread",
                                  "categories spread",
                                  "one category, PaDiM fitted by rank 0 and sent"])
def test_two_processes_give_the_one_process_bank_and_metrics(case, tmp_path, two_categories,
                                                             resnet18_weights):
    """With one category the processes share it: PatchCore's shards are reduced by both; a
    method without shards is fitted by rank 0 and its memory sent, and rank 1 scores the second
    of the test split's two batches with that memory."""
    one = ["--categories", "cubes", "--save-models", "--calibration-fraction", 0]
    extra = {"one category, its coreset shards spread":
             [*one, "--coreset", 0.25, "--coreset-shard-size", 4 * 64],
             "categories spread": ["--coreset", 0.25],
             "one category, PaDiM fitted by rank 0 and sent": [*one, "--method", "padim"]}[case]
    flags = common(two_categories, resnet18_weights, *extra)
    run(flags, 1, tmp_path / "one")
    done = run(flags, 2, tmp_path / "two")
    assert_same_numbers(numbers(tmp_path / "one"), numbers(tmp_path / "two"))
    assert done.stdout.count("results: ") == 1, "rank 0 alone reports"
    for name in numbers(tmp_path / "one"):
        assert (tmp_path / "two" / "scores" / f"{name}.csv").read_text() != ""
    if case.startswith("one"):  # the memory itself agrees (PatchCore: 3 shards over 2 processes)
        banks = [torch.load(tmp_path / d / "models" / "cubes.pt", weights_only=True)["memory"]
                 for d in ("one", "two")]
        assert banks[0].keys() == banks[1].keys()
        for key in banks[0]:
            assert torch.equal(banks[0][key], banks[1][key]), key
    assert (tmp_path / "two" / "roc_curve.png").is_file()


def test_a_sweep_over_two_processes_gives_the_same_table(tmp_path, two_categories,
                                                         resnet18_weights):
    flags = common(two_categories, resnet18_weights, "--categories", "cubes", "--seeds", 0, 1,
                   "--coreset", 0.25)
    run(flags, 1, tmp_path / "one")
    run(flags, 2, tmp_path / "two")
    tables = [json.loads((tmp_path / d / "summary.json").read_text())["metrics"]
              for d in ("one", "two")]
    for metric in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        for row, cells in tables[0][metric].items():
            for label, cell in cells.items():
                if label != "paper":
                    assert tables[1][metric][row][label]["values"] == pytest.approx(
                        cell["values"], abs=1e-7), (metric, row, label)


def test_predict_under_torchrun_is_done_once(tmp_path, two_categories, resnet18_weights):
    """Every process used to predict every image into the same folder: the second to take its
    lock stopped with exit 2 and torchrun ended the job. Rank 0 predicts; the others wait."""
    run(common(two_categories, resnet18_weights, "--categories", "cubes", "--save-models",
               "--coreset", 0.25), 1, tmp_path / "fit")
    flags = ["--predict", two_categories / "cubes" / "test", "--model",
             tmp_path / "fit" / "models" / "cubes.pt", "--weights", resnet18_weights,
             "--no-progress", "--workers", 0]
    run(flags, 1, tmp_path / "one")
    done = run(flags, 2, tmp_path / "two")
    assert done.stdout.count("scored ") == 1, "rank 0 alone reports"
    rows = [(tmp_path / d / "predictions.csv").read_text().replace(str(tmp_path / d), "")
            for d in ("one", "two")]
    assert rows[0] == rows[1] and rows[0].count("\n") == 1 + 4 + 8


def test_an_error_in_one_process_keeps_the_category_the_other_finished(tmp_path,
                                                                      resnet18_weights):
    """Categories go round-robin; an unreadable image in one process's category used to be raised
    before the round's finished categories were written, so the other's was lost."""
    root = tmp_path / "data"
    make_category(root, "cubes", n_train=6, n_test_good=2, size=64, seed=1)
    make_category(root, "grid", n_train=6, n_test_good=2, size=64, seed=2)
    (root / "grid" / "test" / "good" / "000.png").write_bytes(b"not a png")
    out = tmp_path / "r"
    done = launch(common(root, resnet18_weights), 2, out)
    assert done.returncode != 0
    assert list(json.loads((out / "metrics.json").read_text())["categories"]) == ["cubes"]
    lines = [line for line in done.stderr.splitlines() if "000.png" in line or "--resume" in line]
    assert lines[0].startswith("error: cannot read image ") and lines[0].count("error:") == 1
    assert lines[1] == (f"the finished categories are in {out}/metrics.json; once that is "
                        "fixed, the same command with --resume runs the rest")


def test_a_world_size_without_torchrun_is_one_line(tmp_path, monkeypatch, capsys):
    """WORLD_SIZE left in the environment without the rest of torchrun's variables used to end
    in torch's rendezvous traceback; it is said in one line, with the two ways out."""
    import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    make_category(tmp_path / "data", "part", n_train=4, n_test_good=1, defects={"blob": 1},
                  size=32)
    assert main.main(["--data-root", str(tmp_path / "data"), "--custom", "--result-dir",
                      str(tmp_path / "r"), "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        "error: WORLD_SIZE=2 asks for 2 processes, but RANK, MASTER_ADDR, MASTER_PORT are not "
        "set: start the run with torchrun (README, Scale), or unset WORLD_SIZE to run in this "
        "one process\n")


def test_what_every_process_finds_alike_is_said_once(tmp_path, resnet18_weights):
    """Both processes of one category read its folder and plan its shards; each used to warn of
    the skipped image, the missing mask and the shards, so every line came twice."""
    root = tmp_path / "data"
    make_category(root, "cubes", n_train=8, n_test_good=2, defects={"blob": 2}, size=64)
    (root / "cubes" / "test" / "good" / "000.png").write_bytes(b"not a png")
    (root / "cubes" / "ground_truth" / "blob" / "000_mask.png").unlink()
    done = run(common(root, resnet18_weights, "--skip-bad-images", "--coreset", 0.25,
                      "--coreset-shard-size", 4 * 64), 2, tmp_path / "r")
    said = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert len(said) == 3, said
    assert [line.split(": ")[1] for line in said] == [
        f"skipping {root / 'cubes' / 'test' / 'good' / '000.png'}", "cubes", "512 training "
        "patches in 8 images"]


@pytest.mark.parametrize("where", ["rank 1's test block", "rank 1's coreset shard",
                                   "rank 0's calibration images"])
def test_an_error_in_one_process_of_a_shared_category_stops_both_in_one_line(
        where, tmp_path, resnet18_weights):
    """One category is shared by both processes (its coreset shards, its test blocks): an
    unreadable image in rank 1's part used to be raised by rank 1 alone, leaving rank 0 in the
    gather until torchrun tore it down with a traceback of its own. Rank 0 alone scores the
    held-out calibration images; an error there left rank 1 to finish as if all was well."""
    import re

    from datasets import MVTecCategory
    from pipeline import split_calibration

    root = tmp_path / "data"
    make_category(root, "cubes", n_train=8, n_test_good=2, defects={"blob": 2}, size=64)
    train = MVTecCategory(root / "cubes", "train", resize=64, crop=64)
    broken = {"rank 1's test block":
              MVTecCategory(root / "cubes", "test", resize=64, crop=64).samples[-1].path,
              "rank 1's coreset shard": train.samples[-1].path,
              "rank 0's calibration images":
              split_calibration(train, 0.25, 0, 1)[1].samples[0].path}[where]
    broken.write_bytes(b"not a png")
    done = launch(common(root, resnet18_weights, "--batch-size", 2, "--coreset", 0.25,
                         "--coreset-shard-size", 4 * 64, "--no-cache", "--calibration-fraction",
                         0.25 if "calibration" in where else 0), 2, tmp_path / "r",
                  monitor_interval=3)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: cannot read image {broken}: the file is missing, empty, truncated "
                      "or not an image; replace or delete it (or pass --skip-bad-images)"], errors
    assert "[rank0]" not in done.stderr and "[rank1]" not in done.stderr
    # torchrun's summary lists each process that had exited with an error when it looked (3 s
    # after the last look; at torch's default, a tenth of a second, it may find one only and stop
    # the other): both did, with main.py's exit status for bad input, not stopped by a signal
    assert set(re.findall(r"rank\s*:\s*(\d+).*\n\s*exitcode\s*:\s*(-?\d+)",
                          done.stderr)) == {("0", "2"), ("1", "2")}

"""The pipeline as a library: a method added by one registry line, the run from a cold cache with
loader processes, its one-line errors there, and save -> predict without repeating the weights."""
import contextlib
import dataclasses
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import main
from datasets.synthetic import make_category
from models.base import AnomalyModel, Setting
from models.registry import METHODS
from tests.conftest import REPO
from utils.errors import SettingError
from utils.parse import positive_int


class MeanFeatureDistance(AnomalyModel):
    """A toy method: layer1 features' distance to their training mean, position by position."""
    settings = (Setting("pool", "--toy-pool", positive_int, "average-pool the grid by this"),)
    layers = ("layer1",)
    memory_buffers = ("mean",)

    def __init__(self, extractor, pool: int = 1, device="cpu"):
        super().__init__(extractor, device)
        self.pool = pool
        self.register_buffer("mean", torch.empty(0))

    def features(self, images):
        return torch.nn.functional.avg_pool2d(self.extractor(images)["layer1"], self.pool)

    def fit(self, batches):
        self.mean = torch.cat([self.features(b.images) for b in batches]).mean(0)

    def memory_summary(self):
        return {"mean_positions": self.mean[0].numel()}

    def score_patches(self, images):
        grid = (self.features(images) - self.mean).norm(dim=1)
        return grid.flatten(1).amax(1), grid


def test_a_method_added_by_one_registry_line_runs_through_the_cli(tmp_path, monkeypatch,
                                                                  synthetic_root,
                                                                  resnet18_weights):
    monkeypatch.setitem(METHODS, "toy", MeanFeatureDistance)  # the one line
    out = tmp_path / "r"
    assert main.main(["--method", "toy", "--toy-pool", "2", "--backbone", "resnet18",
                      "--weights", str(resnet18_weights), "--data-root", str(synthetic_root),
                      "--custom", "--categories", "cubes", "--resize", "64", "--crop", "64",
                      "--plots", "1", "--result-dir", str(out), "--no-progress",
                      "--workers", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "toy"
    assert metrics["config"]["method_settings"] == {"pool": 2}
    cubes = metrics["categories"]["cubes"]
    assert cubes["memory"] == {"mean_positions": 8 * 8}  # 16x16 layer1 grid pooled by 2
    assert cubes["image_auroc"] > 0.7 and cubes["pixel_auroc"] > 0.7, cubes
    assert (out / "localization" / "cubes" / "blob_000.png").is_file()


def test_main_is_the_command_line_only():
    source = (REPO / "main.py").read_text()
    assert len(source.splitlines()) < 205  # its flags, the run's outcome printed: no more
    for name in METHODS:
        assert not re.search(rf"\b{name}\b", source, re.IGNORECASE), name
    importers = [p for p in REPO.rglob("*.py")
                 if ".venv" not in p.parts and "tests" not in p.parts and p.name != "main.py"
                 and re.search(r"^\s*(import main\b|from main import)", p.read_text(), re.M)]
    assert importers == []


def _cold_run(tmp_path, root, weights, *extra, decode_ahead=0):
    """main.py with an empty cache, decoding in 2 loader processes or, with ``decode_ahead``, in
    that many processes filling the cache ahead of the run (datasets/decode_ahead.py)."""
    cache = tmp_path / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    return main.main(["--backbone", "resnet18", "--weights", str(weights), "--data-root",
                      str(root), "--custom", "--resize", "48", "--crop", "48", "--coreset", "0.5",
                      "--plots", "0", "--no-progress", "--workers", "2", "--cache-dir", str(cache),
                      "--decode-ahead", str(decode_ahead), *map(str, extra)])


@pytest.mark.parametrize("decode_ahead", [0, 2])
def test_the_whole_run_from_an_empty_cache_with_loader_processes(decode_ahead, tmp_path,
                                                                 resnet18_weights):
    for seed, name in enumerate(("part", "bolt")):
        make_category(tmp_path / "data", name, n_train=6, n_test_good=2, defects={"dent": 2},
                      size=48, seed=4 + seed)
    cold = tmp_path / "cold"
    assert _cold_run(tmp_path, tmp_path / "data", resnet18_weights, "--result-dir", cold,
                     decode_ahead=decode_ahead) == 0
    # every image of both categories went into the cache, whichever processes decoded it
    assert len(list((tmp_path / "cache").rglob("*.img"))) == 2 * (6 + 4)
    warm = tmp_path / "warm"  # the cache filled by the processes, read ahead by a thread
    assert main.main(["--backbone", "resnet18", "--weights", str(resnet18_weights), "--data-root",
                      str(tmp_path / "data"), "--custom", "--resize", "48", "--crop", "48",
                      "--coreset", "0.5", "--plots", "0", "--no-progress", "--cache-dir",
                      str(tmp_path / "cache"), "--result-dir", str(warm)]) == 0

    def numbers(out):
        categories = json.loads((out / "metrics.json").read_text())["categories"]
        return {name: {k: part[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro",
                                            "memory")} for name, part in categories.items()}
    assert numbers(cold) == numbers(warm) and len(numbers(cold)) == 2


@pytest.mark.parametrize("decode_ahead", [0, 2])
@pytest.mark.parametrize("damage", ["truncated training image", "mask of another size"])
def test_a_bad_image_read_by_a_loader_process_is_one_line(damage, decode_ahead, tmp_path, capsys,
                                                          resnet18_weights):
    root = tmp_path / "data"
    make_category(root, "part", n_train=4, n_test_good=1, defects={"dent": 2}, size=48)
    if damage == "truncated training image":
        bad = root / "part" / "train" / "good" / "002.png"
        bad.write_bytes(bad.read_bytes()[:40])
        expected = (f"error: cannot read image {bad}: the file is missing, empty, truncated or "
                    "not an image; replace or delete it (or pass --skip-bad-images)")
    else:
        bad = root / "part" / "ground_truth" / "dent" / "001_mask.png"
        cv2.imwrite(str(bad), np.zeros((30, 40), np.uint8))
        expected = (f"error: mask {bad} is 40x30 but its image "
                    f"{root / 'part' / 'test' / 'dent' / '001.png'} is 48x48; masks must have "
                    "their image's size")
    assert _cold_run(tmp_path, root, resnet18_weights, "--result-dir", tmp_path / "r",
                     decode_ahead=decode_ahead) == 2
    assert capsys.readouterr().err == expected + "\n"


def test_save_then_predict_needs_no_weights_flag(tmp_path, capsys, synthetic_root,
                                                 resnet18_weights):
    weights = tmp_path / "kept" / "resnet18.pth"
    weights.parent.mkdir()
    shutil.copy(resnet18_weights, weights)
    fitted = tmp_path / "fit"
    flags = ["--no-progress", "--workers", "0"]
    assert main.main(["--backbone", "resnet18", "--weights", str(weights), "--data-root",
                      str(synthetic_root), "--custom", "--categories", "cubes", "--resize", "64",
                      "--crop", "64", "--coreset", "0.5", "--plots", "0", "--save-models",
                      "--result-dir", str(fitted), *flags]) == 0
    model = fitted / "models" / "cubes.pt"
    images = synthetic_root / "cubes" / "test" / "good"
    assert main.main(["--predict", str(images), "--model", str(model), "--plots", "0",
                      "--result-dir", str(tmp_path / "p"), *flags]) == 0
    assert (tmp_path / "p" / "predictions.csv").read_text().count("\n") == 1 + 4
    capsys.readouterr()
    assert main.main(["--predict", str(images / "000.png"), "--model", str(model),
                      "--weights", str(weights), "--plots", "0", "--result-dir",
                      str(tmp_path / "one"), *flags]) == 0
    assert ": scored 1 image, " in capsys.readouterr().out
    fingerprint = torch.load(model, weights_only=True)["weights_fingerprint"]
    weights.rename(tmp_path / "moved.pth")
    capsys.readouterr()
    assert main.main(["--predict", str(images), "--model", str(model), "--result-dir",
                      str(tmp_path / "q"), *flags]) == 2
    assert capsys.readouterr().err == (
        f"error: --model {model} was fitted with the weights file {weights} (fingerprint "
        f"{fingerprint}), which no longer exists; pass those weights with --weights\n")


def test_saved_maps_are_mvtec_evaluations_layout_and_give_the_runs_pixel_auroc(
        tmp_path, synthetic_root, resnet18_weights):
    """--save-maps: a float32 TIFF per test image at its original size (64 px here), where
    MVTec AD's evaluation code looks; inside the crop the run's own map (its pixel AUROC comes
    back), outside it the category's lowest score."""
    from sklearn.metrics import roc_auc_score

    out = tmp_path / "r"
    assert main.main(["--backbone", "resnet18", "--weights", str(resnet18_weights), "--data-root",
                      str(synthetic_root), "--custom", "--resize", "64", "--crop", "48",
                      "--coreset", "0.5", "--plots", "0", "--save-maps", "--result-dir", str(out),
                      "--no-progress", "--workers", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["categories"]
    for category in ("cubes", "grid"):
        images = sorted((synthetic_root / category / "test").rglob("*.png"))
        maps, masks = [], []
        for image in images:
            relative = image.relative_to(synthetic_root / category).with_suffix(".tiff")
            saved = cv2.imread(str(out / "anomaly_maps" / category / relative),
                               cv2.IMREAD_UNCHANGED)
            assert saved.dtype == np.float32 and saved.shape == (64, 64)
            maps.append(saved)
            defect = image.parent.relative_to(synthetic_root / category / "test")
            mask = synthetic_root / category / "ground_truth" / defect / f"{image.stem}_mask.png"
            masks.append(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE) > 0 if mask.is_file()
                         else np.zeros((64, 64), bool))
        maps, masks = np.stack(maps), np.stack(masks)
        crop = (slice(None), slice(8, 56), slice(8, 56))
        outside = np.ones(maps.shape, bool)
        outside[crop] = False
        assert (maps[outside] == maps.min()).all()
        assert roc_auc_score(masks[crop].ravel(), maps[crop].ravel()) == \
            pytest.approx(metrics[category]["pixel_auroc"], abs=1e-9)


def test_metrics_record_versions_weights_and_a_data_fingerprint(tmp_path, resnet18_weights):
    from utils.environment import data_fingerprint, file_sha256

    root = tmp_path / "data"
    category = make_category(root, "part", n_train=3, n_test_good=1, defects={"dent": 1},
                             size=48)
    out = tmp_path / "r"
    assert main.main(["--backbone", "resnet18", "--weights", str(resnet18_weights), "--data-root",
                      str(root), "--custom", "--resize", "48", "--crop", "48", "--coreset", "0.5",
                      "--plots", "0", "--no-progress", "--workers", "0",
                      "--result-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    environment = metrics["environment"]
    assert environment["versions"]["torch"] == torch.__version__.split("+")[0]
    assert set(environment["versions"]) >= {"python", "torchvision", "faiss", "numpy", "opencv",
                                            "scipy", "scikit-learn"}
    assert environment["weights_sha256"] == file_sha256(resnet18_weights)
    assert environment["device"]
    # results.md says when, at which commit and with which releases its numbers were measured
    import re
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", environment["started_utc"])
    line = next(x for x in (out / "results.md").read_text().splitlines()
                if x.startswith("Measured "))
    assert line.startswith(f"Measured {environment['started_utc']} at ")
    assert f"torch {environment['versions']['torch']}, " in line
    commit = environment["git_commit"]
    assert (f"commit {commit[:7]}" if commit else "no git checkout") in line
    fingerprint = metrics["categories"]["part"]["data_fingerprint"]
    assert fingerprint == data_fingerprint(category) and fingerprint["files"] == 3 + 2 + 1
    (category / "results").mkdir()  # beside the data folders: not data
    (category / "results" / "metrics.json").write_text("{}")
    (category / "notes.txt").write_text("lot 7")
    assert data_fingerprint(category) == fingerprint
    # the fingerprint moves with any added, resized or renamed file, and only then
    image = category / "train" / "good" / "000.png"
    image.rename(image.with_name("009.png"))
    renamed = data_fingerprint(category)
    assert renamed["files"] == 6 and renamed["sha256"] != fingerprint["sha256"]
    (category / "train" / "good" / "009.png").write_bytes(b"x")
    assert data_fingerprint(category)["sha256"] not in (renamed["sha256"], fingerprint["sha256"])


def test_dry_run_prints_the_expected_memory_and_time_and_fits_nothing(tmp_path, capsys,
                                                                     synthetic_root,
                                                                     resnet18_weights):
    out = tmp_path / "r"
    assert main.main(["--dry-run", "--backbone", "resnet18", "--weights", str(resnet18_weights),
                      "--data-root", str(synthetic_root), "--custom", "--resize", "64", "--crop",
                      "64", "--coreset", "0.5", "--coreset-shard-size", "256", "--no-progress",
                      "--workers", "0", "--result-dir", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(
        "cubes: 12 training images, 768 patches in 3 coreset shards: about 0.00 GiB (shard "), lines
    # shard: 4 images x 64 patches x 1024 dims (PatchCore's embed_dim) x 4 bytes
    shard, coreset, bank = (float(v) for v in re.findall(r"(?:shard|coreset|bank) ([\d.]+)",
                                                         lines[0]))
    assert shard == round(4 * 64 * 1024 * 4 / 2**30, 2)
    # the test: every test patch searched in the bank the fit keeps, half of each 256-patch shard
    assert re.search(r"; fit about \d+ s, test about \d+ s for 12 images in a bank of 384 "
                     r"patches \(from probes on this machine\)$", lines[0]), lines[0]
    assert lines[1].startswith("grid: 12 training images") and "for 13 images in a bank of 384" \
        in lines[1], lines[1]
    assert not (out / "metrics.json").exists()
    # an approximate index's search is not estimated, and says why
    assert main.main(["--dry-run", "--backbone", "resnet18", "--weights", str(resnet18_weights),
                      "--data-root", str(synthetic_root), "--custom", "--categories", "cubes",
                      "--resize", "64", "--crop", "64", "--knn-index", "ivf-flat", "--no-progress",
                      "--workers", "0", "--result-dir", str(out)]) == 0
    assert ("test not estimated (an approximate index's search time depends on the data) for 12 "
            "images in a bank of 76 patches" in capsys.readouterr().out)


@pytest.mark.parametrize("method, settings, kept", [
    ("spade", {"k": 3}, {"gallery"}), ("padim", {"dims": 40}, {"gaussians"})])
def test_a_dry_run_of_spade_and_padim_counts_the_memory_a_fit_keeps(
        method, settings, kept, tmp_path, resnet18_weights, synthetic_root, capsys):
    """Their memory is no sample: the estimate's blocks that a fit keeps are its buffers' bytes,
    and PaDiM's features are every training embedding."""
    from tests.conftest import fit_on_synthetic

    model, batch = fit_on_synthetic(tmp_path, resnet18_weights, METHODS[method], size=64,
                                    **settings)
    fitted = sum(t.numel() * t.element_size() for t in model.memory_state().values()
                 if t.is_floating_point())
    row = model.estimate(10, 6, batch["image"][:4])
    assert sum(row["memory_bytes"][name] for name in kept) == fitted
    if method == "padim":
        embedding = model.embed(batch["image"][:1])[0]
        assert row["memory_bytes"]["features"] == 10 * embedding.numel() * 4
    assert row["fit_seconds"] > 0 and row["test_seconds"] > 0
    with pytest.raises(SettingError, match="larger than the memory bank") if method == "spade" \
            else contextlib.nullcontext():
        model.estimate(2, 6, batch["image"][:4])  # SPADE: K = 3 > 2 images, as the fit says
    flags = ["--k", "3"] if method == "spade" else []  # SPADE's 50 would exceed 12 images
    assert main.main(["--dry-run", "--method", method, *flags, "--backbone", "resnet18",
                      "--weights", str(resnet18_weights), "--data-root", str(synthetic_root),
                      "--custom", "--categories", "cubes", "--resize", "64", "--crop", "64",
                      "--no-progress", "--workers", "0", "--result-dir", str(tmp_path / "r")]) == 0
    assert re.fullmatch(rf"cubes: 12 training images: about [\d.]+ GiB \(.*{min(kept)} [\d.]+.*\) "
                        r"beside the process itself; fit about \d+ s, test about \d+ s for 12 "
                        r"images \(from probes on this machine\)\n", capsys.readouterr().out)


@pytest.mark.parametrize("method, settings", [
    ("patchcore", {"layers": "2+3"}), ("patchcore", {"layers": "1+2+3"}),
    ("patchcore", {"layers": "3"}), ("sa_patchcore", {}), ("padim", {"dims": 40}),
    ("spade", {"k": 3})])
def test_the_memory_of_a_fit_is_counted_from_the_layer_shapes_alone(
        method, settings, tmp_path, resnet18_weights):
    """``fit_memory`` reads the shapes of one probe forward, remembered by the extractor, and no
    batch: PatchCore's patches per image are its embedding's grid (an odd crop included), and
    what SPADE and PaDiM keep is their fitted buffers' bytes."""
    from tests.conftest import fit_on_synthetic

    model, batch = fit_on_synthetic(tmp_path, resnet18_weights, METHODS[method], size=72,
                                    **settings)
    for crop in (72, 75):
        images = torch.zeros(1, 3, crop, crop, dtype=torch.uint8)
        if method in ("patchcore", "sa_patchcore"):
            assert model.patches_per_image(crop) == model.embed(images).shape[1:3].numel()
    memory = model.fit_memory(10, 72)
    fitted = sum(t.numel() * t.element_size() for t in model.memory_state().values()
                 if t.is_floating_point())
    if method == "spade":
        assert memory == {"gallery": fitted}  # fit on the 10 training images
    elif method == "padim":
        assert memory["gaussians"] == fitted
        assert memory["features"] == 10 * model.embed(batch["image"][:1])[0].numel() * 4
    else:
        assert memory["bank"] == 2 * model.memory_bank.numel() * 4


def test_a_fit_larger_than_the_free_memory_is_said_before_it_starts(
        tmp_path, synthetic_root, resnet18_weights, monkeypatch, capsys):
    """A fit that outgrows the memory is ended by the system without a word, often minutes in:
    a warning comes first, with the estimate and what needs less, and the run still goes on."""
    import pipeline

    free = {}
    monkeypatch.setattr(pipeline, "free_memory_bytes", lambda device: free["bytes"])
    flags = ["--method", "padim", "--padim-dims", "40", "--backbone", "resnet18", "--weights",
             resnet18_weights, "--data-root", synthetic_root, "--custom", "--categories", "cubes",
             "--resize", "64", "--crop", "64", "--plots", "0", "--no-progress", "--workers", "0"]
    free["bytes"] = 2**20
    assert main.main([*map(str, flags), "--result-dir", str(tmp_path / "short")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning: cubes: the fit")]
    # 12 images x 16 x 16 positions x 40 channels, the 256 positions' Gaussians, one chunk
    features, gaussians = 12 * 256 * 40 * 4, 256 * (40 + 40 * 40) * 4
    covariance = 256 * (2 * 12 * 40 + 3 * 40 * 40) * 8
    assert warnings == [
        f"warning: cubes: the fit is estimated to hold "
        f"{(features + gaussians + covariance) / 2**30:.1f} GiB (features 0.0, gaussians 0.0, "
        "covariance 0.0) beside the process, more than the 0.0 GiB of memory free; it may stop "
        "for lack of memory. A smaller --crop or fewer training images need less; --dry-run "
        "estimates any setting"]
    assert (tmp_path / "short" / "metrics.json").exists()  # the run went on
    free["bytes"] = features + gaussians + covariance
    assert main.main([*map(str, flags), "--result-dir", str(tmp_path / "enough")]) == 0
    assert "the fit is estimated" not in capsys.readouterr().err


def test_torchrun_processes_sharing_a_cpu_machine_count_their_fits_together(
        tmp_path, synthetic_root, resnet18_weights, monkeypatch, caplog):
    """Under torchrun on CPUs the processes on one machine fit in its one memory at the same
    time (a category each, or a coreset shard each of one category): the warning weighs their
    sum, not one process's share."""
    import pipeline
    from config import resolve_config
    from datasets import MVTecCategory
    from utils.distributed import Group

    config = resolve_config(method="patchcore", backbone="resnet18", weights=resnet18_weights,
                            data_root=synthetic_root, custom=True, categories="cubes",
                            resize=64, crop=64, device="cpu",
                            method_settings={"coreset_shard_size": 5 * 64})  # 5 images a shard
    model = config.method_class.from_config(pipeline.build_extractor(config), config, "cpu")
    train = MVTecCategory(synthetic_root / "cubes", "train", 64, 64)  # 12 images: 3 shards
    beside = pipeline.fitting_beside_each_other
    assert beside(config, model, train, Group.single()) == 1  # no torchrun
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert beside(config, model, train, Group(0, 4)) == 3  # the category's shards
    assert beside(config, model, train, Group.single(), categories_at_once=4) == 4
    assert beside(config, model, train, Group.single(), categories_at_once=1) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two machines of two processes
    assert beside(config, model, train, Group(0, 4)) == 2
    assert beside(config, model, train, Group.single(), categories_at_once=4) == 2
    assert beside(dataclasses.replace(config, device="cuda"), model, train, Group(0, 4)) == 1
    monkeypatch.setattr(model, "sharded_fit", False)  # fitted by rank 0 alone
    assert beside(config, model, train, Group(0, 4)) == 1
    monkeypatch.undo()

    one = sum(model.fit_memory(len(train), 64).values())
    monkeypatch.setattr(pipeline, "free_memory_bytes", lambda device: int(1.5 * one))
    pipeline.warn_if_memory_short(config, model, train, processes=1)
    assert not caplog.records  # one process's fit fits
    pipeline.warn_if_memory_short(config, model, train, processes=2)
    assert [r.getMessage() for r in caplog.records] == [
        f"cubes: the fit is estimated to hold {one / 2**30:.1f} GiB "
        f"({', '.join(f'{k} 0.0' for k in model.fit_memory(len(train), 64))}) beside the "
        f"process, in each of the 2 processes fitting on this machine at once "
        f"({2 * one / 2**30:.1f} GiB), more than the 0.0 GiB of memory free; it may stop for "
        "lack of memory. A smaller --crop or fewer training images or processes (torchrun "
        "--nproc-per-node) need less; --dry-run estimates any setting"]


def test_the_free_memory_is_a_containers_limit_where_that_is_nearer(tmp_path, monkeypatch):
    from utils import environment

    meminfo, limit, usage = (tmp_path / name for name in ("meminfo", "memory.max",
                                                          "memory.current"))
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    8000000 kB\n")
    monkeypatch.setattr(environment, "MEMINFO", str(meminfo))
    monkeypatch.setattr(environment, "CGROUP_MEMORY", ((str(tmp_path / "none"), str(usage)),
                                                       (str(limit), str(usage))))
    assert environment.free_memory_bytes("cpu") == 8000000 * 1024  # no cgroup files: the host's
    limit.write_text("5000000\n")
    usage.write_text("1000000\n")
    assert environment.free_memory_bytes("cpu") == 4000000  # the container's limit is nearer
    limit.write_text("max\n")  # cgroup v2's "no limit"
    assert environment.free_memory_bytes("cpu") == 8000000 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")  # a kernel without MemAvailable
    assert environment.free_memory_bytes("cpu") is None


def test_a_dry_run_of_a_sweep_estimates_each_configuration_once_and_runs_nothing(
        tmp_path, capsys, synthetic_root, resnet18_weights, monkeypatch):
    """It used to run the whole sweep."""
    import pipeline
    loaded, load = [], pipeline.load_category
    monkeypatch.setattr(pipeline, "load_category",
                        lambda config, category, **kw: loaded.append(category)
                        or load(config, category, **kw))
    out = tmp_path / "r"
    assert main.main(["--dry-run", "--layers", "2+3", "1+2", "--seeds", "0", "1", "--backbone",
                      "resnet18", "--weights", str(resnet18_weights), "--data-root",
                      str(synthetic_root), "--custom", "--categories", "cubes", "--resize", "64",
                      "--crop", "64", "--no-progress", "--workers", "0",
                      "--result-dir", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # 12 training images of 8 x 8 patches on stage 2's grid, 16 x 16 on stage 1's
    assert [line.split(": about")[0] for line in lines] == [
        "[layers=2+3] cubes: 12 training images, 768 patches in 1 coreset shard",
        "[layers=1+2] cubes: 12 training images, 3072 patches in 1 coreset shard"]
    assert loaded == ["cubes"]  # the configurations share the category's data
    # its folders were checked writable, but a dry run writes nothing: not even empty folders
    assert not out.exists()


def test_a_padded_partial_batch_scores_its_images_as_unpadded(tmp_path, resnet18_weights):
    """On a GPU every batch is padded to the batch size (``batch_shape``): the backbone sees one
    shape, and the real images' scores and maps must not depend on the padding (checked here on
    the CPU, same arithmetic)."""
    from models.base import padded
    from models.patchcore import PatchCore
    from tests.conftest import assert_distances_close, fit_on_synthetic

    model, batch = fit_on_synthetic(tmp_path, resnet18_weights, PatchCore, size=64,
                                    coreset_fraction=0.5)
    images = batch["image"][:5]
    padding = padded(images, 8)
    assert padding.shape[0] == 8 and torch.equal(padding[5:], images[4:].expand(3, -1, -1, -1))
    assert padded(images, None) is images and padded(images, 4) is images
    plain = model.predict(images)
    embed, sizes = model.embed, []
    model.embed = lambda part: sizes.append(len(part)) or embed(part)
    model.batch_shape = 8
    shaped = model.predict(images)
    assert sizes == [8] and len(shaped.image_scores) == 5 and shaped.anomaly_maps.shape[0] == 5
    norms = torch.cat([embed(padding).flatten(0, 2), model.memory_bank]).square().sum(1)
    assert_distances_close(shaped.image_scores, plain.image_scores, norms.max())
    assert_distances_close(shaped.anomaly_maps, plain.anomaly_maps, norms.max())
    # after an out-of-memory halving, pieces are padded to the halved size, not beyond it
    sizes.clear()
    model.max_batch = 2
    model.predict(batch["image"][:5])
    assert sizes == [2, 2, 2]


def test_a_padded_fit_keeps_every_training_image_and_only_them(tmp_path, resnet18_weights):
    """SPADE's fit runs its batches of 4 (10 training images: 4, 4, 2) padded to 4, and after
    an out-of-memory halving in pieces of 2; its gallery (a dict of feature maps per piece) holds
    the 10 images either way, as fitted unpadded."""
    from datasets import MVTecCategory
    from datasets.loader import ImageBatches
    from models.spade import SPADE
    from tests.conftest import assert_features_close, fit_on_synthetic

    plain, _ = fit_on_synthetic(tmp_path, resnet18_weights, SPADE, size=64, k=1)
    train = MVTecCategory(tmp_path / "part", "train", resize=64, crop=64)
    for max_batch, expected_sizes in ((None, [4, 4, 4]), (2, [2] * 5)):
        shaped = SPADE(plain.extractor, k=1)
        shaped.batch_shape, shaped.max_batch = 4, max_batch
        features, sizes = shaped.features, []
        shaped.features = lambda part: sizes.append(len(part)) or features(part)
        shaped.fit(ImageBatches(train, batch_size=4, workers=0))
        assert sizes == expected_sizes
        for name in ("train_layer1", "train_layer2", "train_layer3", "train_pooled"):
            assert getattr(shaped, name).shape == getattr(plain, name).shape
            assert_features_close(getattr(shaped, name), getattr(plain, name))


def test_an_approximate_index_writes_its_recall_to_metrics(tmp_path, synthetic_root,
                                                           resnet18_weights, capsys):
    out = tmp_path / "r"
    assert main.main(["--knn-index", "hnsw", "--coreset", "0.5", "--backbone", "resnet18",
                      "--weights", str(resnet18_weights), "--data-root", str(synthetic_root),
                      "--custom", "--categories", "cubes", "--resize", "64", "--crop", "64",
                      "--plots", "0", "--no-progress", "--workers", "0",
                      "--result-dir", str(out)]) == 0
    knn = json.loads((out / "metrics.json").read_text())["categories"]["cubes"]["knn"]
    assert knn["index"] == "hnsw" and 0.5 < knn["recall_at_1"] <= 1.0
    assert 0 <= knn["distance_excess_mean"] <= knn["distance_excess_max"]
    assert knn["queries"] == 8 * 64  # the first test batch's patches
    assert f"hnsw search: recall@1 {knn['recall_at_1']:.3f}" in capsys.readouterr().out


def test_a_misspelled_library_setting_is_refused(tmp_path):
    from config import resolve_config
    with pytest.raises(TypeError, match="unknown settings: coreset"):
        resolve_config(coreset=0.1, result_dir=tmp_path)


@pytest.mark.parametrize("given, message", [
    (dict(device="gpu"), "device must be one of auto, cpu, cuda, got gpu"),
    (dict(batch_size=0), "batch_size must be a whole number >= 1, got 0"),
    (dict(resize=256.0), "resize must be a whole number, got 256.0"),
    (dict(seed=0.5), "seed must be a whole number, got 0.5"),
    (dict(plots=-1), "plots must be a whole number >= 0, got -1"),
    (dict(calibration_quantile=1.5), "calibration_quantile must be in (0, 1], got 1.5; "),
    (dict(resample="nearest"), "resample must be one of bilinear, lanczos, got nearest"),
    (dict(custom="yes"), "custom 'yes' is a switch: give True or False"),
    (dict(weights=5), "weights 5 must be a path (text or a pathlib.Path)"),
    (dict(categories=["bottle", 2]), "categories ['bottle', 2] must be names (text)"),
    (dict(method="spade", method_settings={"k": 2.5}), "k must be a whole number, got 2.5"),
    (dict(method="spade", method_settings={"k": [1, 3]}),
     "k [1, 3] takes one value here; several make a sweep"),
    (dict(method="spade", method_settings={"kk": 5}),
     "kk 5 is not a setting of method spade; spade's are k (did you mean k?)"),
    (dict(method="padim", method_settings={"eps": float("inf")}),
     "eps must be a finite number > 0, got inf"),
])
def test_the_library_refuses_a_bad_value_before_reading_data(tmp_path, given, message):
    """A value the command line would refuse is refused by resolve_config in the same words,
    instead of failing deep in torch or numpy (or running with a default in its place)."""
    from config import resolve_config
    with pytest.raises(SettingError) as refused:
        resolve_config(result_dir=tmp_path / "r", data_root=tmp_path / "none", **given)
    assert str(refused.value).startswith(message)
    assert not (tmp_path / "r").exists()


def test_the_library_and_the_flags_read_values_with_the_same_parsers():
    """Each run-wide flag's value is checked by the library as the flag reads it: the very parser
    or choices for numbers and choices, paths as paths, switches as bools; so the two ways in
    cannot drift apart, and a new flag cannot be left out of the library's checks."""
    import argparse

    from config import PATHS, SWITCHES, VALUE_PARSERS, RunConfig
    from utils.parse import user_path
    settings = set(RunConfig.__dataclass_fields__) | {"no_cache"}
    for action in main.build_parser()._actions:
        name = "seed" if action.dest == "seeds" else action.dest
        if name not in settings or name in ("method", "backbone"):  # names, checked by registry
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            assert name in SWITCHES, name
        elif action.type is user_path:
            assert name in PATHS or name == "predict", name
        elif action.choices is not None:
            assert tuple(action.choices) == VALUE_PARSERS[name].choices, name
        elif action.type is not None:
            assert action.type is VALUE_PARSERS[name], name


def test_none_for_every_setting_of_the_library_is_its_default(tmp_path):
    """resolve_config's promise, for each of its keywords and each RunConfig field at once: a
    caller that fills every setting from its own None-defaulted options (argparse's, a config
    file's) gets the defaults, not a run on device None."""
    import inspect

    from config import RunConfig, resolve_config
    keywords = [name for name in inspect.signature(resolve_config).parameters if name != "options"]
    fields = [name for name in RunConfig.__dataclass_fields__ if name not in keywords]
    every = {name: None for name in keywords + fields}
    assert resolve_config(**{**every, "result_dir": tmp_path}) == resolve_config(result_dir=tmp_path)


def test_the_library_takes_a_flags_text_and_a_single_name_or_seed(tmp_path, synthetic_root):
    """What a flag takes as text, the library takes too, read the same way; one category given
    as text is that category (not its letters), one seed is that seed."""
    from config import resolve_config, resolve_sweep
    config = resolve_config(method="patchcore", result_dir=tmp_path / "r", batch_size="4",
                            method_settings={"k": "3", "layers": "layer2+layer3",
                                             "coreset_fraction": "0.5"},
                            data_root=str(synthetic_root), custom=True, categories="cubes",
                            mirror=tmp_path, predict=None)
    assert config.batch_size == 4 and config.categories == ("cubes",)
    # a shell completes a folder's name with a slash: bottle/ is bottle
    assert resolve_config(data_root=synthetic_root, custom=True, categories=["cubes/", "grid"],
                          result_dir=tmp_path / "r").categories == ("cubes", "grid")
    assert resolve_config(categories="bottle/", result_dir=tmp_path / "r").categories == \
        ("bottle",)
    assert config.method_settings["k"] == 3 and config.method_settings["layers"] == "2+3"
    assert config.method_settings["coreset_fraction"] == 0.5 and config.mirror == str(tmp_path)
    [point] = resolve_sweep("patchcore", {"k": 1}, seeds=7, result_dir=tmp_path / "r",
                            data_root=synthetic_root, custom=True, categories=["cubes"])
    assert point.seed == 7 and point.config.seed == 7
    home = resolve_config(data_root="~/mvtec", cache_dir=Path("~/cache"), result_dir=tmp_path)
    assert home.data_root == Path.home() / "mvtec" and home.cache_dir == Path.home() / "cache"
    with pytest.raises(SettingError, match=r"^layers 2\+3 2\+3 lists 2\+3 more than once"):
        resolve_sweep("patchcore", {"layers": ["2+3", "layer2+layer3"]}, result_dir=tmp_path)
    labels = [p.label for p in resolve_sweep("spade", {"k": ["5", 3]}, result_dir=tmp_path)]
    assert labels == ["k=5", "k=3"]
    for empty in (dict(method_settings={"k": []}), dict(seeds=[])):
        with pytest.raises(SettingError, match=r"^(k|seeds) \[\] lists no value; give one or more"):
            resolve_sweep("patchcore", result_dir=tmp_path / "r", **empty)


def test_a_result_folder_among_the_images_a_run_reads_is_refused(tmp_path, synthetic_root):
    """Image folders are listed with their sub-folders: results inside one were read back by the
    next run, its figures scored as a defect type named after the result folder (or fitted as
    normal images); a prediction's overlays scored as new images."""
    from config import resolve_config
    cubes = synthetic_root / "cubes"
    for inside in (cubes / "test" / "out", cubes / "train" / "good" / "r", cubes / "train"):
        with pytest.raises(SettingError, match=r"^result_dir .* lies inside .*cubes/(test|train)"
                                               r", whose images the run reads"):
            resolve_config(data_root=synthetic_root, custom=True, result_dir=inside)
    beside = resolve_config(data_root=synthetic_root, custom=True, result_dir=cubes / "results")
    assert beside.result_dir == cubes / "results"  # the category folder's top is not listed
    new = tmp_path / "new"
    new.mkdir()
    with pytest.raises(SettingError, match=r"^result_dir .* lies inside predict folder .*new"):
        resolve_config(predict=[new], model=tmp_path / "m.pt", result_dir=new / "out")
    assert resolve_config(predict=[new], model=tmp_path / "m.pt",
                          result_dir=tmp_path / "out").predict == (new,)


def test_scores_holding_nan_are_named_with_their_image_not_measured(tmp_path, resnet18_weights):
    """The last check before the metrics and thresholds, which would sort NaN anywhere: here a
    PaDiM memory damaged after its fit (a saved model's file, say); the first image is named."""
    from datasets import MVTecCategory
    from datasets.loader import ImageBatches
    from models.padim import PaDiM
    from pipeline import score
    from tests.conftest import fit_on_synthetic
    from utils.errors import UserError

    model, _ = fit_on_synthetic(tmp_path, resnet18_weights, PaDiM, size=64)
    test = MVTecCategory(tmp_path / "part", "test", resize=64, crop=64)
    assert np.isfinite(score(model, ImageBatches(test, batch_size=4)).image_scores).all()
    model.precision[5] = float("nan")  # one position's Gaussian: every image's map holds NaN
    with pytest.raises(UserError, match=re.escape(
            f"the scores of {test.samples[0].path} and 3 more of its batch hold NaN or infinite "
            "values: ")):
        score(model, ImageBatches(test, batch_size=4))


def test_the_readmes_python_example_runs_as_printed(tmp_path, monkeypatch, capsys,
                                                    resnet18_weights):
    """The README's "From Python" block, run as a newcomer would paste it (the one change: its
    WideResNet-50 file is a small resnet18, named by ``backbone``), in a folder holding the data
    root it names: a renamed function, setting or report key there fails here."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"From Python, without the command line:\n\n```python\n(.*?)```", readme,
                      re.S)[1]
    assert block.count('weights="wrn50.pth"') == 2
    block = block.replace('weights="wrn50.pth"', 'weights="wrn50.pth", backbone="resnet18"')
    make_category(tmp_path / "mvtec_anomaly_detection", "bottle", n_train=8, n_test_good=3,
                  defects={"broken_large": 3}, size=64, seed=3)
    shutil.copy(resnet18_weights, tmp_path / "wrn50.pth")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out.split()
    report = json.loads((tmp_path / "result" / "metrics.json").read_text())
    assert float(printed[0]) == report["categories"]["bottle"]["image_auroc"]
    assert report["config"]["method_settings"]["k"] == 5
    table = (tmp_path / "result" / "spade-k" / "results.md").read_text()
    assert "k=3" in table and "k=5" in table

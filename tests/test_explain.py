"""--explain: every bank patch knows its training image and grid cell, and the figures use it."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import main
from datasets.loader import TensorBatches
from models.backbone import FeatureExtractor
from models.patchcore import PatchCore
from models.sa_patchcore import SAPatchCore
from utils.explain import Explainer


class TwoImages(torch.utils.data.Dataset):
    """Two distinct random textures (one reddish, one bluish) as a training set."""

    def __init__(self, size=64):
        rng = np.random.default_rng(0)
        red = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
        red[..., 0] = 255
        blue = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
        blue[..., 2] = 255
        self.images = [red, blue]
        self.samples = [SimpleNamespace(path=Path(f"{name}.png")) for name in ("red", "blue")]

    def __len__(self):
        return 2

    def load(self, index):
        return self.images[index], None

    def __getitem__(self, index):
        return {"image": torch.from_numpy(self.images[index].transpose(2, 0, 1).copy()),
                "index": index}

    def batches(self):
        return TensorBatches(torch.stack([self[i]["image"] for i in range(2)]), batch_size=2)


@pytest.mark.parametrize("model_class", [PatchCore, SAPatchCore])
def test_provenance_points_back_to_the_right_image_and_cell(model_class, resnet18_weights):
    train = TwoImages()
    extractor = FeatureExtractor("resnet18", model_class.layers, weights=resnet18_weights)
    model = model_class(extractor, coreset_fraction=1.0)
    model.fit(train.batches())
    assert model.provenance.shape == (2 * 8 * 8, 3) and model.provenance.dtype == torch.int32
    for index in (0, 1):
        query = train[index]["image"][None]
        origin = model.provenance[model.nearest_bank_patches(query)[1][0]]  # [8, 8, 3]
        assert torch.all(origin[..., 0] == index), f"patches of image {index} matched elsewhere"
        rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
        assert torch.equal(origin[..., 1], rows.int()) and torch.equal(origin[..., 2], cols.int())


def test_mosaic_of_a_training_image_rebuilds_it_exactly(resnet18_weights):
    train = TwoImages()
    extractor = FeatureExtractor("resnet18", PatchCore.layers, weights=resnet18_weights)
    model = PatchCore(extractor, coreset_fraction=1.0)
    model.fit(train.batches())
    titles_and_panels = Explainer(model, train).panels(train.images[1])
    titles = [title for title, _ in titles_and_panels]
    assert titles == ["highest-scoring patch", "rebuilt from normal patches",
                      "nearest normal: blue.png"]
    assert np.array_equal(titles_and_panels[1][1], train.images[1])


def test_explain_figures_from_the_cli(tmp_path, synthetic_root, resnet18_weights, capsys):
    out = tmp_path / "r"
    assert main.main(["--backbone", "resnet18", "--weights", str(resnet18_weights), "--data-root",
                      str(synthetic_root), "--custom", "--categories", "cubes", "--resize", "64",
                      "--crop", "64", "--coreset", "0.5", "--plots", "1", "--explain",
                      "--result-dir", str(out), "--no-progress", "--workers", "0"]) == 0
    figure = out / "localization" / "cubes" / "blob_000.png"
    import matplotlib.image
    assert matplotlib.image.imread(figure).shape[1] > 1500, "seven panels, not four"
    assert json.loads((out / "metrics.json").read_text())["config"]["explain"] is True
    capsys.readouterr()
    assert main.main(["--method", "padim", "--explain", "--result-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: --explain works with --method patchcore or "
                                       "sa_patchcore, not padim\n")

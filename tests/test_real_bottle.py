"""Integration on the real MVTec AD bottle with real ImageNet MobileNetV2 weights (../shared).

Reference: amazon-science/patchcore-inspection with the same backbone taps, weights and data reached
image AUROC 1.000 and pixel AUROC 0.965 with a 1% coreset (../shared/README.md).
"""
import json

from tests.conftest import MOBILENET_WEIGHTS

import main


def test_patchcore_1pct_matches_official_on_real_bottle(real_bottle, tmp_path):
    out = tmp_path / "r"
    code = main.main(["--method", "patchcore", "--coreset", "0.01", "--backbone", "mobilenet_v2",
                      "--weights", str(MOBILENET_WEIGHTS), "--data-root", str(real_bottle.parent),
                      "--categories", "bottle", "--result-dir", str(out), "--no-progress",
                      "--plots", "1"])
    assert code == 0
    bottle = json.loads((out / "metrics.json").read_text())["categories"]["bottle"]
    assert (bottle["n_train"], bottle["n_test"]) == (209, 83)
    assert bottle["image_auroc"] >= 1.0
    assert bottle["pixel_auroc"] >= 0.965
    assert bottle["pixel_aupro"] > 0.85
    assert (out / "localization" / "bottle" / "broken_large_000.png").is_file()

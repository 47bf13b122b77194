"""SA-PatchCore: the attention is the official formulation, and it catches co-occurrence anomalies
that PatchCore cannot see patch by patch."""
import numpy as np
import torch

from datasets.loader import TensorBatches

from models.backbone import FeatureExtractor
from models.patchcore import PatchCore
from models.sa_patchcore import SAPatchCore, channelwise_self_attention
from tests.conftest import assert_planted_defects_found, fit_on_synthetic
from utils.metrics import image_auroc


def official_attention(x):
    """The official code's steps: per channel, an outer product of the flattened map with itself
    ([B, C, P, 1] @ [B, C, 1, P]), softmax over the last axis, times the values [B, C, P, 1]."""
    b, c, h, w = x.shape
    flat = x.flatten(2)
    weights = torch.softmax(flat[..., :, None] @ flat[..., None, :], dim=-1)
    return (weights @ flat[..., None]).reshape(b, c, h, w)


def test_attention_equals_official_formulation_in_any_chunking():
    x = torch.randn(2, 10, 5, 7)
    expected = official_attention(x)
    torch.testing.assert_close(channelwise_self_attention(x), expected)
    torch.testing.assert_close(channelwise_self_attention(x, max_elements=100), expected)
    # every output is a convex combination of the same channel's values
    assert torch.all(channelwise_self_attention(x) <= x.flatten(2).amax(2)[..., None, None] + 1e-6)


def test_embedding_for_any_input_size(resnet18_weights):
    extractor = FeatureExtractor("resnet18", SAPatchCore.layers, weights=resnet18_weights)
    model = SAPatchCore(extractor)
    embedding = model.embed(torch.zeros(2, 3, 80, 112, dtype=torch.uint8))
    # layer2 grid (stride 8) of 80x112, 128 + 256 channels concatenated
    assert embedding.shape == (2, 10, 14, 128 + 256) and model.embed_dim == 384


def test_finds_planted_defects(tmp_path, resnet18_weights):
    model, batch = fit_on_synthetic(tmp_path, resnet18_weights, SAPatchCore,
                                    coreset_fraction=0.25)
    assert_planted_defects_found(model, batch, tolerance_px=12)


def _scene(rng, objects, size=128):
    """Grey noise with object A (red square, always at the left edge) and/or B (blue disc,
    always at the right edge): far apart, so no patch's neighbourhood sees both."""
    image = np.full((size, size, 3), 128, np.int16) + rng.integers(-8, 9, (size, size, 3))
    for name in objects:
        y = rng.integers(4, size - 24)
        if name == "A":
            x = rng.integers(2, 10)
            image[y:y + 18, x:x + 18] = (220, 40, 40)
        else:
            x = rng.integers(size - 28, size - 20)
            yy, xx = np.ogrid[:size, :size]
            image[(yy - y - 9) ** 2 + (xx - x - 9) ** 2 <= 81] = (40, 40, 220)
    return torch.from_numpy(np.clip(image, 0, 255).astype(np.uint8).transpose(2, 0, 1).copy())


def test_cooccurrence_anomaly_is_seen_by_sa_patchcore_not_by_patchcore(resnet18_weights):
    """Training images hold A or B; test images hold A or B (normal) or A and B together
    (anomalous: every part is normal, the combination is not)."""
    rng = np.random.default_rng(0)
    train = torch.stack([_scene(rng, name) for name in "AB" * 8])
    test = torch.stack([_scene(rng, name) for name in "AB" * 4] +
                       [_scene(rng, "AB") for _ in range(8)])
    labels = np.array([0] * 8 + [1] * 8)
    auroc = {}
    for model_class in (PatchCore, SAPatchCore):
        extractor = FeatureExtractor("resnet18", model_class.layers, weights=resnet18_weights)
        model = model_class(extractor, coreset_fraction=0.25)
        model.fit(TensorBatches(train))
        auroc[model_class.__name__] = image_auroc(labels, model.predict(test)[0].numpy())
    assert auroc["SAPatchCore"] > auroc["PatchCore"], auroc
    assert auroc["SAPatchCore"] >= 0.9 and auroc["PatchCore"] <= 0.75, auroc

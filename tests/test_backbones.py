"""Every backbone through the same extractor, on random weights and tiny inputs (no downloads)."""
import pytest
import torch

from models.backbone import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor,
                             _build_model)
from models.patchcore import PatchCore
from datasets.loader import TensorBatches
from tests.conftest import assert_features_close

# name -> channels of layer1, layer2, layer3
CHANNELS = {"resnet50": (256, 512, 1024), "resnet101": (256, 512, 1024),
            "wide_resnet101_2": (256, 512, 1024), "clip_rn50": (256, 512, 1024)}


@pytest.mark.parametrize("name", list(CHANNELS))
def test_taps_strides_and_end_to_end_scoring(name):
    torch.manual_seed(0)
    extractor = FeatureExtractor(name, ("layer1", "layer2", "layer3"), pretrained=False)
    maps = extractor(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert [tuple(maps[f"layer{i}"].shape) for i in (1, 2, 3)] == [
        (2, c, 64 // s, 64 // s) for c, s in zip(CHANNELS[name], (4, 8, 16))]
    assert "layer4" not in extractor.stages, "nothing after the deepest tap is kept"
    # PatchCore fit + score on this backbone: finite scores, a map per image
    model = PatchCore(FeatureExtractor(name, PatchCore.layers, pretrained=False),
                      coreset_fraction=0.5)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    model.fit(TensorBatches(images[:3]))
    scores, grid = model.score_patches(images)
    assert grid.shape == (4, 8, 8) and torch.isfinite(scores).all()
    assert scores[3] > scores[:3].max(), "an unseen image scores above the bank's own images"


def test_normalisation_constants_follow_the_pretraining():
    clip = FeatureExtractor("clip_rn50", ("layer2",), pretrained=False)
    resnet = FeatureExtractor("resnet50", ("layer2",), pretrained=False)
    assert torch.allclose(clip.mean.flatten(), torch.tensor(CLIP_MEAN))
    assert torch.allclose(clip.std.flatten(), torch.tensor(CLIP_STD))
    assert torch.allclose(resnet.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(resnet.std.flatten(), torch.tensor(IMAGENET_STD))
    image = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(clip.normalize(image)[0, :, 0, 0], expected)


def test_clip_taps_are_its_stage_two_and_three(tmp_path, capsys):
    """layer2 / layer3 are CLIP ModifiedResNet's own layer2 / layer3 outputs, and a state dict of
    its image tower loads offline through --weights."""
    torch.manual_seed(1)
    visual = _build_model("clip_rn50").eval()
    path = tmp_path / "clip_rn50_visual.pth"
    torch.save(visual.state_dict(), path)
    extractor = FeatureExtractor("clip_rn50", ("layer2", "layer3"), weights=path)
    assert extractor.weights_id == "file:clip_rn50_visual.pth"
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        x = extractor.normalize(images)
        x = visual.stem(x) if callable(getattr(visual, "stem", None)) else x
        layer2 = visual.layer2(visual.layer1(x))
        layer3 = visual.layer3(layer2)
    maps = extractor(images)
    # the extractor folds BatchNorm and runs channels_last: equal up to summation order
    assert_features_close(maps["layer2"], layer2)
    assert_features_close(maps["layer3"], layer3)


def test_wrong_weights_for_clip_name_the_source(tmp_path, resnet18_weights):
    from utils.errors import UserError
    with pytest.raises(UserError, match=r"does not fit backbone clip_rn50: .* pass backbone "
                                        r"resnet18, which they fit, or weights saved from "
                                        r"open_clip.create_model\('RN50'\).visual$"):
        FeatureExtractor("clip_rn50", ("layer2",), weights=resnet18_weights)
    # and a CLIP tower's weights given for another backbone are recognised as clip_rn50's
    path = tmp_path / "clip_visual.pth"
    torch.save(_build_model("clip_rn50").state_dict(), path)
    with pytest.raises(UserError, match=r"does not fit backbone resnet50: .* pass backbone "
                                        r"clip_rn50, which they fit"):
        FeatureExtractor("resnet50", ("layer2",), weights=path)
    # weights of no known backbone: only the source of the right ones
    state = torch.load(resnet18_weights, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4")}, path)
    with pytest.raises(UserError, match=r"does not fit backbone resnet50: .*; pass weights saved "
                                        r"from torchvision.models.resnet50$"):
        FeatureExtractor("resnet50", ("layer2",), weights=path)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "wide_resnet50_2", "clip_rn50"])
def test_batchnorm_folding_keeps_the_features(name):
    """Every BatchNorm is folded into its convolution, and the features stay the same (float
    rounding only), with BN statistics far from the identity so that a wrong fold would show."""
    import copy

    from models.backbone import fuse_batchnorm

    torch.manual_seed(0)
    plain = FeatureExtractor(name, PatchCore.layers, pretrained=False, fuse=False)
    for module in plain.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_()
    fused = copy.deepcopy(plain)
    assert fuse_batchnorm(fused.stages) > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    expected, got = plain(images), fused(images)
    for layer in PatchCore.layers:
        assert_features_close(got[layer], expected[layer])
    # the default extractor folds, and its weights fingerprint is that of the unfolded weights
    torch.manual_seed(0)
    default = FeatureExtractor(name, PatchCore.layers, pretrained=False)
    torch.manual_seed(0)
    unfused = FeatureExtractor(name, PatchCore.layers, pretrained=False, fuse=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in default.modules())
    assert default.fingerprint() == unfused.fingerprint()


class _Stop(Exception):
    pass


@pytest.mark.parametrize("name, taps", [("resnet18", ("layer2", "layer3")),
                                        ("mobilenet_v2", ("features.6", "features.13"))])
def test_the_official_bn_probe_gives_the_official_codes_features(name, taps, tmp_path):
    """The official PatchCore run: a torchvision model in training mode, whose load() probes the
    feature shapes with one forward of torch.ones (stopped after the last tap, as its hooks do)
    before eval(). Its features are reproduced with bn_probe, and differ from the weights' own."""
    import torchvision

    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)()
    weights = tmp_path / "w.pth"
    torch.save(reference.state_dict(), weights)
    outputs = {}

    def hook(tap):
        def keep(module, inputs, output):
            outputs[tap] = output
            if tap == taps[-1]:
                raise _Stop
        return keep
    for tap in taps:
        reference.get_submodule(tap).register_forward_hook(hook(tap))
    with torch.no_grad(), pytest.raises(_Stop):
        reference.train()(torch.ones(1, 3, 64, 64))  # the official feature_dimensions probe
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad(), pytest.raises(_Stop):
        reference.eval()((images / 255 - mean) / std)
    probed = FeatureExtractor(name, PatchCore.layers, weights=weights, bn_probe=64)(images)
    plain = FeatureExtractor(name, PatchCore.layers, weights=weights)(images)
    for layer, tap in zip(PatchCore.layers, taps):
        assert_features_close(probed[layer], outputs[tap])
        assert (plain[layer] - outputs[tap]).abs().max() > 0.01 * outputs[tap].abs().max()

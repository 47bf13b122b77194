"""Pyramid features of an ImageNet CNN, shared by every method.

Every backbone is cut into named stages ``layer1`` .. ``layer4`` (strides 4, 8, 16, 32) so that the
methods can speak of layers without knowing the architecture. For ResNets these are torchvision's
own ``layerN``; for MobileNetV2 they end at ``features[3]``, ``features[6]``, ``features[13]`` and
``features[18]`` (the taps with strides 4, 8, 16 and 32). The forward pass stops after the deepest
stage asked for, so PatchCore (layer2+3) never pays for layer4.

Precision: with ``precision="fp16"`` or ``"bf16"`` the forward pass runs under autocast. Weights and
inputs are channels_last on every device (the layout tensor cores and oneDNN's CPU kernels read
directly); feature maps are always handed back in float32, so coreset, kNN and covariances compute
in full precision. A run's default is fp16 on a GPU and fp32 on a CPU (``config.py``): on bottle
fp16 stayed within the 0.1 AUROC point a faithful reproduction may drift and bf16 (8 mantissa bits
to fp16's 10) did not (benchmarks/RESULTS.md), so bf16 is opt-in only.
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from utils.errors import SettingError, UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CLIP's own input statistics (OpenAI CLIP / open_clip OPENAI_DATASET_MEAN / _STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")
# Heads we never use: a weights file without them is complete.
_HEAD_PREFIXES = ("fc.", "classifier.", "attnpool.")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def stage_names(hierarchy: str | tuple | list) -> tuple[str, ...]:
    """"2+3" -> ("layer2", "layer3"), finest first; a sequence of stage names is kept as is."""
    if isinstance(hierarchy, str):
        return tuple(f"layer{part}" for part in hierarchy.split("+"))
    return tuple(hierarchy)


def _resnet_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    return [("stem", stem)] + [(name, getattr(model, name)) for name in STAGE_NAMES]


def _clip_resnet_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """CLIP's ModifiedResNet: a 3-conv stem + 2x2 average pool (stride 4), then layer1-4 with the
    same strides as torchvision's ResNet; its attention-pool head is never run."""
    stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.conv2, model.bn2, model.act2,
                         model.conv3, model.bn3, model.act3, model.avgpool)
    return [("stem", stem)] + [(name, getattr(model, name)) for name in STAGE_NAMES]


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise SettingError("backbone", "clip_rn50", "needs open_clip: pip install open_clip_torch") from None
    return open_clip


def _build_model(name: str) -> nn.Module:
    if name == "clip_rn50":  # the image tower of CLIP ResNet-50, randomly initialised here
        import logging
        open_clip = _open_clip()
        logging.disable(logging.WARNING)  # "no pretrained weights loaded": we load them ourselves
        try:
            return open_clip.create_model("RN50", pretrained=None).visual
        finally:
            logging.disable(logging.NOTSET)
    return torchvision.models.get_model(name, weights=None)


def fuse_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution into it; returns how many.

    BatchNorm at inference is a fixed per-channel affine map, so conv -> bn equals one conv with
    rescaled weights and a bias (the same arithmetic up to float rounding; tests/test_backbones.py
    compares fused and unfused features of every backbone). It saves a full read and write of
    every activation, which matters most for thin, memory-bound networks such as MobileNetV2
    (timings: benchmarks/RESULTS.md).
    A pair is fused only where the architecture applies bn right after its conv: consecutive
    children of a Sequential (stems, MobileNetV2, downsample paths) or a block's ``convN`` /
    ``bnN`` attributes (torchvision's and CLIP's residual blocks).
    """
    fused = sum(fuse_batchnorm(child) for child in module.children())
    children = module._modules
    pairs = []
    if isinstance(module, nn.Sequential):
        names = list(children)
        pairs += list(zip(names, names[1:]))
    pairs += [(name, "bn" + name[4:]) for name in list(children) if name.startswith("conv")]
    for conv_name, bn_name in pairs:
        conv, bn = children.get(conv_name), children.get(bn_name)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            children[conv_name] = torch.nn.utils.fuse_conv_bn_eval(conv, bn)
            children[bn_name] = nn.Identity()
            fused += 1
    return fused


def _mobilenet_v2_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    f = model.features
    return [("layer1", f[0:4]), ("layer2", f[4:7]), ("layer3", f[7:14]), ("layer4", f[14:19])]


# name -> how to cut torchvision's model of that name into stages (no string eval).
BACKBONES = {
    "resnet18": _resnet_stages,
    "resnet50": _resnet_stages,
    "resnet101": _resnet_stages,
    "wide_resnet50_2": _resnet_stages,
    "wide_resnet101_2": _resnet_stages,
    "mobilenet_v2": _mobilenet_v2_stages,
    "clip_rn50": _clip_resnet_stages,
}
_SOURCE = {"clip_rn50": "open_clip.create_model('RN50').visual"}
# input normalisation of each backbone's pre-training (ImageNet unless listed)
NORMALIZATION = {"clip_rn50": (CLIP_MEAN, CLIP_STD)}


def _unreadable_weights(path: Path, error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, in one line. torch's own message
    runs to several lines and recommends ``weights_only=False``, which would run whatever code the
    file's pickle names; that stays the user's decision, for a file they trust."""
    pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if pickled:  # typically torch.save(model): the whole module pickled, not its state_dict()
        return (f"holds a pickled {pickled.group(1)}, not a state dict; if you trust the file, "
                f"save its state dict once: python -c \"import torch; torch.save(torch.load("
                f"{str(path)!r}, weights_only=False).state_dict(), 'weights.pth')\"")
    return (f"is not a readable PyTorch state dict ({type(error).__name__}: truncated, corrupt or "
            f"not written by torch.save)")


def load_state_dict_file(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise SettingError("weights", path, "is a folder; give the path of a saved state dict "
                           "file in it")
    if not path.is_file():
        raise SettingError("weights", path, "does not exist; give the path of a saved state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip or torch format errors all mean "not a state dict"
        raise SettingError("weights", path, _unreadable_weights(path, error)) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SettingError("weights", path, f"holds a {type(state).__name__}, not a state dict")
    if "format_version" in state and "method" in state:  # models.saved_model's payload
        raise SettingError("weights", path, f"is a model saved by {{save_models}}, not backbone "
                           f"weights; score images with it: {{predict}} PATH {{model}} {path}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _mismatch(model: nn.Module, state: dict) -> str:
    """What keeps ``state`` from loading into ``model``, or "" (a missing head is fine)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(_HEAD_PREFIXES)]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    return "; ".join(f"{len(keys)} {label} keys (e.g. {', '.join(keys[:3])})"
                     for label, keys in (("missing", missing), ("unexpected", unexpected),
                                         ("wrong shape", wrong_shape)) if keys)


def _fits(name: str, state: dict) -> bool:
    """Whether ``state`` loads into backbone ``name``, only to name the right --backbone in an
    error. The model is built on the meta device (no memory, no initialisation) where its
    constructor allows; open_clip's moves the model between devices, so it is built on the CPU."""
    try:
        try:
            with torch.device("meta"):
                model = _build_model(name)
        except NotImplementedError:  # "Cannot copy out of meta tensor"
            model = _build_model(name)
        return not _mismatch(model, state)
    except Exception:  # e.g. open_clip not installed: that backbone cannot be the answer
        return False


def _load_weights(model: nn.Module, name: str, weights: str | Path | None, pretrained: bool) -> str:
    """Fill ``model`` in place; returns a short identity of the weights for metrics.json."""
    if weights is not None:
        state = load_state_dict_file(weights)
        mismatch = _mismatch(model, state)
        if mismatch:
            fitting = [other for other in BACKBONES if other != name and _fits(other, state)]
            fix = (f"pass {{backbone}} {fitting[0]}, which they fit, or weights saved from "
                   if fitting else "pass weights saved from ")
            raise SettingError("weights", weights, f"does not fit {{backbone}} {name}: "
                               f"{mismatch}; {fix}"
                               f"{_SOURCE.get(name, 'torchvision.models.' + name)}")
        # NaN in one weight makes every feature NaN, and nothing later could say why
        own = model.state_dict()
        broken = [key for key, value in state.items() if key in own
                  and value.is_floating_point() and not torch.isfinite(value).all()]
        if broken:
            more = f" and {len(broken) - 3} more tensors" * (len(broken) > 3)
            raise SettingError("weights", weights, f"holds NaN or infinite values "
                               f"({', '.join(broken[:3])}{more}): a damaged file or a diverged "
                               "training; pass other weights")
        model.load_state_dict(state, strict=False)
        return f"file:{Path(weights).name}"
    if not pretrained:
        return "random"
    if name == "clip_rn50":
        try:
            state = _open_clip().create_model("RN50", pretrained="openai").visual.state_dict()
        except UserError:
            raise
        except Exception as error:  # no network, hub errors
            raise UserError(f"could not download CLIP RN50 weights ({type(error).__name__}); "
                            "offline, pass {weights} PATH to a saved state dict of "
                            "open_clip's RN50 .visual") from None
        model.load_state_dict(state)
        return "open_clip:RN50/openai"
    # The papers used torchvision's original ImageNet weights (IMAGENET1K_V1).
    enum = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        model.load_state_dict(enum.get_state_dict(progress=True))
    except Exception as error:  # URLError, SSL, HTTP: all mean "no network"
        raise UserError(f"could not download ImageNet weights for {name} ({type(error).__name__}); "
                        f"offline, pass {{weights}} PATH to a saved torchvision {name} state dict") from None
    return f"torchvision:{name}.IMAGENET1K_V1"


def onto_grid(feature_map: torch.Tensor, grid: tuple[int, int], mode: str = "nearest"):
    """A coarser layer's map [B, C, h, w] resampled onto a finer layer's grid (unchanged if it is
    already there). ``nearest`` repeats each coarse cell over the fine cells it covers, the
    reference codes' ``embedding_concat`` (PaDiM, SA-PatchCore); ``bilinear`` with
    align_corners=False is PatchCore's resize of layer3 onto layer2."""
    if tuple(feature_map.shape[-2:]) == tuple(grid):
        return feature_map
    if mode == "nearest":
        return F.interpolate(feature_map, size=tuple(grid), mode="nearest")
    return F.interpolate(feature_map, size=tuple(grid), mode=mode, align_corners=False)


class FeatureExtractor(nn.Module):
    """uint8 or [0,1] images in, a dict of feature maps ``layerN -> [B, C, H, W]`` out.

    ``bn_probe``: None (the paper's features: BatchNorm keeps the weights' running statistics),
    or the crop of the official PatchCore code's shape probe. Its run script builds the backbone
    in training mode, and ``PatchCore.load`` then runs one forward of an all-ones image of that
    size (``feature_dimensions``) before anything switches to eval: every BatchNorm up to the last
    tapped stage moves its running mean and variance one momentum step (0.1) towards that
    image's batch statistics. Given a crop, the same forward is run here, so the official code's
    features are reproduced."""

    def __init__(self, name: str, layers: tuple[str, ...], weights: str | Path | None = None,
                 pretrained: bool = True, precision: str = "fp32",
                 fuse: bool | None = None, bn_probe: int | None = None):
        super().__init__()
        if precision not in PRECISIONS:
            raise SettingError("precision", precision, f"is unknown; choose {', '.join(PRECISIONS)}")
        self.precision = precision
        if name not in BACKBONES:
            raise SettingError("backbone", name, f"is unknown; choose one of {', '.join(BACKBONES)}")
        unknown = [layer for layer in layers if layer not in STAGE_NAMES]
        if unknown:
            raise UserError(f"unknown layer(s) {unknown}; layers are {', '.join(STAGE_NAMES)}")
        model = _build_model(name)
        mean, std = NORMALIZATION.get(name, (IMAGENET_MEAN, IMAGENET_STD))
        self.weights_id = _load_weights(model, name, weights, pretrained)
        self.name = name
        self.layers = tuple(sorted(layers, key=STAGE_NAMES.index))
        stages = BACKBONES[name](model)
        last = [n for n, _ in stages].index(self.layers[-1])
        # Keep only the stages up to the deepest tap: nothing after it is ever computed or stored.
        self.stages = nn.ModuleDict(stages[: last + 1])
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self._shapes: dict[int, dict[str, tuple[int, int, int]]] = {}  # crop -> ``shapes``
        self.eval().requires_grad_(False)
        # Of the weights as loaded, before fusion rewrites them: saved models stay comparable.
        self._fingerprint = self._weights_sha1()
        self.bn_probe = bn_probe
        if bn_probe is not None:
            self.stages.train()
            with torch.no_grad():  # the running statistics update all the same
                x = torch.ones(1, 3, bn_probe, bn_probe)  # as the official probe: no normalising
                for stage in self.stages.values():
                    x = stage(x)
            self.stages.eval()
        # Folding BatchNorm only in fp32: in fp16/bf16 the folded biases and scales are rounded
        # too, which on the synthetic ranking test dropped the bf16 patch-score rank correlation
        # from > 0.98 to 0.95 (tests/test_patchcore.py); unfolded, BatchNorm keeps its own rounding.
        if fuse if fuse is not None else precision == "fp32":
            fuse_batchnorm(self.stages)
        self.stages.to(memory_format=torch.channels_last)

    def _weights_sha1(self) -> str:
        import hashlib
        digest = hashlib.sha1(self.name.encode())
        for key, tensor in self.stages.state_dict().items():
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def fingerprint(self) -> str:
        """sha1 of the parameters and statistics actually used (the kept stages): the same weights
        give the same fingerprint whether downloaded or loaded from a file."""
        return self._fingerprint

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return (images - self.mean) / self.std

    def _autocast(self, device: torch.device):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(device.type, dtype=PRECISIONS[self.precision])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        # NHWC: what cuDNN's tensor-core convolutions and oneDNN's CPU kernels read natively
        x = self.normalize(images).contiguous(memory_format=torch.channels_last)
        outputs = {}
        with self._autocast(x.device):
            for name, stage in self.stages.items():
                x = stage(x)
                if name in self.layers:
                    outputs[name] = x
        # float32, standard layout: coreset, kNN and covariances downstream stay full precision
        return {name: out.float().contiguous() for name, out in outputs.items()}

    def shapes(self, crop: int) -> dict[str, tuple[int, int, int]]:
        """(channels, height, width) of each tapped layer's map of one ``crop`` x ``crop`` image,
        from one probe forward, remembered per crop: every model built on this extractor (one per
        category) asks, for its channels and for the memory its fit will take."""
        if crop not in self._shapes:
            maps = self(torch.zeros(1, 3, crop, crop, device=self.mean.device))
            self._shapes[crop] = {name: tuple(out.shape[1:]) for name, out in maps.items()}
        return dict(self._shapes[crop])

    def channels(self) -> dict[str, int]:
        """Channels of each tapped layer (a small probe: they do not depend on the size)."""
        return {name: shape[0] for name, shape in self.shapes(64).items()}

    def summary(self, crop: int = 224) -> str:
        import torchinfo
        return str(torchinfo.summary(self, input_size=(1, 3, crop, crop), verbose=0,
                                     device=self.mean.device))

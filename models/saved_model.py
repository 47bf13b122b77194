"""One file per fitted category: everything needed to score new images without the training data.

Contents (``torch.save`` of plain types and tensors, read back with ``weights_only=True``):
the method and its hyperparameters, the backbone name, weights identity and a fingerprint of its
parameters, the path of the weights file it was fitted with (if any), the layers, the preprocessing (resize, crop, resample), the memory buffers (PatchCore's
coreset and provenance, PaDiM's channel subset, means and precision matrices, SPADE's gallery) and
the decision thresholds. The backbone's weights themselves are not copied (they are public and
large): loading rebuilds the backbone from the weights given, else from the recorded weights file
when it is still there, else from the download, and refuses weights whose fingerprint differs
from the ones the memory was built with.
"""
from __future__ import annotations

from pathlib import Path

import torch

from models.backbone import FeatureExtractor
from utils.errors import SettingError
from utils.files import atomic_output

FORMAT_VERSION = 1


def save_model(path: Path, model, method: str, category: str, preprocessing: dict,
               thresholds: dict, weights: Path | None = None) -> None:
    extractor = model.extractor
    payload = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "category": category,
        "backbone": extractor.name,
        "weights_id": extractor.weights_id,
        "weights_fingerprint": extractor.fingerprint(),
        "bn_probe": extractor.bn_probe,  # the official code's BatchNorm update, redone on load
        # so that predicting needs no weights flag while the file stays where it was
        "weights_path": str(Path(weights).resolve()) if weights is not None else None,
        "layers": list(model.layers),  # its own stages, not all a shared extractor taps
        "preprocessing": dict(preprocessing),
        "hyperparameters": model.hyperparameters(),
        "memory": model.memory_state(),
        "thresholds": dict(thresholds),
    }
    with atomic_output(path) as temporary:
        torch.save(payload, temporary)


def read_model_file(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise SettingError("model", path, "is a folder; give one model file in it "
                           "(<category>.pt)")
    if not path.is_file():
        raise SettingError("model", path, "does not exist; fit one with {save_models} (it writes "
                           "<result-dir>/models/<category>.pt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip/pickle errors: not one of our files, or truncated
        raise SettingError("model", path, f"is not a readable saved model "
                           f"({type(error).__name__}); save it again with {{save_models}}") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise SettingError("model", path, "is not a model saved by {save_models}")
    if payload["format_version"] != FORMAT_VERSION:
        raise SettingError("model", path, f"has format version {payload['format_version']}, this "
                           f"code reads version {FORMAT_VERSION}; refit with {{save_models}}")
    return payload


def weights_for(path: Path, payload: dict, weights: Path | None) -> Path | None:
    """The weights to rebuild the backbone from: those given, else the file the model was fitted
    with if it still exists, else None (the published weights, downloaded)."""
    if weights is not None:
        return weights
    recorded = payload.get("weights_path")
    if recorded is None:
        return None
    if not Path(recorded).is_file():
        raise SettingError("model", path, f"was fitted with the weights file {recorded} "
                           f"(fingerprint {payload['weights_fingerprint']}), which no longer "
                           "exists; pass those weights with {weights}")
    return Path(recorded)


def load_model(path: Path, methods: dict, weights: Path | None, device: torch.device,
               precision: str = "fp32", backbone: str | None = None):
    """(model ready to ``predict``, the saved payload). ``backbone``: what the user asked for, if
    anything; a different one than the file's is refused rather than silently replaced."""
    payload = read_model_file(path)
    if backbone is not None and backbone != payload["backbone"]:
        raise SettingError("model", path, f"was fitted with {{backbone}} {payload['backbone']}, "
                           f"not {backbone}; drop {{backbone}} or pass the matching one")
    if payload["method"] not in methods:
        raise SettingError("model", path, f"holds a {payload['method']} model, a method this "
                           f"code does not have ({', '.join(methods)})")
    weights = weights_for(path, payload, weights)
    extractor = FeatureExtractor(payload["backbone"], tuple(payload["layers"]), weights=weights,
                                 precision=precision, bn_probe=payload.get("bn_probe"))
    if extractor.fingerprint() != payload["weights_fingerprint"]:
        source = f"the weights file {weights}" if weights is not None else extractor.weights_id
        raise SettingError("model", path, f"was fitted with other {payload['backbone']} weights "
                           f"({payload['weights_id']}, fingerprint "
                           f"{payload['weights_fingerprint']}) than {source} (fingerprint "
                           f"{extractor.fingerprint()}); pass the fitted ones with {{weights}}")
    model_class = methods[payload["method"]]
    model = model_class(extractor.to(device), device=device, **payload["hyperparameters"])
    model.load_memory(payload["memory"])
    model.eval()
    return model, payload

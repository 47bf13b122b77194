"""One file per fitted category: everything needed to score new images without the training data.

Contents (``torch.save`` of plain types and tensors, read back with ``weights_only=True``):
the method and its hyperparameters, the backbone name, weights identity and a fingerprint of its
parameters, the layers, the preprocessing (resize, crop, resample), the memory buffers (PatchCore's
coreset and provenance, PaDiM's channel subset, means and precision matrices, SPADE's gallery) and
the decision thresholds. The backbone's weights themselves are not copied (they are public and
large): loading rebuilds the backbone from ``--weights`` or the download and refuses weights whose
fingerprint differs from the ones the memory was built with.
"""
from __future__ import annotations

from pathlib import Path

import torch

from models.backbone import FeatureExtractor
from utils.errors import UserError

FORMAT_VERSION = 1


def save_model(path: Path, model, method: str, category: str, preprocessing: dict,
               thresholds: dict) -> None:
    extractor = model.extractor
    payload = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "category": category,
        "backbone": extractor.name,
        "weights_id": extractor.weights_id,
        "weights_fingerprint": extractor.fingerprint(),
        "layers": list(extractor.layers),
        "preprocessing": dict(preprocessing),
        "hyperparameters": model.hyperparameters(),
        "memory": model.memory_state(),
        "thresholds": dict(thresholds),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(payload, temporary)
    temporary.replace(path)


def read_model_file(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--model {path} does not exist; fit one with --save-models (it writes "
                        "<result-dir>/models/<category>.pt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip/pickle errors: not one of our files, or truncated
        raise UserError(f"--model {path} is not a readable saved model ({type(error).__name__}); "
                        "save it again with --save-models") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise UserError(f"--model {path} is not a model saved by main.py --save-models")
    if payload["format_version"] != FORMAT_VERSION:
        raise UserError(f"--model {path} has format version {payload['format_version']}, this "
                        f"code reads version {FORMAT_VERSION}; refit with --save-models")
    return payload


def load_model(path: Path, methods: dict, weights: Path | None, device: torch.device,
               precision: str = "fp32", backbone: str | None = None, progress: bool = False):
    """(model ready to ``predict``, the saved payload). ``backbone``: what the user asked for, if
    anything; a different one than the file's is refused rather than silently replaced."""
    payload = read_model_file(path)
    if backbone is not None and backbone != payload["backbone"]:
        raise UserError(f"--model {path} was fitted with --backbone {payload['backbone']}, not "
                        f"{backbone}; drop --backbone or pass the matching one")
    extractor = FeatureExtractor(payload["backbone"], tuple(payload["layers"]), weights=weights,
                                 precision=precision)
    if extractor.fingerprint() != payload["weights_fingerprint"]:
        raise UserError(f"--model {path} was fitted with other {payload['backbone']} weights "
                        f"({payload['weights_id']}) than the ones loaded now "
                        f"({extractor.weights_id}); pass those weights with --weights")
    model_class = methods[payload["method"]]
    model = model_class(extractor.to(device), device=device, progress=progress,
                        **payload["hyperparameters"])
    model.load_memory(payload["memory"])
    model.eval()
    return model, payload

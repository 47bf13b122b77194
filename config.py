"""One run's configuration: every setting resolved once, with every default filled.

``resolve_config(**options)`` takes what a user gave (None: not given) and returns a frozen
``RunConfig``; nothing changes it afterwards. The method's own hyperparameters (``k``,
``coreset_fraction``, ``dims`` ...) are in ``method_settings``, with the method's defaults
(``models.base.AnomalyModel.defaults``); settings that depend on the machine (device, precision,
batch size, figure processes) are decided here, once.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import hashlib
import itertools
import logging
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from datasets import MVTEC_CATEGORIES, find_categories
from datasets.decode_ahead import default_processes
from datasets.mvtec import RESAMPLING, check_preprocessing
from models.backbone import BACKBONES, PRECISIONS, stage_names
from models.registry import METHODS
from utils.distributed import launched_as_main, warn_once
from utils.errors import SettingError, UserError
from utils.files import probe_creatable
from utils.parse import (commas_said, holdout_fraction, nonnegative_int, one_of,
                         positive_int, quantile, user_path, whole_number)

DEVICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("auto", *PRECISIONS)
RESAMPLES = tuple(RESAMPLING)
PATHS = ("data_root", "result_dir", "weights", "model", "cache_dir")
SWITCHES = ("custom", "download", "skip_bad_images", "explain", "save_models", "save_maps",
            "resume", "progress", "verbose", "no_cache", "official_bn_probe")
# What a library caller gives is read by the parser of the setting's command-line flag: both
# ways in take the same values and refuse the same ones in the same words, before any data is
# read. Unchecked, a device "gpu" or a k of 2.5 fails deep in torch, a quantile of 1.5 only after
# the whole fit, and a batch size of 0 silently becomes the default.
VALUE_PARSERS = {
    "resize": positive_int, "crop": positive_int, "batch_size": positive_int,
    "workers": nonnegative_int, "decode_ahead": nonnegative_int, "plots": nonnegative_int,
    "plot_workers": nonnegative_int, "seed": whole_number,
    "calibration_fraction": holdout_fraction, "calibration_quantile": quantile,
    "device": one_of(DEVICES), "precision": one_of(PRECISION_CHOICES),
    "resample": one_of(RESAMPLES)}


@dataclass(frozen=True)
class RunConfig:
    method: str = "patchcore"
    method_settings: dict[str, Any] = field(default_factory=dict)
    backbone: str | None = "wide_resnet50_2"  # None with predict: the saved model's
    weights: Path | None = None          # None: the backbone's published weights, downloaded
    data_root: Path = Path("mvtec_anomaly_detection")
    categories: tuple[str, ...] = MVTEC_CATEGORIES
    custom: bool = False                 # data root holds the user's own categories
    download: bool = True                # fetch a missing MVTec AD category
    mirror: str | None = None            # base URL of <category>.tar.xz, tried before MVTec's
    result_dir: Path = Path("result")
    device: str = "cpu"
    precision: str = "fp32"              # backbone forward: fp32, fp16 or bf16 autocast
    official_bn_probe: bool = False      # BatchNorm statistics as the official PatchCore run's
    resize: int = 256
    crop: int = 224
    resample: str = "bilinear"
    batch_size: int = 8
    workers: int | None = None           # loader processes; None: chosen per split
    cache_dir: Path | None = None        # decode cache; None: decode every time
    decode_ahead: int = 0                # processes filling the cache ahead of use (0: off)
    seed: int = 0
    plots: int = 3                       # localization figures per defect type
    plot_workers: int = 0                # processes drawing figures (0: drawn in turn)
    skip_bad_images: bool = False
    explain: bool = False
    save_models: bool = False
    save_maps: bool = False              # anomaly maps as MVTec AD's evaluation code reads them
    resume: bool = False                 # keep the categories an interrupted run finished
    calibration_fraction: float = 0.0
    calibration_quantile: float = 0.99
    predict: tuple[Path, ...] | None = None  # images / folders to score with ``model``
    model: Path | None = None
    progress: bool = True
    verbose: bool = False

    @property
    def method_class(self):
        return METHODS[self.method]

    @property
    def layers(self) -> tuple[str, ...]:
        """The backbone stages the method reads: its ``layers`` setting where it has one."""
        chosen = self.method_settings.get("layers")
        return stage_names(chosen) if chosen is not None else self.method_class.layers

    def record(self) -> dict:
        """JSON-ready copy for metrics.json."""
        def plain(value):
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, (tuple, list)):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in ("progress", "verbose")}

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def check_writable(result_dir: Path) -> None:
    """Fail before any heavy work if results could not be saved."""
    if result_dir.is_file():
        raise SettingError("result_dir", result_dir, "is a file; give a folder (it is made if "
                           "missing)")
    try:
        probe_creatable(result_dir)
    except OSError as error:
        raise SettingError("result_dir", result_dir, f"is not writable ({error.strerror}); "
                           "choose a folder you can write to") from None


def _refuse_results_among_inputs(result_dir: Path, inputs: list[Path], kind: str,
                                 harm: str) -> None:
    """Image folders are listed whole, sub-folders included: a result folder inside one would be
    read back by the next run, its figures taken for images (a new "defect type" in the metrics,
    patches in the memory bank)."""
    out = result_dir.resolve()
    for folder in inputs:
        if out.is_relative_to(folder.resolve()):  # the folder itself or below it
            raise SettingError("result_dir", result_dir, f"lies inside {kind}{folder}, whose "
                               f"images the run reads: the next run would {harm}; choose a "
                               "folder outside it")


@functools.lru_cache  # once per data root: a sweep resolves one configuration per point
def default_cache_dir(data_root: Path) -> Path:
    """``<data-root>/.cache``; or, where the data root is read-only (a lab's shared copy) and
    holds no cache to read, a folder named after it in the user's cache (``$XDG_CACHE_HOME`` or
    ``~/.cache``): without a cache every run decodes every image again, which on a CPU costs as
    much as the backbone's forward pass."""
    beside = data_root / ".cache"
    if not data_root.is_dir() or beside.is_dir() or os.access(data_root, os.W_OK):
        return beside
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha1(str(data_root.absolute()).encode()).hexdigest()[:12]
    folder = user / "anomaly-detection-images" / f"{data_root.absolute().name}-{digest}"
    if launched_as_main():  # every torchrun process resolves it: one says so
        logging.getLogger("datasets.cache").info("%s is read-only: resized images are cached in "
                                                 "%s (--cache-dir to choose)", data_root, folder)
    return folder


def resolve_device(choice: str) -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SettingError("device", "cuda", ", but PyTorch sees no CUDA GPU; use {device} cpu "
                           "or auto")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def _resolve_method_settings(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """The method's settings: what was given, else the method's default. A value given for a
    setting the method does not have is refused, not silently ignored."""
    method_class = METHODS[method]
    own = {s.name: s for s in method_class.settings}
    for name, value in given.items():
        if value is not None and name not in own:
            takers = sorted(m for m, c in METHODS.items() if name in {s.name for s in c.settings})
            close = _close_names([name], own)
            raise SettingError(name, value, f"is not a setting of {{method}} {method}; " + (
                f"it is one of {', '.join(takers)}" if takers else
                f"{method}'s are {', '.join(own) or 'none'}"
                + f" (did you mean {close}?)" * bool(close)))
    defaults = method_class.defaults()
    return {name: defaults[name] if given.get(name) is None else
            _parsed(name, _one(name, given[name]), own[name].parse) for name in defaults}


def _one(name: str, value):
    if isinstance(value, (list, tuple)):  # several values are a sweep's, not one run's
        raise SettingError(name, repr(value), "takes one value here; several make a sweep "
                           "(config.resolve_sweep)")
    return value


def resolve_config(method: str | None = None, method_settings: dict | None = None,
                   device: str = "auto", precision: str = "auto", batch_size: int | None = None,
                   plot_workers: int | None = None, backbone: str | None = None,
                   categories=None, resample: str | None = None, cache_dir: Path | None = None,
                   no_cache: bool = False, calibration_fraction: float | None = None,
                   decode_ahead: int | None = None, **options) -> RunConfig:
    """A RunConfig from user options; None (or a missing key) means "the default"."""
    if options.get("predict") is not None:
        _refuse_fitting_settings(dict(
            method=method, method_settings=method_settings, categories=categories,
            resample=resample, cache_dir=cache_dir, no_cache=no_cache,
            calibration_fraction=calibration_fraction, decode_ahead=decode_ahead,
            plot_workers=plot_workers, **{name: options.get(name) for name in FITTING_OPTIONS}))
    method = method or RunConfig.method
    if method not in METHODS:
        raise SettingError("method", method, f"is not a method; choose {', '.join(METHODS)}")
    unknown = sorted(set(options) - set(RunConfig.__dataclass_fields__))
    if unknown:  # a misspelled setting must not be silently ignored
        raise TypeError(f"resolve_config() got unknown settings: {', '.join(unknown)}")
    given = dict(options, device=device, precision=precision, batch_size=batch_size,
                 plot_workers=plot_workers, resample=resample, cache_dir=cache_dir,
                 no_cache=no_cache, calibration_fraction=calibration_fraction,
                 decode_ahead=decode_ahead)
    checked = _checked_values({name: value for name, value in given.items() if value is not None})
    options = {name: checked[name] for name in options if name in checked}
    # read back as checked; None given for device or precision is their default, "auto"
    device, precision = checked.get("device", "auto"), checked.get("precision", "auto")
    batch_size, plot_workers, resample, cache_dir, decode_ahead, calibration_fraction = (
        checked.get(name) for name in ("batch_size", "plot_workers", "resample", "cache_dir",
                                       "decode_ahead", "calibration_fraction"))
    categories = _names("categories", categories)
    _refuse_repeats("categories", categories or ())
    base = RunConfig(**options)
    check_preprocessing(base.resize, base.crop)
    _check_seed(base.seed)
    check_writable(base.result_dir)
    device = resolve_device(device)
    predicting = base.predict is not None
    if predicting and base.model is None:
        raise SettingError("predict", " ".join(map(str, base.predict)),
                           "needs {model} FILE (saved by a run with {save_models})")
    if base.model is not None and not predicting:
        raise SettingError("model", base.model, "is only used with {predict} PATH...")
    if backbone is not None and backbone not in BACKBONES:
        raise SettingError("backbone", backbone, f"is unknown; choose {', '.join(BACKBONES)}")
    method_class = METHODS[method]
    if base.explain and not method_class.explainable:
        explainable = [name for name, c in METHODS.items() if c.explainable]
        raise SettingError("explain", None, f"works with {{method}} {' or '.join(explainable)}, "
                           f"not {method}")
    if categories and not base.custom:
        unknown = [c for c in categories if c not in MVTEC_CATEGORIES]
        if unknown:
            close = _close_names(unknown, MVTEC_CATEGORIES)
            raise SettingError("categories", " ".join(unknown), _is_not(
                unknown, "an MVTec AD category", "MVTec AD categories")
                + f" (did you mean {close}?)" * bool(close) + "; they are "
                f"{', '.join(MVTEC_CATEGORIES)}; use {{custom}} for your own folders"
                + commas_said(*unknown))
    if categories and base.custom and not predicting:
        # checked here: a missing custom category must not be looked for among MVTec's downloads
        present = find_categories(base.data_root)
        missing = [c for c in categories if c not in present]
        if missing:
            close = _close_names(missing, present)
            raise SettingError("categories", " ".join(missing), _is_not(
                missing, "a category folder", "category folders")
                + f" (with train/good) in {{data_root}} {base.data_root}, which has: "
                f"{', '.join(present)}" + f"; did you mean {close}?" * bool(close)
                + commas_said(*missing))
    if not categories and not predicting:
        categories = find_categories(base.data_root) if base.custom else MVTEC_CATEGORIES
    if predicting:
        _refuse_results_among_inputs(base.result_dir, [p for p in base.predict if p.is_dir()],
                                     "{predict} folder ", "score its overlays as new images")
    else:
        _refuse_results_among_inputs(
            base.result_dir, [base.data_root / c / split for c in categories
                              for split in ("train", "test")],
            "", "read its figures as training or test images")
    if precision == "auto":
        precision = "fp16" if device == "cuda" else "fp32"
    elif precision == "fp16" and device == "cpu":
        # a GPU command run on a CPU: few CPUs convolve in float16, so autocast falls back to
        # slow kernels (benchmarks/RESULTS.md); asked for by name it runs, but not without a word
        warn_once(__name__, "--precision fp16 on a CPU is several times slower than fp32 (few "
                  "CPUs compute in float16); --precision auto picks fp32 there")
    if calibration_fraction is None:
        calibration_fraction = 0.1 if base.save_models else 0.0
    if no_cache:
        decode_ahead = 0  # nothing to decode into
    elif decode_ahead is None:
        # With a GPU the CPU cores are free to decode the next categories; on a CPU they are
        # the compute, and decoding ahead would only take them from it.
        decode_ahead = (default_processes(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
                        if device == "cuda" else 0)
    return base.replace(
        method=method,
        method_settings=_resolve_method_settings(method, method_settings or {}),
        backbone=backbone or (None if predicting else RunConfig.backbone),
        categories=tuple(categories or ()),
        resample=resample or method_class.resample,
        cache_dir=None if no_cache else (cache_dir or default_cache_dir(base.data_root)),
        device=device, precision=precision,
        batch_size=batch_size or (32 if device == "cuda" else 8),
        # Figures drawn in other processes only pay off where the GPU leaves the CPU idle.
        plot_workers=plot_workers if plot_workers is not None else
        (4 if device == "cuda" and (os.cpu_count() or 1) >= 8 else 0),
        calibration_fraction=calibration_fraction, decode_ahead=decode_ahead)


# RunConfig fields, beside resolve_config's own parameters, that only a fit reads: predict takes
# them from the saved model
FITTING_OPTIONS = ("data_root", "custom", "download", "mirror", "resize", "crop", "explain",
                   "save_models", "save_maps", "calibration_quantile", "resume",
                   "official_bn_probe")


def _is_not(names: list[str], one: str, many: str) -> str:
    return f"is not {one}" if len(names) == 1 else f"are not {many}"


def _close_names(names: list[str], choices) -> str:
    """The choices a typo in ``names`` most likely meant ('' when none is close)."""
    close = dict.fromkeys(m for name in names for m in difflib.get_close_matches(name, choices, 1))
    return ", ".join(close)


def _refuse_fitting_settings(given: dict) -> None:
    """With predict, a fitting setting would be silently ignored (the saved model's rule): refused,
    every one given named. A value that turns something off (False, 0: no download, no decoding
    ahead) changes nothing for predict and passes. Method settings are named by their own names
    (k, coreset_fraction)."""
    names = [name for name, value in given.items()
             if value not in (None, False) and name != "method_settings"]
    names += [name for name, value in (given.get("method_settings") or {}).items()
              if value is not None]
    if names:
        one = len(names) == 1
        raise UserError(f"{', '.join('{' + name + '}' for name in names)} only "
                        f"{'applies' if one else 'apply'} when fitting: {{predict}} uses the saved "
                        f"model's settings; drop {'it' if one else 'them'}, or refit with "
                        "{save_models}")


def _checked_values(given: dict[str, Any]) -> dict[str, Any]:
    """The values of ``given`` (setting name -> value, None left out) as a run reads them: each
    number or choice through its flag's parser, paths as Paths, switches refused unless bool."""
    checked = dict(given)
    for name, value in given.items():
        if name in VALUE_PARSERS:
            checked[name] = _parsed(name, value, VALUE_PARSERS[name])
        elif name in SWITCHES and not isinstance(value, bool):
            raise SettingError(name, repr(value), "is a switch: give True or False")
        elif name in PATHS:
            checked[name] = _path(name, value)
        elif name == "predict":
            items = [value] if isinstance(value, (str, os.PathLike)) else value
            checked[name] = tuple(_path(name, item) for item in items)
        elif name == "mirror" and isinstance(value, os.PathLike):  # a folder of archives
            checked[name] = os.fspath(value)
    return checked


def _parsed(name: str, value, parse) -> Any:
    """``value`` as ``parse`` reads its text (the value itself where it is already right)."""
    try:
        return parse(str(value))
    except argparse.ArgumentTypeError as error:
        raise SettingError(name, None, str(error)) from None


def _path(name: str, value) -> Path:
    """A path setting, ``~`` expanded as its flag does (a literal ``~`` folder would be made in
    the working directory, and MVTec AD downloaded into it)."""
    if not isinstance(value, (str, os.PathLike)):
        raise SettingError(name, repr(value), "must be a path (text or a pathlib.Path)")
    return user_path(value)


def _names(setting: str, values) -> list[str] | None:
    """Category names: one given as text is a list of one (iterating it would give letters). A
    trailing slash is dropped: a shell completes a folder's name with one (bottle/)."""
    if values is None:
        return None
    values = [values] if isinstance(values, str) else list(values)
    if not all(isinstance(value, str) for value in values):
        raise SettingError(setting, repr(values), "must be names (text), e.g. ['bottle']")
    return [value.rstrip("/" + os.sep) or value for value in values]


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2 ** 32:  # numpy's seed range; outside it numpy raises deep in a fit
        raise SettingError("seeds", seed, "is outside 0 .. 2**32 - 1; give a whole number in "
                           "that range")


def _refuse_repeats(name: str, values) -> None:
    """A value listed twice would run twice (a sweep's mean +- std would count it twice, one
    category's results overwrite the other's): most likely a typo, e.g. seeds 0 0 for 0 1."""
    values = list(values)
    repeated = [value for i, value in enumerate(values) if value in values[:i]]
    if repeated:
        raise SettingError(name, " ".join(map(str, values)), f"lists {repeated[0]} more than once; "
                           "give each value once")


@dataclass(frozen=True)
class SweepPoint:
    label: str         # the configuration's column heading, e.g. "k=5" or "coreset=0.1, k=3"
    seed: int
    config: RunConfig  # its result_dir is the configuration's own sub-folder
    sweep_dir: Path | None = None  # the folder of the sweep's comparison: resolve_sweep's


def resolve_sweep(method: str | None = None, method_settings: dict | None = None,
                  seeds=None, result_dir: Path | None = None, **options) -> list[SweepPoint]:
    """Every (configuration, seed) of a sweep. ``method_settings`` maps a setting to one value or
    a list of values; settings with several values are crossed, and every configuration runs for
    every seed. A single configuration with one seed is a plain run: one point, label "", the
    result folder as given. Otherwise each point writes to ``<result_dir>/<label>[/seed-N]``."""
    seed = options.pop("seed", None)
    if options.get("predict") is not None:
        _refuse_fitting_settings(dict(seeds=seeds, seed=seed))
    else:
        method = method or RunConfig.method
    # each value as the run reads it, so that 5 and "5" (or 2+3 and layer2+layer3) are one
    # value, and a label names it as its flag would
    parsers = {s.name: s.parse for s in METHODS[method].settings} if method in METHODS else {}
    listed = {name: [_parsed(name, value, parsers[name]) if name in parsers else value
                     for value in (values if isinstance(values, (list, tuple)) else [values])]
              for name, values in (method_settings or {}).items() if values is not None}
    swept = {name: values for name, values in listed.items() if len(values) > 1}
    fixed = {name: values[0] for name, values in listed.items() if len(values) == 1}
    if isinstance(seeds, numbers.Integral):  # one seed given bare
        seeds = [seeds]
    seeds = [_parsed("seeds", each, whole_number) for each in seeds] if seeds is not None else \
        [RunConfig.seed if seed is None else _parsed("seed", seed, whole_number)]
    for name, values in [*listed.items(), ("seeds", seeds)]:
        if not values:  # e.g. a filtered list that came out empty: not a request for the default
            raise SettingError(name, "[]", "lists no value; give one or more, or None for the "
                               "default")
        _refuse_repeats(name, values)
    for each in seeds:  # all of them before any point's data is looked at
        _check_seed(each)
    # every torchrun process resolves the same settings: the first says so for all
    if len(seeds) > 1 and method in METHODS and not METHODS[method].takes_seed() \
            and launched_as_main():
        logging.getLogger(__name__).warning(
            "%s has no random part: seeds %s give the same numbers, so each configuration runs "
            "%d times to one result; one seed is enough", method, " ".join(map(str, seeds)),
            len(seeds))
    base = user_path(result_dir) if result_dir is not None else RunConfig.result_dir
    if not swept and len(seeds) == 1:
        return [SweepPoint("", seeds[0], resolve_config(
            method, fixed, result_dir=base, seed=seeds[0], **options), base)]
    flags = {s.name: s.flag.lstrip("-") for s in METHODS[method].settings} if method in METHODS \
        else {}
    points = []
    for combination in itertools.product(*swept.values()):
        chosen = dict(zip(swept, combination))
        label = ", ".join(f"{flags.get(n, n)}={v}" for n, v in chosen.items()) or method
        folder = base / label.replace(", ", "_")
        for seed in seeds:
            points.append(SweepPoint(label, seed, resolve_config(
                method, {**fixed, **chosen}, seed=seed,
                result_dir=folder / f"seed-{seed}" if len(seeds) > 1 else folder, **options),
                base))
    return points

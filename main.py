"""Industrial anomaly detection on MVTec AD: the methods of models/registry.py behind one CLI.

For every category: fit a memory of normal features on train/good, score every test image and
pixel, then write metrics, ROC curves, score distributions and localization figures.

    python main.py --k 1 --coreset 0.1
    python main.py --save-models                               # + result/models/<category>.pt
    python main.py --predict new_images/ --model result/models/bottle.pt
    python main.py --k 1 3 --seeds 0 1 2       # a sweep: one column per setting in results.md

This file is the command line only: the run itself is ``pipeline.py`` on a ``config.RunConfig``.
"""
import argparse
import logging
import os
import signal
import sys
import time

# said before an import fails deep inside; to get here, this file keeps to Python 3.6's syntax
if sys.version_info < (3, 9):
    sys.exit(f"error: this project needs Python 3.9 or newer; this is {sys.version.split()[0]}")
if __name__ != "__mp_main__":
    # A drawing process (spawned by utils.plots.FigureQueue) runs this file as __mp_main__; it
    # needs nothing here, and these imports would load torch into each (benchmarks/RESULTS.md).
    from config import DEVICES, PRECISION_CHOICES, RESAMPLES, RunConfig, resolve_sweep
    from models.backbone import BACKBONES
    from models.registry import METHODS, method_settings, setting_help
    from utils.distributed import launched_as_main
    from utils.errors import UserError
    from utils.report import estimate_line, predict_line, stopped_line, summary_line
    from utils.processes import Terminated, sigterm_as_interrupt
    from utils.parse import (flag_names, holdout_fraction, nonnegative_int, positive_int, quantile,
                             user_path, whole_number)
    from tqdm import tqdm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--method", choices=tuple(METHODS), default=None,
        help=f"default {RunConfig.method}; with --predict: the saved model's")
    # Each method's own hyperparameters, declared by the method (models/*.py ``settings``);
    # several values make a sweep.
    for name, settings in method_settings().items():
        add(settings[0].flag, dest=name, type=settings[0].parse, default=None, nargs="+",
            help=setting_help(name), metavar=settings[0].flag.lstrip("-").upper())
    add("--backbone", choices=tuple(BACKBONES), default=None,
        help="ImageNet CNN (default: wide_resnet50_2; with --predict: the model's)")
    add("--weights", type=user_path, default=None,
        help="local state dict of the backbone (offline); default: the published ImageNet weights,"
             " downloaded once")
    add("--data-root", type=user_path, default=None, help="folder of the category folders "
        "(default: mvtec_anomaly_detection)")
    add("--categories", nargs="+", default=None, metavar="NAME",
        help="MVTec categories (default: all 15); with --custom any folder names")
    add("--custom", action="store_true",
        help="data root holds custom categories in MVTec layout (masks optional)")
    add("--result-dir", type=user_path, default=None, help="where outputs go (default: result); an "
        "earlier run there is moved to previous/ first")
    add("--device", choices=DEVICES, default="auto",
        help="auto: a CUDA GPU when PyTorch sees one, else the CPU")
    add("--resize", type=positive_int, default=None, help="shorter side resized to (default 256)")
    add("--crop", type=positive_int, default=None, help="centre crop (default 224)")
    add("--resample", choices=RESAMPLES, default=None,
        help="image resize filter (default: the method's reference code's)")
    add("--batch-size", type=positive_int, default=None,
        help="images per forward pass (default: 32 on GPU, 8 on CPU)")
    add("--workers", type=nonnegative_int, default=None,
        help="DataLoader processes decoding images (default: none when every image of a split is "
             "in the cache, else up to 8 with a GPU and up to 2 on CPU)")
    add("--decode-ahead", type=nonnegative_int, default=None, metavar="N",
        help="processes decoding the next categories' images into the cache while the current "
             "one runs (default: all cores but one with a GPU, 0 = off on CPU)")
    add("--precision", choices=PRECISION_CHOICES, default="auto",
        help="backbone forward precision (auto: fp16 autocast on GPU, fp32 on CPU; bf16 only on "
             "request, see README); features are always used in fp32")
    add("--official-bn-probe", action="store_true", default=None,
        help="BatchNorm statistics as the official reference code leaves them (README)")
    add("--cache-dir", type=user_path, default=None,
        help="where resized images are cached (default: <data-root>/.cache; read-only: ~/.cache)")
    add("--no-cache", action="store_true", help="decode every image from its file on every run")
    add("--seed", "--seeds", dest="seeds", type=whole_number, nargs="+", default=None,
        help="random projection, coreset start, channel draw (default 0); several: each "
             "setting runs with each seed and results.md shows mean ± std")
    add("--no-download", dest="download", action="store_false", default=None,
        help="never download; fail if a category is missing")
    add("--mirror", default=None, metavar="URL", help="base URL or folder holding "
        "<category>.tar.xz, tried before MVTec's links (default: $MVTEC_AD_MIRROR)")
    add("--plots", type=nonnegative_int, default=None, metavar="N",
        help="localization figures per defect type (default 3; 0 disables)")
    add("--plot-workers", type=nonnegative_int, default=None, metavar="N",
        help="processes drawing figures while the next category runs (default: 4 with a GPU and "
             ">= 8 CPU cores, else 0: drawn in turn)")
    add("--skip-bad-images", action="store_true", default=None,
        help="skip unreadable images with a warning instead of stopping")
    add("--explain", action="store_true", default=None,
        help="add to each localization figure the image rebuilt from its nearest normal patches "
             "and the nearest normal patch of the highest-scoring patch (methods: "
             f"{', '.join(m for m, c in METHODS.items() if c.explainable)})")
    add("--save-models", action="store_true", default=None,
        help="write <result-dir>/models/<category>.pt for --predict")
    add("--save-maps", action="store_true", default=None, help="write each test image's map where "
        "MVTec AD's evaluation code reads it: anomaly_maps/<category>/test/<defect>/<name>.tiff")
    add("--resume", action="store_true", default=None, help="keep the categories an interrupted "
        "run with the same settings finished in --result-dir, and run the rest")
    add("--calibration-fraction", type=holdout_fraction, default=None,
        help="part of train/good kept out of the memory and scored to set the image threshold "
             "(default: 0.1 with --save-models, else 0 as in the papers)")
    add("--calibration-quantile", type=quantile, default=None,
        help="image threshold = this quantile of the held-out normal scores (default 0.99)")
    add("--predict", nargs="+", type=user_path, default=None, metavar="PATH",
        help="score these images / folders with --model instead of fitting")
    add("--model", type=user_path, default=None, help="a --save-models file, for --predict")
    add("--verbose", action="store_true", default=None, help="print a torchinfo backbone summary")
    add("--dry-run", action="store_true",
        help="print each fit's expected memory, and its fit and test time (a sweep's: each "
             "configuration's); stop")
    add("--no-progress", dest="progress", action="store_false",
        default=getattr(sys.stderr, "isatty", bool)(),  # a closed stderr (2>&-) is None
        help="hide progress bars (shown only when stderr is a terminal: none go into a log)")
    return parser


class _WarningLines(logging.Handler):
    """The library's warnings and notes by tqdm.write: a progress bar moves below each line."""
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            tqdm.write(f"warning: {message}" if record.levelno >= logging.WARNING else message,
                       file=sys.stderr)
        except Exception:
            self.handleError(record)


def main(argv=None) -> int:
    argv, parser = sys.argv[1:] if argv is None else argv, build_parser()
    options = vars(parser.parse_args(argv))
    settings = {name: options.pop(name) for name in method_settings()}
    dry_run = options.pop("dry_run")
    handler = _WarningLines()
    logging.getLogger().addHandler(handler)
    for library in ("pipeline", "datasets"):  # their progress notes, beside the warnings
        logging.getLogger(library).setLevel(logging.INFO)
    config, group, sweep_dir, started = None, None, None, time.time()
    is_main = launched_as_main()  # only torchrun's rank 0 prints results
    say = print if is_main else (lambda *args, **kwargs: None)
    on_sigterm = sigterm_as_interrupt()
    try:
        import pipeline  # after argparse: --help answers without loading torch's run code
        if dry_run and options["predict"] is not None:  # it estimates a fit; predict has none
            raise UserError("{dry_run} estimates a fit; it does not apply to {predict}")
        points = resolve_sweep(method_settings=settings, **options)
        config = points[0].config
        if dry_run:  # a sweep's too: one estimate per configuration, nothing fitted
            for label, row in pipeline.estimate(points):
                say(f"[{label}] " * bool(label) + estimate_line(row))
            return 0
        group = pipeline.Group.from_environment(config.device)
        if len(points) > 1:
            out = sweep_dir = points[0].sweep_dir
            pipeline.run_sweep(points, out, lambda point, category, metrics: print(
                f"[{point.label}, seed {point.seed}] " + summary_line(category, metrics),
                flush=True), group)
            say(f"sweep of {len(points)} runs: {out / 'results.md'}, {out / 'summary.json'}")
            return 0
        if config.predict is not None:
            say(predict_line(pipeline.predict(config, group)))
            return 0
        run = pipeline.Run(config, group=group)
        report = run.all(lambda category, metrics: print(summary_line(category, metrics),
                                                         flush=True))
        if len(config.categories) > 1 and is_main:
            say(summary_line("mean", report["mean"]).split("\n")[0])
        out = config.result_dir
        say(f"results: {out / 'metrics.json'}, {out / 'results.md'}, {out / 'roc_curve.png'}")
        return 0
    except UserError as error:
        # printed once when every process meets it alike (a setting), else by the one meeting it
        if is_main or not (group is None or getattr(error, "shared", False)):
            print(f"error: {error.render(flag_names(parser, argv))}", file=sys.stderr)
        kept = stopped_line(config, sweep_dir, started, interrupted=False)
        if kept:
            say(kept, file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # every process gets Ctrl-C; rank 0 says what is kept
        say("\n" + stopped_line(config, sweep_dir, started, interrupted=True), file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as a Unix tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush
        return 141
    finally:
        if on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)
        logging.getLogger().removeHandler(handler)
        if group is not None:
            group.close()


if __name__ == "__main__":
    sys.exit(main())

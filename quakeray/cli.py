"""The ``quakeray`` command: parse arguments, run a subcommand, turn errors into exit codes.

Heavy modules (torch, ray, mlflow) are imported inside each subcommand, so ``--help``
and argument errors answer at once. Errors of the :class:`~quakeray.errors.QuakerayError`
family print one line and exit with code 2; ``--debug`` re-raises them with the traceback.
Ray's own lines reach the console only with ``--verbose`` (or ``--debug``); by default
they go to Ray's log files (:mod:`quakeray.runtime`).
"""

from __future__ import annotations

import _thread
import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from quakeray import __version__
from quakeray.compat import check_versions
from quakeray.errors import EXIT_USAGE, QuakerayError

__all__ = ["SMOKE_TEST_OVERRIDES", "Handler", "build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]

SMOKE_TEST_OVERRIDES: tuple[str, ...] = (
    "data.path=",
    "data.synthetic_events=12",
    "data.synthetic_size=32",
    "model.backbone=test_resnet",
    "optim.epochs=2",
    "optim.batch_size=4",
    "scaling.num_workers=1",
    "scaling.use_gpu=false",
    "data.loader_workers=0",
    "run.storage_path=ray_results",
    "search.num_samples=2",
    "search.max_concurrent=1",
    "search.evaluate_best=false",
    "search.confirm=false",
    "search.optuna_storage=",
)
"""What ``--smoke-test`` puts before the user's overrides: a generated 32 px file, the tiny
``test_resnet``, two epochs, one CPU worker, local storage, two trials, no seed
confirmation. Checks the whole path of a GPU or cluster config on a CPU machine in about
a minute."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from quakeray.runtime import set_verbose

    set_verbose(args.verbose or args.debug)
    if not (args.verbose or args.debug):
        # Libraries' INFO chatter is not ours to print: botocore announces where it found
        # AWS credentials whenever rasterio or pyarrow opens a session, MLflow the tables
        # of a new store (Optuna's: search/searchers.py). Their warnings still show.
        for name in ("botocore", "boto3", "s3transfer", "urllib3", "mlflow.store"):
            logging.getLogger(name).setLevel(logging.WARNING)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    _interrupt_on_sigterm()
    try:
        check_versions()  # a Ray or Optuna release we never tried may break a search silently
        return handler(args)
    except QuakerayError as exc:
        if args.debug:
            raise
        print(f"quakeray: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("quakeray: interrupted", file=sys.stderr)
        return 130


def _interrupt_on_sigterm() -> None:
    """Treat SIGTERM like Ctrl-C, so runs are closed as KILLED instead of left RUNNING.

    ``ray job stop`` and most schedulers send SIGTERM; the default action would end the
    process without unwinding, leaving MLflow runs RUNNING and Tune state half written.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    sys.unraisablehook = _redeliver_interrupts(sys.unraisablehook)


def _redeliver_interrupts(
    previous: Callable[[Any], object],
) -> Callable[[Any], object]:
    """An unraisable hook that delivers a swallowed Ctrl-C or SIGTERM to the main thread again.

    A signal handler's exception that surfaces while Python runs a weakref callback or a
    ``__del__`` (h5py and torch run many) cannot propagate: Python prints "Exception
    ignored" and goes on as if nothing happened, so the command would finish its work and
    exit 0 after the user stopped it. The interrupt is delivered once more instead.
    """

    def hook(unraisable: Any) -> None:
        if unraisable.exc_type is not KeyboardInterrupt:
            previous(unraisable)
            return
        sigterm = f"signal {int(signal.SIGTERM)}"
        message = str(unraisable.exc_value) if unraisable.exc_value is not None else ""
        signum = signal.SIGTERM if message == sigterm else signal.SIGINT
        # From another thread, a moment later: raised here, inside the hook, it would be
        # swallowed again. Should it land in another callback, this hook runs once more.
        threading.Timer(0.05, _thread.interrupt_main, args=(signum,)).start()

    return hook


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="quakeray",
        description="Earthquake magnitude from Sentinel-1 pairs: data, training and "
        "hyperparameter search on Ray, tracked in MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"quakeray {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks and debug logs on errors"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own log lines too (always in /tmp/ray/session_latest/logs)",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    _add_data_commands(commands)

    train = commands.add_parser("train", help="train one backbone data-parallel with Ray Train")
    _add_config_args(train)
    train.add_argument("--resume", metavar="PATH", help="checkpoint directory to resume from")
    train.set_defaults(handler=_cmd_train)

    tune = commands.add_parser("tune", help="hyperparameter search with Ray Tune + Optuna")
    _add_config_args(tune)
    tune.add_argument(
        "--resume", metavar="PATH", help="search directory to continue (Tune restore)"
    )
    tune.set_defaults(handler=_cmd_tune)

    evaluate = commands.add_parser(
        "evaluate", help="evaluate a checkpoint or an MLflow run on a data split"
    )
    evaluate.add_argument(
        "target", help="checkpoint or run folder, an MLflow run id, or models:/NAME@ALIAS"
    )
    evaluate.add_argument("--split", choices=["train", "val", "test"], default="test")
    evaluate.add_argument("--data", metavar="FILE", help="data file (default: the run's)")
    evaluate.add_argument("--tracking-uri", help="MLflow tracking URI (default: config/env)")
    evaluate.add_argument("--no-log", action="store_true", help="do not log to the MLflow run")
    evaluate.set_defaults(handler=_cmd_evaluate)

    predict = commands.add_parser(
        "predict", help="estimate magnitudes on new Sentinel-1 GeoTIFF pairs (or a manifest)"
    )
    from quakeray.predict.command import add_predict_arguments

    add_predict_arguments(predict)
    predict.set_defaults(handler=_cmd_predict)

    sync = commands.add_parser(
        "sync", help="complete a training run's MLflow record from its checkpoints"
    )
    sync.add_argument("run_dir", help="the run folder: <run.storage_path>/<run name>")
    sync.set_defaults(handler=_cmd_sync)

    report = commands.add_parser("report", help="paper-style table of a search from MLflow")
    report.add_argument("experiment", help="MLflow experiment name (the search name)")
    report.add_argument("--tracking-uri", help="MLflow tracking URI (default: env / ./mlflow.db)")
    report.add_argument("--format", choices=["text", "markdown", "csv"], default="text")
    report.set_defaults(handler=_cmd_report)
    return parser


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="YAML", help="experiment file")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. loss.margin=0.05"
    )
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        help="tiny data, one short epoch: checks the whole path in about a minute",
    )


def _add_data_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    data = commands.add_parser("data", help="generate, inspect, download QuakeSet files")
    data_commands = data.add_subparsers(title="data commands", metavar="COMMAND")

    synth = data_commands.add_parser("synth", help="write a synthetic QuakeSet-format file")
    synth.add_argument("out", type=Path, help="output HDF5 path")
    synth.add_argument("--events", type=int, default=64, help="number of earthquakes")
    synth.add_argument("--size", type=int, default=64, help="patch side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--force", action="store_true", help="overwrite an existing file")
    synth.set_defaults(handler=_cmd_data_synth)

    inspect = data_commands.add_parser("inspect", help="summarise a QuakeSet-format file")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(handler=_cmd_data_inspect)

    stats = data_commands.add_parser(
        "stats", help="compute per-channel normalisation statistics on the train split"
    )
    stats.add_argument("file", type=Path)
    stats.add_argument("--out", type=Path, help="JSON path (default: FILE.stats.json)")
    stats.set_defaults(handler=_cmd_data_stats)

    scene = data_commands.add_parser(
        "scene", help="write one event's patches as a pre/post GeoTIFF pair (for predict)"
    )
    scene.add_argument("file", type=Path, help="a QuakeSet-format HDF5 file")
    scene.add_argument("out", type=Path, help="folder for pre.tif, post.tif, scene.json")
    scene.add_argument(
        "--event", help="event id (default: the first of --split; all: every event of it)"
    )
    scene.add_argument("--split", choices=["train", "val", "test"], default="test")
    scene.set_defaults(handler=_cmd_data_scene)

    download = data_commands.add_parser("download", help="download the published QuakeSet file")
    download.add_argument("dir", type=Path, nargs="?", default=Path("data"))
    download.add_argument("--url", help="a mirror of the pinned file (default: Hugging Face hub)")
    download.set_defaults(handler=_cmd_data_download)


# --------------------------------------------------------------------------- handlers


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from quakeray.config import load_config

    overrides = list(args.overrides)
    if args.smoke_test:
        overrides = [*SMOKE_TEST_OVERRIDES, *overrides]
    return load_config(args.config, overrides)


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from quakeray.data.synthetic import write_synthetic

    path = write_synthetic(
        args.out, events=args.events, size=args.size, seed=args.seed, overwrite=args.force
    )
    print(f"wrote {path}")
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from quakeray.data.inspect import inspect_file

    report = inspect_file(args.file)
    print(report.to_json() if args.json else report.format())
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from quakeray.data.transforms import compute_stats, default_stats_path

    stats = compute_stats(args.file)
    out = stats.save(args.out or default_stats_path(args.file))
    print(f"wrote {out}: mean {stats.format_mean()} std {stats.format_std()}")
    return 0


def _cmd_data_scene(args: argparse.Namespace) -> int:
    from quakeray.data.scenes import write_scene

    print(write_scene(args.file, args.out, event=args.event, split=args.split).format())
    return 0


def _cmd_data_download(args: argparse.Namespace) -> int:
    from quakeray.data.download import download

    path = download(args.dir, **({"url": args.url} if args.url else {}))
    print(f"QuakeSet ready at {path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)  # before the heavy imports: config errors answer at once
    from quakeray.train import run_training

    run_training(cfg, resume=args.resume)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    cfg = _load(args)  # before the heavy imports: config errors answer at once
    from quakeray.search import run_search

    run_search(cfg, resume=args.resume)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from quakeray.evaluate import evaluate_target

    evaluate_target(
        args.target,
        split=args.split,
        data_path=args.data,
        tracking_uri=args.tracking_uri,
        log=not args.no_log,
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from quakeray.predict.command import run_predict

    return run_predict(args)


def _cmd_sync(args: argparse.Namespace) -> int:
    from quakeray.train.sync import sync_run

    print(sync_run(args.run_dir).format())
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from quakeray.report import print_report

    print_report(args.experiment, tracking_uri=args.tracking_uri, fmt=args.format)
    return 0

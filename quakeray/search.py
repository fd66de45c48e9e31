"""``quakeray tune``: hyperparameter search with Ray Tune, Optuna and ASHA, tracked in MLflow.

One search is one Tune experiment in its own folder (``<run.storage_path>/<name>-<time>``),
one MLflow parent run, and one child run per trial. A trial is a function
(:func:`search_trial`) that builds the trial's config and runs a Ray Train
``TorchTrainer`` built by :func:`quakeray.train.build_trainer`; epoch metrics reach Tune
through Train's ``TuneReportCallback``, where ASHA may stop the trial early and Optuna's
TPE learns from it. The driver does the MLflow side of every trial
(:mod:`quakeray.search_tracking`), so a trial's processes never import MLflow. The
reference points (MSE only, the paper's point) run first.

The search folder holds ``quakeray_search.json`` (config, parent run, data): ``quakeray
tune --resume FOLDER`` continues an interrupted search with ``Tuner.restore`` into the
same parent run, where finished trials are kept, unfinished ones restart (their Train run
resumes from its last checkpoint) and the searcher keeps its state. The folder may be a
URI (``s3://``, ``gs://``, ``file://``): every access to it goes through
:mod:`quakeray.storage`, as Ray's own does through ``pyarrow.fs``.

Example:
    >>> summary = run_search(load_config("experiments/demo.yaml"))  # doctest: +SKIP
    >>> summary.best.params  # doctest: +SKIP
    {'loss.margin': 0.031, 'loss.rank_weight': 0.42}
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from quakeray import storage as fsx
from quakeray.config import (
    ExperimentConfig,
    from_dict,
    get_dotted,
    replace,
    to_dict,
    with_overrides,
)
from quakeray.errors import CheckpointError, SearchError
from quakeray.search_space import (
    REFERENCE_KEY,
    build_searcher,
    check_space,
    describe_sampler,
    grid_size,
    reference_points,
    sample_of,
    trial_config,
)
from quakeray.search_tracking import (
    RUN_KEY,
    TAG_CHECKPOINT,
    TAG_REFERENCE,
    TAG_ROLE,
    TAG_SEARCH,
    TAG_SEARCH_DIR,
    TAG_STATUS,
    TAG_TRIAL,
    TrialRunOpener,
    TrialRunTracker,
    child_runs,
    close_trial_run,
    finish_orphaned_runs,
    pending_runs,
    wait_for_finalizers,
)

if TYPE_CHECKING:
    from mlflow.entities import Run
    from ray.tune import ResultGrid
    from ray.tune.experiment import Trial

log = logging.getLogger(__name__)

STATE_FILE = "quakeray_search.json"
"""Written into the search folder before the first trial: what ``--resume`` needs."""

STATE_VERSION = 2
"""Version 2: the driver does all of the trials' MLflow work (version 1: the trials did)."""

TRAIN_SUBDIR = "train"
"""Train runs of the trials live in ``<search folder>/train/train-<trial id>``."""


# --------------------------------------------------------------------------- results


@dataclass
class TrialRow:
    """One trial as the search reports it (Tune's view joined with its MLflow run)."""

    trial_id: str
    run_id: str
    status: str  # completed | stopped | failed | cancelled | running
    reference: str  # mse_only | paper | "" for sampled trials
    params: dict[str, Any]  # the trial's sampled (or fixed reference) settings
    value: float | None  # last reported value of search.metric
    epochs: int  # epochs reported
    checkpoint: str = ""  # best checkpoint of the trial ("" if none)


@dataclass
class SearchSummary:
    """What ``quakeray tune`` produced."""

    name: str
    search_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metric: str
    mode: str
    rows: list[TrialRow]
    best: TrialRow | None
    best_checkpoint: str | None
    test_metrics: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0

    def counts(self) -> dict[str, int]:
        """Trials per final status."""
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.status] = out.get(row.status, 0) + 1
        return out

    def format(self, top_k: int = 5) -> str:
        """The end-of-search summary: top-k table, best trial, where everything is."""
        from quakeray.train import mlflow_ui_command

        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts().items()))
        lines = [
            f"search {self.name} finished in {self.wall_s:.0f} s: {len(self.rows)} trials "
            f"({counts})",
            "",
            format_table(rank_rows(self.rows, self.mode)[:top_k], metric=self.metric),
            "",
        ]
        if self.best is not None:
            lines.append(
                f"best trial       {self.best.trial_id} ({self.metric} {self.best.value:.4f})"
            )
            lines.append(f"best config      {_params_text(self.best.params)}")
            lines.append(f"best checkpoint  {self.best_checkpoint}")
        for key, value in self.test_metrics.items():
            if key in ("test_MAE", "test_RMSE", "test_spearman", "test_rank_acc"):
                lines.append(f"{key:<16} {value:.4f}")
        lines.append(f"search folder    {self.search_dir}")
        lines.append(f"MLflow           parent run {self.parent_run_id} in {self.tracking_uri}")
        lines.append(f"browse with      {mlflow_ui_command(self.tracking_uri)}")
        return "\n".join(lines)


def rank_rows(rows: Sequence[TrialRow], mode: str) -> list[TrialRow]:
    """Rows best first; trials without a value last, in start order."""
    sign = 1.0 if mode == "min" else -1.0
    scored = [r for r in rows if r.value is not None and math.isfinite(r.value)]
    rest = [r for r in rows if r not in scored]
    return sorted(scored, key=lambda r: sign * float(r.value or 0.0)) + rest


def format_table(rows: Sequence[TrialRow], *, metric: str) -> str:
    """Aligned text table of trials (id, status, metric, epochs, settings)."""
    keys = sorted({k for r in rows for k in r.params})
    header = ["trial", "status", metric, "epochs", *keys]
    body = [
        [
            r.trial_id + (f" ({r.reference})" if r.reference else ""),
            r.status,
            "-" if r.value is None else f"{r.value:.4f}",
            str(r.epochs),
            *[_short(r.params.get(k, "")) for k in keys],
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
    out = [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True))
        for line in [header, *body]
    ]
    return "\n".join(line.rstrip() for line in out)


def rows_csv(rows: Sequence[TrialRow], *, metric: str) -> str:
    """The results table as CSV (one line per trial, settings as columns)."""
    keys = sorted({k for r in rows for k in r.params})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["trial_id", "run_id", "status", "reference", metric, "epochs", "checkpoint", *keys]
    )
    for r in rows:
        writer.writerow(
            [
                r.trial_id,
                r.run_id,
                r.status,
                r.reference,
                "" if r.value is None else r.value,
                r.epochs,
                r.checkpoint,
                *[r.params.get(k, "") for k in keys],
            ]
        )
    return buf.getvalue()


# --------------------------------------------------------------------------- scheduler


class EpochASHA(AsyncHyperBandScheduler):  # type: ignore[misc]
    """ASHA whose time is epochs completed, and which never cuts a trial's last epoch.

    - Time is ``epoch + 1`` from the reported metrics rather than Tune's
      ``training_iteration``: a trial restarted after ``--resume`` continues its Train run
      mid-way while Tune's iteration count starts again at 1.
    - Plain ASHA answers STOP to every result at ``max_t``. For a trial on its last epoch
      that changes nothing about the search but kills the trial before it logs its model
      and closes its MLflow run, so such a result gets CONTINUE (the trial ends by itself).
    - The reference points (MSE only, the paper's point) are never stopped: they are the
      baselines every trial is compared with, which only means something at full length.
      Their results still set the rungs' cut-offs for the other trials.
    """

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        """ASHA's decision on epochs completed; never STOP at the last epoch or a reference."""
        result = _with_epoch_time(result, self._time_attr)
        at_end = result.get(self._time_attr, 0) >= self._max_t
        decision: str = super().on_trial_result(tune_controller, trial, result)
        exempt = at_end or bool((getattr(trial, "config", None) or {}).get(REFERENCE_KEY))
        return TrialScheduler.CONTINUE if exempt else decision

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        """Record the final result on epochs completed."""
        super().on_trial_complete(tune_controller, trial, _with_epoch_time(result, self._time_attr))


def _with_epoch_time(result: dict[str, Any], time_attr: str) -> dict[str, Any]:
    if "epoch" not in result:
        return result
    return {**result, time_attr: int(result["epoch"]) + 1}


def build_scheduler(cfg: ExperimentConfig) -> EpochASHA | None:
    """ASHA over epochs (``max_t`` = the most epochs a trial can run), or None."""
    s = cfg.search
    if not s.asha:
        return None
    max_t = _max_epochs(cfg)
    return EpochASHA(
        time_attr="training_iteration",
        max_t=max_t,
        grace_period=min(s.grace_period, max_t),
        reduction_factor=s.reduction_factor,
    )


def describe_scheduler(cfg: ExperimentConfig) -> str:
    """One-line description of the scheduler, for the parent run's params."""
    s = cfg.search
    if not s.asha:
        return "none (every trial runs all its epochs)"
    return (
        f"ASHA(time=epochs, max_t={_max_epochs(cfg)}, grace_period={s.grace_period}, "
        f"reduction_factor={s.reduction_factor}, metric={s.metric}, mode={s.mode})"
    )


def _max_epochs(cfg: ExperimentConfig) -> int:
    param = cfg.search.space.get("optim.epochs")
    if param is None:
        return cfg.optim.epochs
    if param.kind == "choice":
        return max(int(c) for c in param.choices or [cfg.optim.epochs])
    return int(param.high or cfg.optim.epochs)


# --------------------------------------------------------------------------- the trial


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs besides its sample; shipped once through the object store."""

    base: dict[str, Any]  # the search's resolved config (to_dict)
    tracking_uri: str  # for the checkpoints (and the test metrics with test_trials)
    data_path: str
    stats_path: str | None
    train_storage: str  # Train runs go to <train_storage>/train-<trial id>
    test_trials: bool


def search_trial(config: dict[str, Any], *, setup: TrialSetup) -> None:
    """One Tune trial: its config, then a ``TorchTrainer`` fit (and a test evaluation).

    MLflow is the driver's job (:mod:`quakeray.search_tracking`): the run was opened when
    the trial was suggested, its id is in ``config``, and the driver logs each epoch and
    closes the run. A failure (bad config, OOM, a worker error) raises, so Tune records
    the trial as errored, the driver closes its run FAILED and the search goes on.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from quakeray import train

    trial_id = tune.get_context().get_trial_id()
    run_id = str(config[RUN_KEY])
    sample = sample_of(config)
    cfg = trial_config(setup.base, config)
    data = train.PreparedData(setup.data_path, setup.stats_path)
    if any(k.startswith(("model.", "data.")) for k in sample):
        # A backbone the sample names but timm lacks fails here in a second, not in a
        # worker group that took 20 s to start. Only then: the driver checked the base
        # model, and a cold timm import costs this trial process ~2 s.
        train.check_model(cfg, data)
    name = f"train-{trial_id}"
    trainer = train.build_trainer(
        cfg,
        data=data,
        name=name,
        storage_path=setup.train_storage,
        tracking_uri=setup.tracking_uri,
        mlflow_run_id=run_id,
        log_metrics=False,  # the driver logs what Tune receives
        callbacks=[TuneReportCallback()],  # type: ignore[no-untyped-call]
    )
    result = trainer.fit()
    run_dir = f"{setup.train_storage.rstrip('/')}/{name}"
    best = train.best_checkpoint_path(result, run_dir=run_dir)
    if best is None:
        raise CheckpointError(f"trial {trial_id} wrote no checkpoint under {run_dir}")
    if setup.test_trials:
        from quakeray.evaluate import evaluate_checkpoint
        from quakeray.tracking import RunLogger

        evaluated = evaluate_checkpoint(best, split="test", data_path=setup.data_path)
        last_epoch = int((result.metrics or {}).get("epoch", 0))
        RunLogger(setup.tracking_uri, run_id).log_metrics(evaluated.metrics, step=last_epoch)


# --------------------------------------------------------------------------- the search


def run_search(
    cfg: ExperimentConfig, resume: str | None = None, *, callbacks: Sequence[Any] = ()
) -> SearchSummary:
    """``quakeray tune``: check, start or resume the search, summarise, log, evaluate.

    Args:
        cfg: The resolved config (ignored with ``resume``: the search's own is used).
        resume: A search folder to continue (``Tuner.restore``).
        callbacks: Extra Tune callbacks (driver side) for a new search, run after
            quakeray's own; a resumed search runs the ones it was started with.

    Returns:
        The summary (also printed).

    Raises:
        SearchError: Bad space or settings, a resume folder without a search, or every
            trial failed.
        KeyboardInterrupt: Ctrl-C; the search folder is resumable (the command is printed).
    """
    from ray import tune

    from quakeray import tracking, train
    from quakeray.runtime import check_resources, init_ray, local_num_cpus, ray_address

    t0 = time.monotonic()
    state: dict[str, Any] | None = None
    if resume:
        search_dir, state = load_search_state(resume)
        cfg = from_dict(state["config"], source=fsx.join(search_dir, STATE_FILE))
        print(f"resuming search {cfg.search.name} in {search_dir}", flush=True)
    else:
        # The search's MLflow experiment is its name; the trials' params say so too.
        cfg = replace(cfg, tracking=replace(cfg.tracking, experiment=cfg.search.name))
        print("resolved config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
    check_space(cfg)
    check_metric(cfg)
    s = cfg.search

    uri = state["tracking_uri"] if state else tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_tracking(uri)
    storage = train.resolve_storage_path(cfg.run.storage_path)
    data = (
        train.PreparedData(state["data_path"], state.get("stats_path"))
        if state
        else train.prepare_data(cfg)
    )
    train.check_model(cfg, data)

    n_trials = _num_trials(cfg)
    concurrent = max(1, min(s.max_concurrent, n_trials))
    ray_cfg = cfg
    if not ray_address(cfg) and not cfg.run.num_cpus:
        cpus = local_num_cpus(cfg, extra_cpus=s.trial_cpus, concurrent=concurrent)
        ray_cfg = replace(cfg, run=replace(cfg.run, num_cpus=cpus))
    init_ray(ray_cfg, extra_cpus=s.trial_cpus)
    check_resources(cfg, concurrent=concurrent, extra_cpus=s.trial_cpus)
    train._preflight(cfg, data=data, tracking_uri=uri, storage_path=storage)

    client = tracking.mlflow_client(uri)
    searcher = None
    if state is None:
        # Everything that can refuse the search runs before its folder and parent run exist.
        search_dir = _new_search_dir(storage, s.name)
        study = s.study_name or fsx.name(search_dir)
        try:
            searcher = build_searcher(cfg, study_name=study, fresh=True)
        except BaseException:
            fsx.remove_empty_dir(search_dir)
            raise
        experiment_id = tracking.get_or_create_experiment(uri, s.name)
        parent = tracking.start_run(
            uri,
            experiment_id,
            run_name=fsx.name(search_dir),
            tags={TAG_ROLE: "search", TAG_SEARCH: s.name, TAG_SEARCH_DIR: search_dir},
        )
        state = {
            "version": STATE_VERSION,
            "config": to_dict(cfg),
            "tracking_uri": uri,
            "experiment_id": experiment_id,
            "parent_run_id": parent,
            "data_path": data.path,
            "stats_path": data.stats_path,
            "study_name": study,
        }
        _write_state(search_dir, state)
        _log_search_params(uri, parent, cfg, search_dir=search_dir, study=study, n_trials=n_trials)
        searcher = TrialRunOpener(
            searcher,
            uri=uri,
            experiment_id=experiment_id,
            parent_run_id=parent,
            search_name=s.name,
            base=to_dict(cfg),
        )
    else:
        experiment_id, parent = state["experiment_id"], state["parent_run_id"]
        client.update_run(parent, status="RUNNING")
    print(f"search folder {search_dir}; MLflow parent run {parent} in {uri}", flush=True)

    setup = TrialSetup(
        base=to_dict(cfg),
        tracking_uri=uri,
        data_path=data.path,
        stats_path=data.stats_path,
        train_storage=fsx.join(search_dir, TRAIN_SUBDIR),
        test_trials=s.test_trials,
    )
    trainable = tune.with_resources(
        tune.with_parameters(search_trial, setup=setup), {"cpu": s.trial_cpus}
    )
    if resume:
        tuner = tune.Tuner.restore(
            search_dir,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=build_scheduler(cfg),
                metric=s.metric,
                mode=s.mode,
                num_samples=n_trials,
            ),
            run_config=tune.RunConfig(
                name=fsx.name(search_dir),
                storage_path=fsx.parent(search_dir),
                callbacks=[
                    TrialRunTracker(
                        uri,
                        experiment_id,
                        parent,
                        base=setup.base,
                        metric_names=train.METRIC_NAMES,
                        score_metric=train.SCORE_METRIC,
                        train_storage=setup.train_storage,
                    ),
                    *callbacks,
                ],
                # Trials do not retry at Tune level: Train restarts failed workers itself.
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    handler = signal.getsignal(signal.SIGINT)
    try:
        try:
            results = tuner.fit()
        finally:
            # Ended trials' runs are closed before anything reads runs or closes the rest.
            wait_for_finalizers()
        interrupted = _tune_was_interrupted()
    except BaseException as exc:
        # Trials still open were cut off with the driver: cancelled, resumable.
        _close_open_children(uri, experiment_id, parent)
        stopped_by_user = isinstance(exc, KeyboardInterrupt)
        tracking.end_run(uri, parent, "KILLED" if stopped_by_user else "FAILED")
        if stopped_by_user:
            print(f"interrupted; continue with: quakeray tune --resume {search_dir}", flush=True)
        raise
    finally:
        # Tune leaves its own SIGINT handler behind, which would swallow a later Ctrl-C.
        _restore_sigint(handler)
    if interrupted:
        _close_open_children(uri, experiment_id, parent)
        tracking.end_run(uri, parent, "KILLED")
        print(f"interrupted; continue with: quakeray tune --resume {search_dir}", flush=True)
        raise KeyboardInterrupt
    try:
        summary = _finish(
            cfg,
            results,
            search_dir=search_dir,
            uri=uri,
            experiment_id=experiment_id,
            parent=parent,
            data_path=data.path,
        )
    except BaseException as exc:
        tracking.end_run(uri, parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracking.end_run(uri, parent, "FINISHED")
    summary.wall_s = time.monotonic() - t0
    print(summary.format(top_k=s.top_k), flush=True)
    return summary


def check_metric(cfg: ExperimentConfig) -> None:
    """``search.metric`` must be one the trials report (else Tune fails every trial).

    Raises:
        SearchError: Unknown metric, with a did-you-mean.
    """
    import difflib

    from quakeray.train import METRIC_NAMES

    if cfg.search.metric in METRIC_NAMES:
        return
    lower = {name.lower(): name for name in METRIC_NAMES}
    close = difflib.get_close_matches(cfg.search.metric.lower(), list(lower), n=1)
    hint = (
        f"; did you mean '{lower[close[0]]}'?"
        if close
        else f"; use one of {', '.join(METRIC_NAMES)}"
    )
    raise SearchError(f"search.metric {cfg.search.metric!r} is not reported by trials{hint}")


def load_search_state(path: str) -> tuple[str, dict[str, Any]]:
    """The search folder (absolute, or the URI as given) and its state file, checked.

    Raises:
        SearchError: The folder does not exist, holds no quakeray search, Tune's
            experiment state is missing, or another quakeray version started the search.
    """
    from ray.tune import Tuner

    folder = fsx.resolve(path)
    hint = "pass the search folder printed when the search started (ray_results/<name>-<time>)"
    try:
        found = fsx.is_dir(folder)
    except (OSError, ValueError) as exc:  # bad URI, unknown scheme, no credentials
        raise SearchError(f"--resume {path}: cannot open ({exc}); {hint}") from None
    if not found:
        raise SearchError(f"--resume {path}: no such folder; {hint}")
    state_file = fsx.join(folder, STATE_FILE)
    if not fsx.is_file(state_file) or not Tuner.can_restore(folder):
        raise SearchError(
            f"--resume {path}: holds no search ({STATE_FILE} or Tune state missing); {hint}"
        )
    try:
        state = json.loads(fsx.read_text(state_file))
        for key in ("config", "tracking_uri", "experiment_id", "parent_run_id", "data_path"):
            state[key]
    except (ValueError, KeyError, TypeError):
        raise SearchError(f"--resume {path}: {STATE_FILE} is damaged; start a new search") from None
    if state.get("version") != STATE_VERSION:
        raise SearchError(
            f"--resume {path}: the search was started by another quakeray version (state "
            f"version {state.get('version')}, this one reads {STATE_VERSION}); resume it with "
            "that version, or start a new search"
        )
    return folder, state


# --------------------------------------------------------------------------- helpers


def _num_trials(cfg: ExperimentConfig) -> int:
    """Trials to run: ``num_samples``, capped by the grid size for a grid search."""
    s = cfg.search
    if s.sampler != "grid":
        return s.num_samples
    available = grid_size(s.space) + len(reference_points(cfg))
    if s.num_samples > available:
        log.warning(
            "grid holds %d points; running %d trials, not %d", available, available, s.num_samples
        )
    return min(s.num_samples, available)


def _new_search_dir(storage: str, name: str) -> str:
    """A new folder ``<storage>/<name>-<time>[-n]``: a local path or a URI (s3://, ...)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{name}-{stamp}"
    try:
        folder, n = fsx.join(storage, base), 1
        while fsx.exists(folder):
            n += 1
            folder = fsx.join(storage, f"{base}-{n}")
        fsx.makedirs(folder)
    except (OSError, ValueError) as exc:  # unknown scheme, no credentials, read-only
        raise SearchError(
            f"run.storage_path {storage}: cannot create the search folder ({exc}); "
            "set run.storage_path to a writable path or s3://BUCKET/PREFIX"
        ) from None
    return folder


def _write_state(search_dir: str, state: Mapping[str, Any]) -> None:
    fsx.write_text_atomic(fsx.join(search_dir, STATE_FILE), json.dumps(state, indent=1))


def _log_search_params(
    uri: str, parent: str, cfg: ExperimentConfig, *, search_dir: str, study: str, n_trials: int
) -> None:
    from quakeray.tracking import RunLogger, log_config

    log_config(uri, parent, cfg)
    RunLogger(uri, parent).log_params(
        {
            "tune.sampler": describe_sampler(cfg),
            "tune.scheduler": describe_scheduler(cfg),
            "tune.trials": n_trials,
            "tune.reference_points": ", ".join(p.name for p in reference_points(cfg)) or "none",
            "tune.search_dir": search_dir,
            "optuna.study_name": study,
            "optuna.storage": cfg.search.optuna_storage or "memory",
        }
    )


def _tune_was_interrupted() -> bool:
    """Whether ``Tuner.fit`` returned because of Ctrl-C (SIGINT) or SIGUSR1.

    Tune reports an interruption only in a log line, and its returned trials all look
    TERMINATED (it stops live trials on the way out). But its signal handler, installed
    for the duration of ``fit`` on the main thread, puts the previous handler back when
    the signal arrives, and stays installed otherwise.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    if int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")):
        return False
    current = signal.getsignal(signal.SIGINT)
    return getattr(current, "__name__", "") != "signal_interrupt_tune_run"


def _restore_sigint(handler: Any) -> None:
    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGINT, handler)


def _close_open_children(uri: str, experiment_id: str, parent: str) -> None:
    """Close the runs still RUNNING as ``cancelled``, but for those being finalised."""
    finalising = pending_runs()  # a second Ctrl-C cut the wait for them short
    for run in child_runs(uri, experiment_id, parent):
        if run.info.status == "RUNNING" and run.info.run_id not in finalising:
            close_trial_run(uri, run.info.run_id, "cancelled")


def _finish(
    cfg: ExperimentConfig,
    results: ResultGrid,
    *,
    search_dir: str,
    uri: str,
    experiment_id: str,
    parent: str,
    data_path: str,
) -> SearchSummary:
    """Collect rows, pick the best trial, log everything to the parent, evaluate on test."""
    from quakeray.checkpoint import best_checkpoint
    from quakeray.search_figures import history_figure, margin_weight_figure
    from quakeray.tracking import RunLogger

    s = cfg.search
    finish_orphaned_runs(
        uri,
        experiment_id,
        parent,
        results,
        base=to_dict(cfg),
        train_storage=fsx.join(search_dir, TRAIN_SUBDIR),
    )
    _close_open_children(uri, experiment_id, parent)  # nobody stays RUNNING, whatever happened
    shown = [*s.space, *(k for p in reference_points(cfg) for k in p.values)]
    base_values = {k: get_dotted(cfg, k) for k in shown}
    rows = collect_rows(
        results, child_runs(uri, experiment_id, parent), metric=s.metric, base_values=base_values
    )
    logger = RunLogger(uri, parent)
    logger.log_text(rows_csv(rows, metric=s.metric), "results.csv")
    logger.log_figure(
        history_figure(rows, metric=s.metric, mode=s.mode), "plots/optimisation_history.png"
    )
    surface = margin_weight_figure(rows, metric=s.metric)
    if surface is not None:
        logger.log_figure(surface, f"plots/{s.metric}_margin_weight.png")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    logger.log_metrics(
        {f"trials_{k}": v for k, v in counts.items()}
        | {"trial_epochs": sum(r.epochs for r in rows)},
        step=0,
    )

    best = _best_row(results, rows, s.metric, s.mode)
    summary = SearchSummary(
        name=s.name,
        search_dir=search_dir,
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id=parent,
        metric=s.metric,
        mode=s.mode,
        rows=rows,
        best=best,
        best_checkpoint=None,
    )
    if best is None:
        errors = [r.error for r in _results(results) if r.error is not None]
        first = (
            str(errors[0]).strip().splitlines()[-1][:200]
            if errors
            else "no trial reported a metric"
        )
        raise SearchError(f"all {len(rows)} trials failed ({first}); see {search_dir}")
    run_dir = fsx.join(search_dir, TRAIN_SUBDIR, f"train-{best.trial_id}")
    # Scanning for checkpoints is local-only; on a URI the trial's tag is the answer.
    local_best = None if fsx.is_remote(run_dir) else best_checkpoint(run_dir)
    ckpt = best.checkpoint or str(local_best or "")
    summary.best_checkpoint = ckpt or None
    best_cfg = with_overrides(cfg, best.params)
    logger.log_metrics({f"best_{s.metric}": float(best.value or math.nan)}, step=0)
    logger.set_tags(
        {
            "quakeray.best_trial_id": best.trial_id,
            "quakeray.best_run_id": best.run_id,
            TAG_CHECKPOINT: ckpt,
        }
        | {f"best.{k}": v for k, v in best.params.items()}
    )
    logger.log_text(yaml.safe_dump(to_dict(best_cfg), sort_keys=False), "best_config.yaml")
    if s.evaluate_best and ckpt:
        from quakeray.evaluate import evaluate_checkpoint

        evaluated = evaluate_checkpoint(ckpt, split="test", data_path=data_path)
        summary.test_metrics = dict(evaluated.metrics)
        logger.log_metrics(summary.test_metrics, step=0)
    return summary


def collect_rows(
    results: ResultGrid,
    runs: Sequence[Run],
    *,
    metric: str,
    base_values: Mapping[str, Any] | None = None,
) -> list[TrialRow]:
    """One row per child run (start order), with Tune's last result where there is one.

    ``params`` holds each trial's effective value of every searched field: its sample,
    else ``base_values`` (a reference point fixes only some fields).
    """
    by_trial: dict[str, Any] = {}
    for r in _results(results):
        tid = (r.metrics or {}).get("trial_id")
        if tid:
            by_trial[str(tid)] = r
    rows = []
    for run in runs:
        tags = run.data.tags
        tid = tags.get(TAG_TRIAL, "")
        res = by_trial.get(tid)
        if res is not None:
            params = sample_of(res.config)
            value = res.metrics.get(metric)
            epochs = int(res.metrics["epoch"]) + 1 if "epoch" in res.metrics else 0
        else:
            params = {
                k[len("trial.") :]: _parse(v)
                for k, v in run.data.params.items()
                if k.startswith("trial.")
            }
            value = run.data.metrics.get(metric)
            epochs = 0
        params = {**(base_values or {}), **params}
        rows.append(
            TrialRow(
                trial_id=tid,
                run_id=run.info.run_id,
                status=tags.get(TAG_STATUS, "running"),
                reference=tags.get(TAG_REFERENCE, ""),
                params=params,
                value=float(value) if value is not None else None,
                epochs=epochs,
                checkpoint=tags.get(TAG_CHECKPOINT, ""),
            )
        )
    return rows


def _best_row(
    results: ResultGrid, rows: Sequence[TrialRow], metric: str, mode: str
) -> TrialRow | None:
    """The row of Tune's best result (last reported value), or None if none reported."""
    try:
        best = results.get_best_result(metric=metric, mode=mode, filter_nan_and_inf=True)
    except RuntimeError:
        return None
    tid = str((best.metrics or {}).get("trial_id", ""))
    return next((r for r in rows if r.trial_id == tid), None)


def _results(results: ResultGrid) -> list[Any]:
    """The grid's results as a list (ResultGrid is indexable, not typed as iterable)."""
    return [results[i] for i in range(len(results))]


def _parse(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in sorted(params.items())) or "(base config)"


__all__ = [
    "STATE_FILE",
    "EpochASHA",
    "SearchSummary",
    "TrialRow",
    "TrialSetup",
    "build_scheduler",
    "collect_rows",
    "format_table",
    "load_search_state",
    "rank_rows",
    "rows_csv",
    "run_search",
    "search_trial",
]

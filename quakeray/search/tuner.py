"""The Tune side of a search: its trainable, its tuners, and a fit that Ctrl-C leaves resumable.

Shared by the search itself (:mod:`.command`) and its seed confirmation
(:mod:`.confirm`), each one Tune experiment: the search's in its folder, the
confirmation's in ``<folder>/confirm``.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quakeray import storage, tracking
from quakeray.config import ExperimentConfig
from quakeray.data.prepare import PreparedData
from quakeray.metrics import EPOCH_METRICS
from quakeray.search.console import EpochLines
from quakeray.search.finalizer import wait_for_finalizers
from quakeray.search.runs import close_open_children
from quakeray.search.state import TRAIN_SUBDIR
from quakeray.search.tracker import TrialRunOpener, TrialRunTracker
from quakeray.search.trial import TrialSetup, in_process, search_trial, trial_resources

if TYPE_CHECKING:
    from ray.tune import ResultGrid, Tuner
    from ray.tune.schedulers import TrialScheduler

__all__ = ["Search", "fit", "new_tuner", "restored_tuner"]


@dataclass(frozen=True)
class Search:
    """Where one search lives: its config, folder, MLflow parent run and data."""

    cfg: ExperimentConfig
    folder: str
    uri: str
    experiment_id: str
    parent: str
    data: PreparedData


def trainable(search: Search, *, test_trials: bool) -> Any:
    """``search_trial`` with the search's setup and the trial's CPU reservation."""
    from ray import tune

    setup = TrialSetup(
        base=search.cfg,
        tracking_uri=search.uri,
        data=search.data,
        train_storage=storage.join(search.folder, TRAIN_SUBDIR),
        test_trials=test_trials,
    )
    return tune.with_resources(
        tune.with_parameters(search_trial, setup=setup), trial_resources(search.cfg)
    )


def new_tuner(
    search: Search,
    searcher: Any,
    *,
    folder: str,
    num_samples: int,
    test_trials: bool,
    scheduler: TrialScheduler | None = None,
    callbacks: Sequence[Any] = (),
) -> Tuner:
    """A Tune experiment in ``folder`` whose trials log into child runs of the search.

    ``searcher`` is wrapped in the :class:`TrialRunOpener` that opens each trial's run.
    """
    from ray import tune

    s = search.cfg.search
    opener = TrialRunOpener(
        searcher,
        uri=search.uri,
        experiment_id=search.experiment_id,
        parent_run_id=search.parent,
        search_name=s.name,
        base=search.cfg,
        data_path=search.data.path,
    )
    tracker = TrialRunTracker(
        search.uri,
        search.experiment_id,
        search.parent,
        base=search.cfg,
        metric_names=EPOCH_METRICS,
        train_storage=storage.join(search.folder, TRAIN_SUBDIR),
    )
    return tune.Tuner(
        trainable(search, test_trials=test_trials),
        tune_config=tune.TuneConfig(
            search_alg=opener,
            scheduler=scheduler,
            metric=s.metric,
            mode=s.mode,
            num_samples=num_samples,
            # A trial that trains in its own process leaves it warm for the next one
            # (torch, timm and the open data file): most of what a trial start costs.
            reuse_actors=in_process(search.cfg),
        ),
        run_config=tune.RunConfig(
            name=storage.name(folder),
            storage_path=storage.parent(folder),
            callbacks=[tracker, EpochLines(search.cfg), *callbacks],
            # Trials do not retry at Tune level: Train restarts a failed worker group
            # itself (scaling.max_failures); a trial that trains in its own process and
            # dies (killed, out of memory) is recorded failed and the search goes on.
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def restored_tuner(search: Search, *, folder: str, test_trials: bool) -> Tuner:
    """The Tune experiment in ``folder``, restored: unfinished trials restart."""
    from ray import tune

    return tune.Tuner.restore(
        folder,
        trainable(search, test_trials=test_trials),
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=False,
    )


def fit(tuner: Tuner, search: Search) -> ResultGrid:
    """``tuner.fit()``; an interrupted search closes its open runs and says how to resume.

    Raises:
        KeyboardInterrupt: Ctrl-C (or SIGTERM), during the fit or caught by Tune.
    """
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
        _stop(search, by_user=isinstance(exc, KeyboardInterrupt))
        raise
    finally:
        # Tune leaves its own SIGINT handler behind, which would swallow a later Ctrl-C.
        _restore_sigint(handler)
    if interrupted:
        _stop(search, by_user=True)
        raise KeyboardInterrupt
    return results


def _stop(search: Search, *, by_user: bool) -> None:
    close_open_children(search.uri, search.experiment_id, search.parent)
    tracking.end_run(search.uri, search.parent, "KILLED" if by_user else "FAILED")
    if by_user:
        print(f"interrupted; continue with: quakeray tune --resume {search.folder}", flush=True)


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

"""The Tune side of a search: its tuners, and a fit that Ctrl-C leaves resumable.

Shared by the search itself (:mod:`.command`) and its seed check (:mod:`.confirm`), each
one Tune experiment: the search's in its folder, the seed check's in
``<folder>/confirm``. A :class:`SearchTuner` is Tune's ``Tuner`` with the two parts of
quakeray's that the driver talks to while it runs: the run opener (the outermost
searcher) and the run tracker (a Tune callback).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quakeray import tracking
from quakeray.compat import (
    restored_callbacks,
    restored_scheduler,
    restored_search_alg,
    tune_was_interrupted,
)
from quakeray.config import ExperimentConfig
from quakeray.data.prepare import PreparedData
from quakeray.errors import SearchError
from quakeray.metrics import EPOCH_METRICS
from quakeray.search.console import EpochLines
from quakeray.search.layout import SearchRef
from quakeray.search.runs import close_open_children
from quakeray.search.scheduler import EpochASHA
from quakeray.search.tracker import TrialRunOpener, TrialRunTracker
from quakeray.search.trainable import TrialSetup, in_process, trainable
from quakeray.search.writer import WriterHandle, start_writer

if TYPE_CHECKING:
    from ray.tune import ResultGrid, Tuner
    from ray.tune.schedulers import TrialScheduler

__all__ = ["Search", "SearchTuner", "fit", "new_tuner", "restored_tuner"]


@dataclass(frozen=True)
class Search:
    """One search as the driver runs it: its config, where it lives, its data."""

    cfg: ExperimentConfig
    ref: SearchRef
    data: PreparedData

    def setup(self, *, test_trials: bool) -> TrialSetup:
        """What each trial of this search is shipped besides its config."""
        return TrialSetup(base=self.cfg, ref=self.ref, data=self.data, test_trials=test_trials)


@dataclass(frozen=True)
class SearchTuner:
    """A Tune experiment of a search, with its run opener, run tracker and their writer."""

    tuner: Tuner
    opener: TrialRunOpener  # opens each trial's run; continues what a killed driver left
    tracker: TrialRunTracker  # passes each epoch on; has the runs of ended trials closed
    writer: WriterHandle  # writes the trials' runs (beside the driver's loop)

    def rebuild_rungs(self, histories: dict[str, list[dict[str, float]]]) -> None:
        """Hand a restored experiment's ASHA the epochs of its ended trials (no ASHA: none)."""
        scheduler = restored_scheduler(self.tuner)
        if isinstance(scheduler, EpochASHA):
            scheduler.rebuild_rungs(histories)

    @classmethod
    def of(
        cls, search: Search, tuner: Tuner, opener: TrialRunOpener, tracker: TrialRunTracker
    ) -> SearchTuner:
        """The tuner with a writer of this driver's handed to its opener and tracker."""
        writer = start_writer(search.ref, search.cfg, EPOCH_METRICS, search.data.path)
        opener.writer = writer
        tracker.attach(writer)
        return cls(tuner, opener, tracker, writer)


def new_tuner(
    search: Search,
    searcher: Any,
    *,
    folder: str,
    num_samples: int,
    test_trials: bool,
    scheduler: TrialScheduler | None = None,
    callbacks: Sequence[Any] = (),
) -> SearchTuner:
    """A Tune experiment in ``folder`` whose trials log into child runs of the search.

    ``searcher`` is wrapped in the :class:`TrialRunOpener` that opens each trial's run.
    """
    from ray import tune

    from quakeray import storage

    s = search.cfg.search
    opener = TrialRunOpener(searcher, ref=search.ref, base=search.cfg, data_path=search.data.path)
    tracker = TrialRunTracker(search.ref, base=search.cfg, metric_names=EPOCH_METRICS)
    tuner = tune.Tuner(
        trainable(search.setup(test_trials=test_trials)),
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
    return SearchTuner.of(search, tuner, opener, tracker)


def restored_tuner(search: Search, *, folder: str, test_trials: bool) -> SearchTuner:
    """The Tune experiment in ``folder``, restored: unfinished trials restart.

    Args:
        search: The search.
        folder: The Tune experiment (the search's folder, or its seed check's).
        test_trials: Score each trial's best checkpoint on test.
    """
    from ray import tune

    tuner = tune.Tuner.restore(
        folder,
        trainable(search.setup(test_trials=test_trials)),
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=False,
    )
    callbacks = restored_callbacks(tuner)
    tracker = next((c for c in callbacks if isinstance(c, TrialRunTracker)), None)
    opener = _restored_opener(tuner)
    if tracker is None or opener is None:
        raise SearchError(f"--resume {folder}: Tune's saved experiment holds no quakeray search")
    return SearchTuner.of(search, tuner, opener, tracker)


def _restored_opener(tuner: Tuner) -> TrialRunOpener | None:
    found = restored_search_alg(tuner)
    return found if isinstance(found, TrialRunOpener) else None


def fit(search_tuner: SearchTuner, search: Search) -> ResultGrid:
    """``tuner.fit()``; an interrupted search closes its open runs and says how to resume.

    Raises:
        KeyboardInterrupt: Ctrl-C (or SIGTERM), during the fit or caught by Tune.
    """
    handler = signal.getsignal(signal.SIGINT)
    writer = search_tuner.writer
    try:
        try:
            results = search_tuner.tuner.fit()
        finally:
            # Ended trials' runs are closed before anything reads runs or closes the rest.
            writer.wait()
        interrupted = tune_was_interrupted()
    except BaseException as exc:
        # Trials still open were cut off with the driver: cancelled, resumable. Those the
        # writer still finalises (a second Ctrl-C cut the wait short) are left to it.
        _stop(search, by_user=isinstance(exc, KeyboardInterrupt), finalising=writer.pending())
        raise
    finally:
        # Tune leaves its own SIGINT handler behind, which would swallow a later Ctrl-C.
        _restore_sigint(handler)
    if interrupted:
        _stop(search, by_user=True, finalising=writer.pending())
        raise KeyboardInterrupt
    writer.release()
    return results


def _stop(search: Search, *, by_user: bool, finalising: frozenset[str]) -> None:
    close_open_children(search.ref, finalising=finalising)
    tracking.end_run(search.ref.uri, search.ref.parent_run_id, "KILLED" if by_user else "FAILED")
    if by_user:
        print(f"interrupted; continue with: quakeray tune --resume {search.ref.folder}", flush=True)


def _restore_sigint(handler: Any) -> None:
    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGINT, handler)

"""MLflow runs of a search: one parent run, one child run per trial, none left RUNNING.

The driver does all of a search's MLflow work; trials and their Train workers do none.
This keeps MLflow (1.5 s of imports and store set-up in a fresh process) off every
trial's critical path, and gives the tracking store a single writer per search:

- the driver opens and closes the **parent** run (reopened on ``--resume``);
- :class:`TrialRunOpener`, the outermost searcher, opens a trial's **child** run when it
  suggests the trial, logs its sample and config, and hands the run id to the trial in
  its config (:data:`RUN_KEY`), so the trial's checkpoints name their run;
- :class:`TrialRunTracker`, a Tune callback, logs every result's epoch metrics into the
  child run (a point in MLflow means its checkpoint is persisted: Tune only sees reports
  Train has checkpointed), reopens the run of a restarted trial (no duplicates), and
  closes it: completed trials and those stopped early by ASHA first get their best
  checkpoint's predictions, figures and ``best_*`` metrics
  (:func:`quakeray.train.finalize_run`), then end ``completed`` or ``stopped``; failed
  trials end ``failed`` with their error. The finalisation runs in a background thread
  (seconds with model logging), so Tune's loop starts the next trial meanwhile;
  :func:`wait_for_finalizers` waits for it before anything reads or closes runs, and
  :func:`finish_orphaned_runs` finishes, at the search's end, the runs of trials Tune
  saved as ended before a killed driver's finaliser closed them;
- trials cut off with the driver (Ctrl-C, an error in Tune) are closed ``cancelled`` by the
  driver once ``Tuner.fit`` returns or raises (Tune marks them TERMINATED on its way out,
  so a callback cannot tell them apart). After a killed driver their runs stay RUNNING
  until ``--resume`` restarts those trials into them.

Statuses (tag ``quakeray.status``, with the MLflow run status in brackets): ``running``,
``completed`` (FINISHED), ``stopped`` (FINISHED: a valid, shorter run), ``failed``
(FAILED), ``cancelled`` (KILLED).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

from ray.tune import Callback
from ray.tune.search import Searcher

from quakeray import tracking
from quakeray.search_space import REFERENCE_KEY, SearcherWrapper, sample_of, trial_config

if TYPE_CHECKING:
    from mlflow.entities import Run
    from ray.tune.experiment import Trial

log = logging.getLogger(__name__)

TrialStatus = Literal["running", "completed", "stopped", "failed", "cancelled"]

TAG_ROLE = "quakeray.role"  # "search" (parent) | "trial" (child)
TAG_SEARCH = "quakeray.search"  # search name
TAG_SEARCH_DIR = "quakeray.search_dir"  # folder to pass to --resume
TAG_TRIAL = "quakeray.trial_id"  # Tune trial id
TAG_STATUS = "quakeray.status"  # TrialStatus
TAG_REFERENCE = "quakeray.reference"  # mse_only | paper (reference points only)
TAG_ERROR = "quakeray.error"  # first line of a failed trial's error
TAG_CHECKPOINT = "quakeray.best_checkpoint"  # best checkpoint of a trial / the search
TAG_RESTARTS = "quakeray.restarts"  # times Tune restarted the trial

RUN_KEY = "_mlflow_run_id"
"""Key of a trial's config holding its child run's id (set by :class:`TrialRunOpener`)."""

# One thread finalises ended trials, in order, for every tracker of this process: the
# tracker itself stays picklable, and the search can wait for it whichever tracker
# instance (a fresh one, or Tune's restored copy on --resume) handed the work over.
_finalizer: ThreadPoolExecutor | None = None
_finalizer_lock = threading.Lock()
_pending_runs: set[str] = set()  # run ids handed to the finaliser, not yet closed


def _in_background(run_id: str | None, work: Callable[[], None]) -> None:
    """Run ``work`` (which closes ``run_id``) on the finaliser thread (started on first use)."""
    global _finalizer

    def tracked() -> None:
        try:
            work()
        finally:
            with _finalizer_lock:
                _pending_runs.discard(run_id or "")

    with _finalizer_lock:
        if _finalizer is None:
            _finalizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quakeray-final")
        if run_id:
            _pending_runs.add(run_id)
        _finalizer.submit(tracked)


def wait_for_finalizers() -> None:
    """Block until every trial run handed to the background is finalised and closed.

    Interrupted (a second Ctrl-C), it leaves the finaliser in place: the runs it still
    holds are :func:`pending_runs`, which the search must not close as cancelled.
    """
    global _finalizer
    with _finalizer_lock:
        executor = _finalizer
    if executor is None:
        return
    executor.shutdown(wait=True)
    with _finalizer_lock:
        if _finalizer is executor:
            _finalizer = None


def pending_runs() -> frozenset[str]:
    """Ids of the runs the finaliser thread has yet to close."""
    with _finalizer_lock:
        return frozenset(_pending_runs)


def finish_trial_run(
    uri: str,
    run_id: str,
    *,
    base: Mapping[str, Any],
    config: Mapping[str, Any],
    checkpoint: str | None,
    status: TrialStatus,
    trial_id: str,
) -> None:
    """Finalise a still-RUNNING trial run from its best ``checkpoint``, then close it."""
    if checkpoint is not None and tracking.run_status(uri, run_id) == "RUNNING":
        from quakeray.train import finalize_run

        try:
            finalize_run(uri, run_id, trial_config(base, config), checkpoint)
        except Exception as exc:  # the run keeps its metrics; say what is missing
            log.warning("trial %s: could not log its best checkpoint", trial_id)
            tracking.RunLogger(uri, run_id).set_tags(
                {TAG_ERROR: f"finalize: {type(exc).__name__}: {exc}"}
            )
    close_trial_run(uri, run_id, status, only_if_running=True)


CHECKPOINT_KEY = "checkpoint_path"
"""Key of a Tune result holding the checkpoint reported with it (Train's Tune callback)."""

MLFLOW_STATUS: dict[TrialStatus, tracking.RunStatus] = {
    "completed": "FINISHED",
    "stopped": "FINISHED",
    "failed": "FAILED",
    "cancelled": "KILLED",
}


def find_trial_run(uri: str, experiment_id: str, parent_run_id: str, trial_id: str) -> Run | None:
    """The child run of ``trial_id`` under ``parent_run_id``, or None."""
    runs = tracking.mlflow_client(uri).search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{TAG_TRIAL}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent_run_id}'"
        ),
        max_results=2,
    )
    if len(runs) > 1:
        log.warning("trial %s has %d MLflow runs; using the first", trial_id, len(runs))
    return runs[0] if runs else None


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list[Run]:
    """All child runs of a search, oldest first."""
    return list(
        tracking.mlflow_client(uri).search_runs(
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
            order_by=["attributes.start_time ASC"],
            max_results=10_000,
        )
    )


def open_trial_run(
    uri: str,
    experiment_id: str,
    parent_run_id: str,
    trial_id: str,
    *,
    run_name: str,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Create the child run of a trial, or reopen it when Tune restarts the trial.

    Returns:
        The run id; the run is RUNNING with status tag ``running``.
    """
    existing = find_trial_run(uri, experiment_id, parent_run_id, trial_id)
    if existing is not None:
        reopen_trial_run(uri, existing)
        return str(existing.info.run_id)
    all_tags = {TAG_ROLE: "trial", TAG_TRIAL: trial_id, TAG_STATUS: "running", **(tags or {})}
    return tracking.start_run(
        uri, experiment_id, run_name=run_name, parent_run_id=parent_run_id, tags=all_tags
    )


def reopen_trial_run(uri: str, run: Run) -> None:
    """RUNNING again, status tag ``running``, one more restart counted."""
    run_id = str(run.info.run_id)
    restarts = int(run.data.tags.get(TAG_RESTARTS, "0")) + 1
    client = tracking.mlflow_client(uri)
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, TAG_STATUS, "running")
    client.set_tag(run_id, TAG_RESTARTS, str(restarts))


def close_trial_run(
    uri: str,
    run_id: str,
    status: TrialStatus,
    *,
    error: str | None = None,
    only_if_running: bool = False,
) -> bool:
    """End a child run with ``status``; returns whether it changed anything.

    Args:
        uri: Tracking URI.
        run_id: The child run.
        status: Final trial status (not ``running``).
        error: Error text for failed trials (first line kept).
        only_if_running: Leave a run that someone else already closed untouched (e.g. a
            trial unwinding after the driver marked it stopped).
    """
    client = tracking.mlflow_client(uri)
    if only_if_running and client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_tag(run_id, TAG_STATUS, status)
    if error:
        first = (error.strip().splitlines() or [""])[-1][:500]
        client.set_tag(run_id, TAG_ERROR, first)
    tracking.end_run(uri, run_id, MLFLOW_STATUS[status])
    return True


class TrialRunOpener(SearcherWrapper):
    """Outermost searcher: opens each suggested trial's child run and passes its id on.

    Opening the run here, in the driver, costs milliseconds; in the trial's fresh process
    it would cost MLflow's imports and store set-up. The run id travels in the trial's
    config (:data:`RUN_KEY`), so a trial Tune restarts (after a failure, or on
    ``--resume``) continues in the same run. Picklable (plain strings and dicts): Tune
    saves it with the experiment and ``Tuner.restore`` brings it back.
    """

    def __init__(
        self,
        searcher: Searcher,
        *,
        uri: str,
        experiment_id: str,
        parent_run_id: str,
        search_name: str,
        base: Mapping[str, Any],
    ) -> None:
        super().__init__(searcher)
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.search_name = search_name
        self.base = dict(base)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        """The wrapped searcher's suggestion, with the id of the child run opened for it."""
        config = self.searcher.suggest(trial_id)
        if not isinstance(config, dict):  # None (wait) or Searcher.FINISHED
            return config  # type: ignore[no-any-return]
        return {**config, RUN_KEY: self._open(trial_id, config)}

    def _open(self, trial_id: str, config: Mapping[str, Any]) -> str:
        reference = config.get(REFERENCE_KEY)
        tags = {TAG_SEARCH: self.search_name, **({TAG_REFERENCE: reference} if reference else {})}
        run_id = open_trial_run(
            self.uri,
            self.experiment_id,
            self.parent_run_id,
            trial_id,
            run_name=f"trial-{trial_id}" + (f"-{reference}" if reference else ""),
            tags=tags,
        )
        sample = sample_of(config)
        # The sample first: a config the sample breaks is still visible in MLflow (the
        # trial then fails on the same error, and the tracker records it).
        logger = tracking.RunLogger(self.uri, run_id)
        logger.log_params({f"trial.{k}": v for k, v in sample.items()})
        try:
            cfg = trial_config(self.base, config)
        except Exception:
            log.debug("trial %s: its sample breaks the config", trial_id, exc_info=True)
        else:
            tracking.log_config(self.uri, run_id, cfg)
        return run_id


class TrialRunTracker(Callback):  # type: ignore[misc]
    """Tune callback (driver side): epoch metrics, restarts and the end of child runs.

    Picklable (plain strings, dicts and sets only): Tune stores it with the experiment,
    and ``Tuner.restore`` brings it back for a resumed search.
    """

    def __init__(
        self,
        uri: str,
        experiment_id: str,
        parent_run_id: str,
        *,
        base: Mapping[str, Any],
        metric_names: tuple[str, ...],
        score_metric: str,
        train_storage: str,
    ) -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.base = dict(base)
        self.metric_names = metric_names
        self.score_metric = score_metric  # the metric Train ranks checkpoints by (min)
        self.train_storage = train_storage  # gives reported checkpoint paths their scheme
        self._stopped: set[str] = set()
        self._logged: dict[str, set[int]] = {}  # run id -> epochs in MLflow
        self._best: dict[str, tuple[float, str]] = {}  # trial id -> (score, checkpoint)
        self._filled: set[str] = set()  # run ids whose missed epochs were looked up

    def on_trial_start(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        """A trial started again (after a failure, or on ``--resume``): reopen its run."""
        self._guarded(trial, self._reopen)

    def on_trial_result(
        self,
        iteration: int,
        trials: list[Trial],
        trial: Trial,
        result: dict[str, Any],
        **info: Any,
    ) -> None:
        """Log the epoch's metrics; remember the best checkpoint and an early stop.

        Tune marks the result on which the scheduler decided STOP with ``done``; a
        trial that ran to its end finishes with a separate, silent result instead.
        """
        if result.get("done"):
            self._stopped.add(trial.trial_id)
        if "epoch" not in result:
            return
        raw, path = result.get(self.score_metric), result.get(CHECKPOINT_KEY)
        score = float(raw) if isinstance(raw, (int, float)) else math.nan
        best = self._best.get(trial.trial_id)
        if path and math.isfinite(score) and (best is None or score < best[0]):
            from quakeray.train import checkpoint_uri

            self._best[trial.trial_id] = (score, checkpoint_uri(str(path), self.train_storage))
        self._guarded(trial, lambda run_id: self._log_epoch(run_id, result))

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        """Finalize from the best checkpoint, then close: ``stopped`` or ``completed``.

        Both happen on the finaliser thread (:func:`wait_for_finalizers`); what they
        need of the trial is taken now.
        """
        status: TrialStatus = "stopped" if trial.trial_id in self._stopped else "completed"
        best = self._best.get(trial.trial_id)
        config = dict(getattr(trial, "config", None) or {})

        def finish(run_id: str) -> None:
            finish_trial_run(
                self.uri,
                run_id,
                base=self.base,
                config=config,
                checkpoint=best[1] if best else None,
                status=status,
                trial_id=trial.trial_id,
            )

        _in_background(config.get(RUN_KEY), lambda: self._guarded(trial, finish))

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        """Tune's search ended: the last trials' runs are closed before Tune returns."""
        wait_for_finalizers()

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        """FAILED + ``failed``, with a run created for the record if the trial had none."""
        error = _trial_error(trial)
        self._guarded(
            trial,
            lambda run_id: close_trial_run(
                self.uri, run_id, "failed", error=error, only_if_running=True
            ),
            create=True,
        )

    def _guarded(self, trial: Trial, action: Any, *, create: bool = False) -> None:
        """Run ``action(run_id)`` for the trial's run; tracking trouble never stops a search."""
        try:
            run_id = self._run_id(trial, create=create)
            if run_id is not None:
                action(run_id)
        except Exception:
            log.warning("MLflow tracking failed for trial %s", trial.trial_id, exc_info=True)

    def _run_id(self, trial: Trial, *, create: bool) -> str | None:
        run_id = (getattr(trial, "config", None) or {}).get(RUN_KEY)
        if run_id:
            return str(run_id)
        run = find_trial_run(self.uri, self.experiment_id, self.parent_run_id, trial.trial_id)
        if run is not None:
            return str(run.info.run_id)
        if not create:
            return None
        return open_trial_run(
            self.uri,
            self.experiment_id,
            self.parent_run_id,
            trial.trial_id,
            run_name=f"trial-{trial.trial_id}",
        )

    def _reopen(self, run_id: str) -> None:
        run = tracking.mlflow_client(self.uri).get_run(run_id)
        if run.info.status != "RUNNING":  # else a first start: the opener left it running
            reopen_trial_run(self.uri, run)

    def _log_epoch(self, run_id: str, result: Mapping[str, Any]) -> None:
        logger = tracking.RunLogger(self.uri, run_id)
        if run_id not in self._logged:  # first result this session: skip epochs logged before
            self._logged[run_id] = logger.logged_steps("epoch")
        logged = self._logged[run_id]
        epoch = int(result["epoch"])
        if epoch in logged:
            return
        filled = self.__dict__.setdefault("_filled", set())  # absent in older pickles
        if run_id not in filled and any(e not in logged for e in range(epoch)):
            filled.add(run_id)  # one try per run and driver: a gap may be unfillable
            try:
                missed = self._missed_epochs(result, before=epoch)
            except Exception:  # pruned, unreadable: the current epoch still gets logged
                log.warning("trial run %s: epochs before %d are missing", run_id, epoch)
                missed = []
            for earlier, metrics in missed:
                if earlier not in logged:
                    logger.log_metrics(metrics, step=earlier)
                    logged.add(earlier)
        logger.log_metrics({k: result[k] for k in self.metric_names if k in result}, step=epoch)
        logged.add(epoch)

    def _missed_epochs(
        self, result: Mapping[str, Any], *, before: int
    ) -> list[tuple[int, dict[str, float]]]:
        """Epochs before ``before`` from the history in the result's checkpoint.

        Tune never passes on the reports Train checkpointed while the driver was being
        interrupted; the resumed trial continues after them, so only its checkpoint's
        history still holds their metrics.
        """
        from quakeray import storage
        from quakeray.checkpoint import HISTORY_FILE, parse_history
        from quakeray.train import checkpoint_uri

        path = result.get(CHECKPOINT_KEY)
        if not path:
            return []
        file = storage.join(checkpoint_uri(str(path), self.train_storage), HISTORY_FILE)
        # Only this small file, also from s3:// (a checkpoint holds the model's state).
        history = parse_history(storage.read_text(file)) if storage.is_file(file) else []
        missed = []
        for epoch_metrics in history:
            epoch = int(epoch_metrics.get("epoch") or 0)
            if epoch < before:  # null is a non-finite value, which MLflow does not get anyway
                kept = {
                    k: float(v)
                    for k, v in epoch_metrics.items()
                    if k in self.metric_names and v is not None
                }
                missed.append((epoch, kept))
        return missed


def finish_orphaned_runs(
    uri: str,
    experiment_id: str,
    parent_run_id: str,
    results: Any,
    *,
    base: Mapping[str, Any],
    train_storage: str,
) -> int:
    """Finalise and close the runs of trials Tune ended but no finaliser closed.

    Tune saves a trial as ended while the finaliser thread may still hold its run; a
    driver killed then leaves the run RUNNING, and ``--resume`` does not rerun the trial.
    Its best reported checkpoint comes from Tune's record of its results.

    Args:
        uri: The tracking URI.
        experiment_id: The search's experiment.
        parent_run_id: The search's parent run.
        results: Tune's results (``ResultGrid``): ``config``, ``error``,
            ``metrics_dataframe``.
        base: The search's resolved config (``to_dict``).
        train_storage: Where the trials' Train runs are (gives checkpoints their scheme).

    Returns:
        How many runs were finished here.
    """
    import pandas as pd

    from quakeray.train import SCORE_METRIC, checkpoint_uri

    ended = {
        str(r.config[RUN_KEY]): r
        for r in (results[i] for i in range(len(results)))  # a ResultGrid is indexed only
        if r.error is None and (getattr(r, "config", None) or {}).get(RUN_KEY)
    }
    pending, finished = pending_runs(), 0
    for run in child_runs(uri, experiment_id, parent_run_id):
        result = ended.get(run.info.run_id)
        if run.info.status != "RUNNING" or result is None or run.info.run_id in pending:
            continue
        frame = result.metrics_dataframe
        frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame()
        checkpoint, epochs = None, 0
        if "epoch" in frame and frame["epoch"].notna().any():
            epochs = int(frame["epoch"].max()) + 1
        if {SCORE_METRIC, CHECKPOINT_KEY} <= set(frame.columns):
            scored = frame.dropna(subset=[SCORE_METRIC, CHECKPOINT_KEY])
            if len(scored):
                best = scored.loc[scored[SCORE_METRIC].idxmin(), CHECKPOINT_KEY]
                checkpoint = checkpoint_uri(str(best), train_storage)
        trial_id = run.data.tags.get(TAG_TRIAL, "?")
        try:
            planned = trial_config(base, result.config).optim.epochs
            finish_trial_run(
                uri,
                run.info.run_id,
                base=base,
                config=result.config,
                checkpoint=checkpoint,
                status="stopped" if epochs < planned else "completed",
                trial_id=trial_id,
            )
        except Exception:  # the search closes it as cancelled instead
            log.warning("could not finish the run of trial %s", trial_id, exc_info=True)
            continue
        finished += 1
    return finished


def _trial_error(trial: Trial) -> str:
    """Best-effort text of a trial's error (Tune keeps it in a file)."""
    path = getattr(trial, "error_file", None)
    if path:
        try:
            with open(path) as fh:
                text = fh.read().strip()
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if lines:
                return lines[-1]
        except OSError:
            pass
    return "trial failed (see the Tune trial folder for the traceback)"

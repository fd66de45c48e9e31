"""The driver's two hooks into Tune that keep each trial's MLflow run: an opener and a tracker.

:class:`TrialRunOpener` (the outermost searcher) opens a trial's child run when it is
suggested; :class:`TrialRunTracker` (a Tune callback) logs its epochs and closes it. Both
are picklable: Tune saves them with the experiment and ``Tuner.restore`` brings them
back. The runs themselves are :mod:`quakeray.search.runs`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ray.tune import Callback
from ray.tune.search import Searcher

from quakeray import storage, tracking
from quakeray.checkpoint import HISTORY_FILE, parse_history
from quakeray.config import ExperimentConfig, flatten
from quakeray.search.finalizer import in_background, wait_for_finalizers
from quakeray.search.runs import (
    CHECKPOINT_KEY,
    RUN_KEY,
    TrialStatus,
    close_trial_run,
    find_trial_run,
    finish_trial_run,
    open_trial_run,
    reopen_trial_run,
)
from quakeray.search.searchers import SearcherWrapper, set_trial_user_attrs
from quakeray.search.space import (
    CONFIRM_KEY,
    REFERENCE_KEY,
    sample_of,
    trial_config,
    trial_params,
    varying_fields,
)
from quakeray.search.unsaved import TRAIN_KEY, take_unsaved_trial
from quakeray.tracking import tags
from quakeray.tracking.datasets import log_dataset

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

__all__ = ["TrialRunOpener", "TrialRunTracker", "trial_run_name"]

log = logging.getLogger(__name__)


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
        base: ExperimentConfig,
        data_path: str = "",
    ) -> None:
        super().__init__(searcher)
        self.data_path = data_path  # the prepared data file: each trial's MLflow input
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.search_name = search_name
        self.base = base

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        """The wrapped searcher's suggestion, with the id of the child run opened for it."""
        config = self.searcher.suggest(trial_id)
        if not isinstance(config, dict):  # None (wait) or Searcher.FINISHED
            return config  # type: ignore[no-any-return]
        unsaved = take_unsaved_trial(self.parent_run_id, self.base, config)
        if unsaved is not None:  # a resumed search: that trial ran; continue it, in its run
            run_id, earlier = unsaved
            log.info("trial %s continues trial %s (run %s)", trial_id, earlier, run_id)
            config = {**config, TRAIN_KEY: earlier}
            if not (config.get(REFERENCE_KEY) or config.get(CONFIRM_KEY)):
                self.sampled = getattr(self, "sampled", 0) + 1  # its number: no name twice
            # The run is this trial's now (the search's tables join runs to Tune's trials).
            tracking.RunLogger(self.uri, run_id).set_tags(
                {tags.TRIAL_ID: trial_id, tags.CONTINUES: earlier}
            )
        else:
            run_id = self._open(trial_id, config)
        attrs = {
            "tune_trial_id": trial_id,
            "mlflow_run_id": run_id,
            "mlflow_experiment_id": self.experiment_id,
            "mlflow_tracking_uri": _public_uri(self.uri),
        }
        set_trial_user_attrs(self.searcher, trial_id, attrs)  # the Optuna trial names its run
        return {**config, RUN_KEY: run_id}

    def _open(self, trial_id: str, config: Mapping[str, Any]) -> str:
        reference, confirm = config.get(REFERENCE_KEY), config.get(CONFIRM_KEY)
        run_tags = {tags.SEARCH: self.search_name}
        if reference:
            run_tags[tags.REFERENCE] = reference
            run_name = str(reference)
        elif confirm:
            seed = str(config.get("optim.seed", ""))
            run_tags |= {tags.ROLE: "confirm", tags.CONFIRM: confirm, tags.SEED: seed}
            run_name = f"seed-{confirm}-{seed}"
        else:
            self.sampled = getattr(self, "sampled", 0) + 1  # (a restored older opener has none)
            run_name = trial_run_name(self.base.search.sampler, self.sampled, sample_of(config))
        run_id = open_trial_run(
            self.uri,
            self.experiment_id,
            self.parent_run_id,
            trial_id,
            run_name=run_name,
            extra_tags=run_tags,
        )
        # The searched fields first: a config the sample breaks is still visible in MLflow
        # (the trial then fails on the same error, and the tracker records it).
        logger = tracking.RunLogger(self.uri, run_id)
        logger.log_params(trial_params(self.base, config))
        try:
            cfg = trial_config(self.base, config)
        except Exception:
            log.debug("trial %s: its sample breaks the config", trial_id, exc_info=True)
        else:
            # Only what differs from the parent's settings (which hold the rest once).
            shared, varying = flatten(self.base), varying_fields(self.base)
            own = {k: v for k, v in flatten(cfg).items() if k in varying or shared.get(k) != v}
            tracking.log_config(self.uri, run_id, cfg, params=own)
        if getattr(self, "data_path", ""):  # (a restored older opener has none)
            log_dataset(self.uri, run_id, self.data_path, ["train", "validation"])
        return run_id


_SHORT_NAMES = {"loss.margin": "m", "loss.rank_weight": "w", "optim.lr": "lr"}


def trial_run_name(sampler: str, index: int, sample: Mapping[str, Any]) -> str:
    """``tpe-003 m=0.0437 w=1.4``: the sampler, the trial's number, its values in short."""
    parts = [f"{sampler}-{index:03d}"]
    for key, value in sample.items():
        short = _SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{short}={text}")
    return " ".join(parts)


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
        base: ExperimentConfig,
        metric_names: tuple[str, ...],
        train_storage: str,
    ) -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.base = base
        self.metric_names = metric_names
        self.train_storage = train_storage  # gives reported checkpoint paths their scheme
        self._stopped: set[str] = set()
        self._logged: dict[str, set[int]] = {}  # run id -> epochs in MLflow
        self._best: dict[str, tuple[float, str]] = {}  # trial id -> (score, checkpoint)
        self._filled: set[str] = set()  # run ids whose missed epochs were looked up
        self._ranked_by: dict[str, str] = {}  # trial id -> its run.checkpoint_metric

    @property
    def gaps_looked_up(self) -> frozenset[str]:
        """Run ids whose epochs missing from MLflow were looked up (once per run and driver)."""
        return frozenset(self._filled)

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
        raw, path = result.get(self._score_metric(trial)), result.get(CHECKPOINT_KEY)
        score = float(raw) if isinstance(raw, (int, float)) else math.nan
        best = self._best.get(trial.trial_id)
        if path and math.isfinite(score) and (best is None or score < best[0]):
            self._best[trial.trial_id] = (
                score,
                storage.with_scheme_of(str(path), self.train_storage),
            )
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

        in_background(config.get(RUN_KEY), lambda: self._guarded(trial, finish))

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

    def _score_metric(self, trial: Trial) -> str:
        """What Train ranks this trial's checkpoints by (a sample may change it)."""
        ranked_by = self.__dict__.setdefault("_ranked_by", {})  # a tracker from older state
        if trial.trial_id not in ranked_by:
            config = getattr(trial, "config", None) or {}
            ranked_by[trial.trial_id] = trial_config(self.base, config).run.checkpoint_metric
        return str(ranked_by[trial.trial_id])

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
        if run_id not in self._filled and any(e not in logged for e in range(epoch)):
            self._filled.add(run_id)  # one try per run and driver: a gap may be unfillable
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
        path = result.get(CHECKPOINT_KEY)
        if not path:
            return []
        file = storage.join(storage.with_scheme_of(str(path), self.train_storage), HISTORY_FILE)
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


def _public_uri(uri: str) -> str:
    """The tracking URI without a password (``postgresql://user:secret@host/db``)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


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

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
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ray.tune import Callback
from ray.tune.search import Searcher

from quakeray import storage, tracking
from quakeray.checkpoint import read_history
from quakeray.config import ExperimentConfig, flatten
from quakeray.search.finalizer import Finalizer
from quakeray.search.layout import SearchRef
from quakeray.search.recovery import RecoveryPlan
from quakeray.search.runs import (
    CHECKPOINT_KEY,
    TrialStatus,
    close_trial_run,
    find_trial_run,
    finish_trial_run,
    open_trial_run,
    reopen_trial_run,
)
from quakeray.search.searchers import SearcherWrapper, set_trial_user_attrs
from quakeray.search.space import trial_config, trial_params, varying_fields
from quakeray.search.trial_spec import SPEC_KEY, TrialSpec, sample_of, spec_of
from quakeray.tracking import tags
from quakeray.tracking.datasets import log_dataset

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

__all__ = ["TrialRunOpener", "TrialRunTracker", "trial_run_name"]

log = logging.getLogger(__name__)


class TrialRunOpener(SearcherWrapper):
    """Outermost searcher: opens each suggested trial's child run and completes its spec.

    Opening the run here, in the driver, costs milliseconds; in the trial's fresh process
    it would cost MLflow's imports and store set-up. The run travels in the trial's
    :class:`~quakeray.search.trial_spec.TrialSpec`, so a trial Tune restarts (after a
    failure, or on ``--resume``) continues in the same run. Picklable: Tune saves it with
    the experiment and ``Tuner.restore`` brings it back; a resumed search hands it its
    :class:`~quakeray.search.recovery.RecoveryPlan` (:meth:`recover`).
    """

    transient = ("searcher", "recovery")

    def __init__(
        self, searcher: Searcher, *, ref: SearchRef, base: ExperimentConfig, data_path: str = ""
    ) -> None:
        super().__init__(searcher)
        self.ref = ref
        self.base = base
        self.data_path = data_path  # the prepared data file: each trial's MLflow input
        self.sampled = 0  # sampled trials so far: their run names' numbers
        self.recovery: RecoveryPlan | None = None

    def recover(self, plan: RecoveryPlan) -> None:
        """Continue the runs a killed driver left (``plan``) when their settings come again."""
        self.recovery = plan

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        """The wrapped searcher's suggestion, with the spec of the run opened for it."""
        config = self.searcher.suggest(trial_id)
        if not isinstance(config, dict):  # None (wait) or Searcher.FINISHED
            return config  # type: ignore[no-any-return]
        spec = spec_of(config)
        unsaved = self.recovery.take(self.base, config) if self.recovery else None
        if unsaved is not None:  # a resumed search: that trial ran; continue it, in its run
            log.info(
                "trial %s continues trial %s (run %s)", trial_id, unsaved.trial_id, unsaved.run_id
            )
            if spec.role == "sampled":
                self.sampled += 1  # its number: no name twice
            # The run is this trial's now (the search's tables join runs to Tune's trials).
            tracking.RunLogger(self.ref.uri, unsaved.run_id).set_tags(
                {tags.TRIAL_ID: trial_id, tags.CONTINUES: unsaved.trial_id}
            )
            spec = replace(
                spec,
                run_id=unsaved.run_id,
                run_name=unsaved.run_name,
                continues=unsaved.trial_id,
            )
        else:
            spec = self._open(trial_id, config, spec)
        attrs = {
            "tune_trial_id": trial_id,
            "mlflow_run_id": spec.run_id,
            "mlflow_experiment_id": self.ref.experiment_id,
            "mlflow_tracking_uri": _public_uri(self.ref.uri),
        }
        set_trial_user_attrs(self.searcher, trial_id, attrs)  # the Optuna trial names its run
        return {**config, SPEC_KEY: spec}

    def _open(self, trial_id: str, config: Mapping[str, Any], spec: TrialSpec) -> TrialSpec:
        run_tags = {tags.SEARCH: self.base.search.name}
        if spec.role == "reference":
            run_tags[tags.REFERENCE] = spec.label
            run_name = spec.label
        elif spec.role == "confirm":
            seed = str(config.get("optim.seed", ""))
            run_tags |= {tags.ROLE: "confirm", tags.CONFIRM: spec.label, tags.SEED: seed}
            run_name = f"seed-{spec.label}-{seed}"
        else:
            self.sampled += 1
            run_name = trial_run_name(self.base.search.sampler, self.sampled, sample_of(config))
        run_id = open_trial_run(self.ref, trial_id, run_name=run_name, extra_tags=run_tags)
        # The searched fields first: a config the sample breaks is still visible in MLflow
        # (the trial then fails on the same error, and the tracker records it).
        logger = tracking.RunLogger(self.ref.uri, run_id)
        logger.log_params(trial_params(self.base, config))
        try:
            cfg = trial_config(self.base, config)
        except Exception:
            log.debug("trial %s: its sample breaks the config", trial_id, exc_info=True)
        else:
            # Only what differs from the parent's settings (which hold the rest once).
            shared, varying = flatten(self.base), varying_fields(self.base)
            own = {k: v for k, v in flatten(cfg).items() if k in varying or shared.get(k) != v}
            tracking.log_config(self.ref.uri, run_id, cfg, params=own)
        if self.data_path:
            log_dataset(self.ref.uri, run_id, self.data_path, ["train", "validation"])
        return replace(spec, run_id=run_id, run_name=run_name)


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

    Picklable (plain strings, dicts and sets; its finaliser thread is not saved): Tune
    stores it with the experiment, and ``Tuner.restore`` brings it back for a resumed
    search, which starts a finaliser of its own.
    """

    def __init__(
        self, ref: SearchRef, *, base: ExperimentConfig, metric_names: tuple[str, ...]
    ) -> None:
        self.ref = ref
        self.base = base
        self.metric_names = metric_names
        self._stopped: set[str] = set()
        self._logged: dict[str, set[int]] = {}  # run id -> epochs in MLflow
        self._best: dict[str, tuple[float, str]] = {}  # trial id -> (score, checkpoint)
        self._filled: set[str] = set()  # run ids whose missed epochs were looked up
        self._finalizer: Finalizer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_finalizer"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _finalizer=None)

    @property
    def finalizer(self) -> Finalizer:
        """The thread this tracker's ended trials are finalised on (started on first use)."""
        if self._finalizer is None:
            self._finalizer = Finalizer()
        return self._finalizer

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
        metric = trial_config(self.base, trial.config).run.checkpoint_metric
        raw, path = result.get(metric), result.get(CHECKPOINT_KEY)
        score = float(raw) if isinstance(raw, (int, float)) else math.nan
        best = self._best.get(trial.trial_id)
        if path and math.isfinite(score) and (best is None or score < best[0]):
            self._best[trial.trial_id] = (
                score,
                storage.with_scheme_of(str(path), self.ref.train_root),
            )
        self._guarded(trial, lambda run_id: self._log_epoch(run_id, result))

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        """Finalize from the best checkpoint, then close: ``stopped`` or ``completed``.

        Both happen on the finaliser thread; what they need of the trial is taken now.
        """
        status: TrialStatus = "stopped" if trial.trial_id in self._stopped else "completed"
        best = self._best.get(trial.trial_id)
        config = dict(trial.config or {})

        def finish(run_id: str) -> None:
            finish_trial_run(
                self.ref.uri,
                run_id,
                base=self.base,
                config=config,
                checkpoint=best[1] if best else None,
                status=status,
                trial_id=trial.trial_id,
            )

        run_id = spec_of(config).run_id or None
        self.finalizer.submit(run_id, lambda: self._guarded(trial, finish))

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        """Tune's search ended: the last trials' runs are closed before Tune returns."""
        self.finalizer.wait()

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        """FAILED + ``failed``, with a run created for the record if the trial had none."""
        error = _trial_error(trial)
        self._guarded(
            trial,
            lambda run_id: close_trial_run(
                self.ref.uri, run_id, "failed", error=error, only_if_running=True
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
        run_id = spec_of(trial.config or {}).run_id
        if run_id:
            return run_id
        run = find_trial_run(self.ref, trial.trial_id)
        if run is not None:
            return str(run.info.run_id)
        if not create:
            return None
        return open_trial_run(self.ref, trial.trial_id, run_name=f"trial-{trial.trial_id}")

    def _reopen(self, run_id: str) -> None:
        run = tracking.mlflow_client(self.ref.uri).get_run(run_id)
        if run.info.status != "RUNNING":  # else a first start: the opener left it running
            reopen_trial_run(self.ref.uri, run)

    def _log_epoch(self, run_id: str, result: Mapping[str, Any]) -> None:
        logger = tracking.RunLogger(self.ref.uri, run_id)
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
        # Only this small file, also from s3:// (a checkpoint holds the model's state).
        history = read_history(storage.with_scheme_of(str(path), self.ref.train_root))
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

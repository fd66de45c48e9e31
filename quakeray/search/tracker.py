"""The driver's two hooks into Tune that keep each trial's MLflow run: an opener and a tracker.

:class:`TrialRunOpener` (the outermost searcher) has a trial's child run opened when it
is suggested; :class:`TrialRunTracker` (a Tune callback) passes its epochs on and has it
closed. Both send the work to the search's writer (:mod:`quakeray.search.writer`). Both
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

from quakeray import storage
from quakeray.checkpoint import rank_key
from quakeray.config import ExperimentConfig
from quakeray.metrics import EPOCH_METRICS
from quakeray.search.layout import SearchRef
from quakeray.search.recovery import RecoveryPlan
from quakeray.search.runs import CHECKPOINT_KEY, TrialStatus
from quakeray.search.searchers import SearcherWrapper, set_trial_user_attrs
from quakeray.search.space import trial_config
from quakeray.search.trial_spec import SPEC_KEY, TrialSpec, sample_of, spec_of
from quakeray.search.writer import InProcessWriter, TrialRunWriter, WriterHandle
from quakeray.tracking import tags

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

__all__ = ["TrialRunOpener", "TrialRunTracker", "trial_run_name"]

log = logging.getLogger(__name__)


class TrialRunOpener(SearcherWrapper):
    """Outermost searcher: opens each suggested trial's child run and completes its spec.

    The run is opened by the search's writer (:mod:`.writer`) when the trial is suggested,
    not in the trial's fresh process (MLflow's imports and store set-up). It travels in
    the trial's :class:`~quakeray.search.trial_spec.TrialSpec`, so a trial Tune restarts
    (after a failure, or on ``--resume``) continues in the same run. Picklable: Tune saves
    it with the experiment and ``Tuner.restore`` brings it back; the tuner hands it the
    writer, and a resumed search its :class:`~quakeray.search.recovery.RecoveryPlan`.
    """

    transient = ("searcher", "recovery", "writer")

    def __init__(
        self, searcher: Searcher, *, ref: SearchRef, base: ExperimentConfig, data_path: str = ""
    ) -> None:
        super().__init__(searcher)
        self.ref = ref
        self.base = base
        self.data_path = data_path  # the prepared data file: each trial's MLflow input
        self.sampled = 0  # sampled trials so far: their run names' numbers
        self.recovery: RecoveryPlan | None = None
        self.writer: WriterHandle | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("recovery", "writer")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, recovery=None, writer=None)

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
            log.info("trial %s continues trial %s", trial_id, unsaved.trial_id)
            if spec.role == "sampled":
                self.sampled += 1  # its number: no name twice
            # The run is this trial's now (the search's tables join runs to Tune's trials).
            run_tags = {tags.TRIAL_ID: trial_id, tags.CONTINUES: unsaved.trial_id}
            self._writer().send(trial_id, "set_tags", unsaved.run_id, run_tags)
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
        run_id = self._writer().open_run(trial_id, config, run_name, run_tags)
        return replace(spec, run_id=run_id, run_name=run_name)

    def _writer(self) -> WriterHandle:
        """The search's writer (one in this process when the tuner handed it none)."""
        if self.writer is None:
            self.writer = InProcessWriter(
                TrialRunWriter(self.ref, self.base, EPOCH_METRICS, self.data_path)
            )
        return self.writer


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
    """Tune callback (driver side): each trial's epochs, restarts and end, sent to the writer.

    What it keeps itself is what the end of a trial needs: the best checkpoint reported
    and whether the scheduler stopped it. Picklable (its writer is not saved): Tune stores
    it with the experiment, and ``Tuner.restore`` brings it back for a resumed search,
    whose tuner hands it a writer of its own.
    """

    def __init__(
        self, ref: SearchRef, *, base: ExperimentConfig, metric_names: tuple[str, ...]
    ) -> None:
        self.ref = ref
        self.base = base
        self.metric_names = metric_names
        self._stopped: set[str] = set()
        self._best: dict[str, tuple[tuple[float, int], str]] = {}  # trial -> (rank, checkpoint)
        self.writer: WriterHandle | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "writer"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, writer=None)

    def attach(self, writer: WriterHandle) -> None:
        """The writer this tracker's trials' runs are written by."""
        self.writer = writer

    def on_trial_start(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        """A trial started again (after a failure, or on ``--resume``): reopen its run."""
        run_id = spec_of(trial.config).run_id
        if run_id:
            self._writer().send(trial.trial_id, "reopen", run_id)

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
        key = rank_key(float(raw) if isinstance(raw, (int, float)) else None, int(result["epoch"]))
        best = self._best.get(trial.trial_id)
        if path and math.isfinite(key[0]) and (best is None or key < best[0]):
            self._best[trial.trial_id] = (
                key,
                storage.with_scheme_of(str(path), self.ref.train_root),
            )
        run_id = spec_of(trial.config).run_id
        if run_id:
            kept = {
                k: result[k] for k in (*self.metric_names, "epoch", CHECKPOINT_KEY) if k in result
            }
            self._writer().send(trial.trial_id, "log_epoch", run_id, kept)

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        """Finalize from the best checkpoint, then close: ``stopped`` or ``completed``."""
        status: TrialStatus = "stopped" if trial.trial_id in self._stopped else "completed"
        best = self._best.get(trial.trial_id)
        config = dict(trial.config or {})
        run_id = spec_of(config).run_id
        if run_id:
            checkpoint = best[1] if best else None
            self._writer().finish(
                trial.trial_id, run_id, config, checkpoint, status, trial.trial_id
            )

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        """Tune's search ended: the last trials' runs are closed before Tune returns."""
        self._writer().wait()

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        """FAILED + ``failed``, with a run created for the record if the trial had none."""
        run_id = spec_of(trial.config or {}).run_id
        self._writer().send(trial.trial_id, "fail", run_id, trial.trial_id, _trial_error(trial))

    def _writer(self) -> WriterHandle:
        """The search's writer (one in this process when the tuner attached none)."""
        if self.writer is None:
            self.writer = InProcessWriter(TrialRunWriter(self.ref, self.base, self.metric_names))
        return self.writer


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

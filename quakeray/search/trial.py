"""One Tune trial: the trial's config, a ``TorchTrainer`` fit, and (optionally) its test score.

A trial is a function (Train V2's pattern): Tune calls :func:`search_trial` in the
trial's own process with the sampled config; it builds a ``TorchTrainer`` whose workers
report each epoch to Tune through Train's ``TuneReportCallback``. What a trial needs
besides its sample is one :class:`TrialSetup`, shipped once through Ray's object store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quakeray.checkpoint import HISTORY_FILE, METRICS_FILE, checkpoint_dir_name, parse_history
from quakeray.config import VARIANT_KEY, ExperimentConfig
from quakeray.data.prepare import PreparedData
from quakeray.errors import CheckpointError
from quakeray.search.runs import CHECKPOINT_KEY, RUN_KEY
from quakeray.search.space import sample_of, trial_config

__all__ = ["TrialSetup", "search_trial"]


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs besides its sample; shipped once through the object store."""

    base: ExperimentConfig  # the search's resolved config
    tracking_uri: str  # for the checkpoints (and the test metrics with test_trials)
    data: PreparedData
    train_storage: str  # Train runs go to <train_storage>/train-<trial id>
    test_trials: bool


def search_trial(config: dict[str, Any], *, setup: TrialSetup) -> None:
    """One Tune trial: its config, then a ``TorchTrainer`` fit (and a test evaluation).

    MLflow is the driver's job (:mod:`quakeray.search.tracker`): the run was opened when
    the trial was suggested, its id is in ``config``, and the driver logs each epoch and
    closes the run. A failure (bad config, OOM, a worker error) raises, so Tune records
    the trial as errored, the driver closes its run FAILED and the search goes on.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from quakeray import storage
    from quakeray.train import best_checkpoint_path, build_trainer

    trial_id = tune.get_context().get_trial_id()
    run_id = str(config[RUN_KEY])
    cfg = trial_config(setup.base, config)
    if any(k.startswith(("model.", "data.")) or k == VARIANT_KEY for k in sample_of(config)):
        # A backbone the sample names but timm lacks fails here in a second, not in a
        # worker group that took 20 s to start. Only then: the driver checked the base
        # model, and a cold timm import costs this trial process ~2 s.
        from quakeray.preflight import check_model

        check_model(cfg, setup.data)
    name = f"train-{trial_id}"
    run_dir = storage.join(setup.train_storage, name)
    latest = _latest_checkpoint(run_dir, cfg.optim.epochs)
    if latest is not None:
        # Tune restarted the trial (a resumed search). The driver may have died after
        # Train persisted epochs and before Tune and its scheduler recorded them (Tune
        # saves no scheduler state at all): every epoch is reported again first, so ASHA
        # decides on each as it would have (the driver logs each epoch once). And when
        # the last epoch is done, Train has nothing left to run and would report nothing,
        # which Tune takes for a trial without its metric.
        folder, epoch = latest
        _report_again(run_dir, folder)
        if epoch == cfg.optim.epochs - 1:
            best = best_checkpoint_path(None, run_dir=run_dir, metric=cfg.run.checkpoint_metric)
            _test_if_asked(setup, best or folder, run_id, last_epoch=epoch)
            return
    trainer = build_trainer(
        cfg,
        data=setup.data,
        name=name,
        storage_path=setup.train_storage,
        tracking_uri=setup.tracking_uri,
        mlflow_run_id=run_id,
        log_metrics=False,  # the driver logs what Tune receives
        callbacks=[TuneReportCallback()],  # type: ignore[no-untyped-call]
    )
    result = trainer.fit()
    best = best_checkpoint_path(result, run_dir=run_dir, metric=cfg.run.checkpoint_metric)
    if best is None:
        raise CheckpointError(f"trial {trial_id} wrote no checkpoint under {run_dir}")
    _test_if_asked(setup, best, run_id, last_epoch=int((result.metrics or {}).get("epoch", 0)))


def _report_again(run_dir: str, latest: str) -> None:
    """Report every epoch in the latest checkpoint's history to Tune, oldest first."""
    from ray import tune

    from quakeray import storage

    for metrics in parse_history(storage.read_text(storage.join(latest, HISTORY_FILE))):
        result: dict[str, Any] = {k: v for k, v in metrics.items() if v is not None}
        folder = storage.join(run_dir, checkpoint_dir_name(int(result.get("epoch", 0))))
        if storage.is_file(storage.join(folder, METRICS_FILE)):  # not pruned
            result[CHECKPOINT_KEY] = folder
        tune.report(result)


def _latest_checkpoint(run_dir: str, epochs: int) -> tuple[str, int] | None:
    """The run's newest checkpoint and its epoch, or None for a run not started.

    Looked up by name from the last epoch down (no listing: ``s3://`` has none cheap).
    """
    from quakeray import storage

    if not storage.is_dir(run_dir):
        return None
    for epoch in range(epochs - 1, -1, -1):
        folder = storage.join(run_dir, checkpoint_dir_name(epoch))
        if storage.is_file(storage.join(folder, METRICS_FILE)):
            return folder, epoch
    return None


def _test_if_asked(setup: TrialSetup, best: str, run_id: str, *, last_epoch: int) -> None:
    """With ``search.test_trials``: the best checkpoint's test metrics into the trial's run."""
    if not setup.test_trials:
        return
    from quakeray.evaluate import evaluate_checkpoint
    from quakeray.tracking import RunLogger

    evaluated = evaluate_checkpoint(best, split="test", data_path=setup.data.path)
    RunLogger(setup.tracking_uri, run_id).log_metrics(evaluated.metrics, step=last_epoch)

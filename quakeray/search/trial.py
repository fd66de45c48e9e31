"""One Tune trial: the trial's config, a ``TorchTrainer`` fit, and (optionally) its test score.

A trial is a function (Train V2's pattern): Tune calls :func:`search_trial` in the
trial's own process with the sampled config; it builds a ``TorchTrainer`` whose workers
report each epoch to Tune through Train's ``TuneReportCallback``. What a trial needs
besides its sample is one :class:`TrialSetup`, shipped once through Ray's object store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quakeray.config import VARIANT_KEY, ExperimentConfig
from quakeray.data.prepare import PreparedData
from quakeray.errors import CheckpointError
from quakeray.search.runs import RUN_KEY
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
    run_dir = storage.join(setup.train_storage, name)
    best = best_checkpoint_path(result, run_dir=run_dir, metric=cfg.run.checkpoint_metric)
    if best is None:
        raise CheckpointError(f"trial {trial_id} wrote no checkpoint under {run_dir}")
    if setup.test_trials:
        from quakeray.evaluate import evaluate_checkpoint
        from quakeray.tracking import RunLogger

        evaluated = evaluate_checkpoint(best, split="test", data_path=setup.data.path)
        last_epoch = int((result.metrics or {}).get("epoch", 0))
        RunLogger(setup.tracking_uri, run_id).log_metrics(evaluated.metrics, step=last_epoch)

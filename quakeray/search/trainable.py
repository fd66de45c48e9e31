"""The trainable: one Tune trial's config, its training, and (optionally) its test score.

A trial is a function: Tune calls :func:`search_trial` in the trial's own process with
the sampled config and its :class:`~quakeray.search.trial_spec.TrialSpec`. A multi-worker
trial builds a ``TorchTrainer`` (Train V2's pattern) whose workers report each epoch to
Tune through Train's ``TuneReportCallback``. A single-worker trial
(``search.in_process_trials``) runs the same worker loop right there, reporting to Tune
itself (:class:`~quakeray.train.session.TuneTrialSession`): no Train controller and worker
group to start and stop, and Tune keeps the process for the next trial. Either way each
epoch's checkpoint lands in the trial's Train folder (on resume, maybe an earlier
trial's: :mod:`quakeray.search.recovery`) and reaches Tune as the same result. What a
trial needs besides its config is one :class:`TrialSetup`, shipped once through Ray's
object store (:func:`trainable`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quakeray.checkpoint import (
    METRICS_FILE,
    checkpoint_dir_name,
    latest_checkpoint_at,
    read_history,
    read_metrics,
)
from quakeray.config import VARIANT_KEY, ExperimentConfig
from quakeray.data.prepare import PreparedData
from quakeray.errors import CheckpointError
from quakeray.search.layout import SearchRef
from quakeray.search.runs import CHECKPOINT_KEY
from quakeray.search.space import trial_config
from quakeray.search.trial_spec import sample_of, spec_of

__all__ = ["TrialSetup", "in_process", "search_trial", "trainable", "trial_resources"]


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs besides its config; shipped once through the object store."""

    base: ExperimentConfig  # the search's resolved config
    ref: SearchRef  # where its Train folder is; the store its checkpoints name
    data: PreparedData
    test_trials: bool  # score the best checkpoint on test, into the trial's run

    @property
    def in_process(self) -> bool:
        """Whether trials train in their own process (one worker; no Train worker group)."""
        return in_process(self.base)


def in_process(cfg: ExperimentConfig) -> bool:
    """Whether a search of ``cfg`` trains each trial in the trial's own process."""
    return cfg.search.in_process_trials and cfg.scaling.num_workers == 1


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What Tune reserves for a trial's own process.

    A trial that trains in its process holds its one worker's share too (the same total
    as the trial process plus a one-worker group, so as many trials run at once); a
    worker group reserves its own.
    """
    if not in_process(cfg):
        return {"cpu": cfg.search.trial_cpus}
    sc = cfg.scaling
    resources = {"cpu": cfg.search.trial_cpus + sc.cpus_per_worker}
    if sc.use_gpu:
        resources["gpu"] = sc.gpus_per_worker
    return resources


def trainable(setup: TrialSetup) -> Any:
    """:func:`search_trial` with the search's setup and the trial's resource reservation."""
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(search_trial, setup=setup), trial_resources(setup.base)
    )


def search_trial(config: dict[str, Any], *, setup: TrialSetup) -> None:
    """One Tune trial: its config, then its training (and a test evaluation).

    MLflow is the search's writer's job (:mod:`quakeray.search.writer`): the run was opened
    when the trial was suggested, its id is in the trial's spec, and the writer logs each
    epoch Tune receives and closes the run. A failure (bad config, OOM, a worker error)
    raises, so Tune records the trial as errored, its run ends FAILED and the search goes
    on.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from quakeray.train import (
        best_checkpoint_path,
        build_trainer,
        loop_config,
        train_loop_per_worker,
    )

    trial_id = tune.get_context().get_trial_id()
    spec = spec_of(config)
    run_id = spec.run_id
    cfg = trial_config(setup.base, config)
    if any(k.startswith(("model.", "data.")) or k == VARIANT_KEY for k in sample_of(config)):
        # A backbone the sample names but timm lacks fails here in a second, not in a
        # worker group that took 20 s to start. Only then: the driver checked the base
        # model, and a cold timm import costs this trial process ~2 s.
        from quakeray.preflight import check_model

        check_model(cfg, setup.data)
    folder_of = spec.train_folder_of(trial_id)  # a resumed search may continue another's
    run_dir = setup.ref.train_dir(folder_of)
    latest = latest_checkpoint_at(run_dir)
    if latest is not None:
        # Tune restarted the trial (a resumed search). The driver may have died after
        # Train persisted epochs and before Tune and its scheduler recorded them (Tune
        # saves no scheduler state at all): every epoch is reported again first, so ASHA
        # decides on each as it would have (the driver logs each epoch once). And when
        # the last epoch is done, Train has nothing left to run and would report nothing,
        # which Tune takes for a trial without its metric.
        epoch = _epoch_of(latest)
        _report_again(run_dir, latest)
        if epoch == cfg.optim.epochs - 1:
            best = best_checkpoint_path(None, run_dir=run_dir, metric=cfg.run.checkpoint_metric)
            _test_if_asked(setup, best or latest, run_id, last_epoch=epoch)
            return
    if setup.in_process:
        # The worker loop right here, continuing from the newest checkpoint if any.
        loop = loop_config(
            cfg,
            data=setup.data,
            run_dir=run_dir,
            tracking_uri=setup.ref.uri,
            mlflow_run_id=run_id,
            log_metrics=False,  # the search's writer logs what Tune receives
            resume_from=latest,  # found above: not listed again
            in_trial=True,
            figures=cfg.search.trial_figures,  # drawn here, off the driver
        )
        try:
            train_loop_per_worker(loop)
        finally:  # also when ASHA stops it (SystemExit): Tune reuses this process
            _release_memory()
        best = best_checkpoint_path(None, run_dir=run_dir, metric=cfg.run.checkpoint_metric)
        if best is None:
            raise CheckpointError(f"trial {trial_id} wrote no checkpoint under {run_dir}")
        last = latest_checkpoint_at(run_dir) or best
        _test_if_asked(setup, best, run_id, last_epoch=_epoch_of(last))
        return
    trainer = build_trainer(
        cfg,
        data=setup.data,
        name=setup.ref.train_name(folder_of),
        storage_path=setup.ref.train_root,
        tracking_uri=setup.ref.uri,
        mlflow_run_id=run_id,
        log_metrics=False,  # the search's writer logs what Tune receives
        callbacks=[TuneReportCallback()],  # type: ignore[no-untyped-call]
        figures=cfg.search.trial_figures,  # drawn by rank 0, off the driver
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

    for metrics in read_history(latest):
        result: dict[str, Any] = {k: v for k, v in metrics.items() if v is not None}
        folder = storage.join(run_dir, checkpoint_dir_name(int(result.get("epoch", 0))))
        if storage.is_file(storage.join(folder, METRICS_FILE)):  # not pruned
            result[CHECKPOINT_KEY] = folder
        tune.report(result)


def _release_memory() -> None:
    """Give back the GPU memory the trial held before this process trains the next one.

    PyTorch's CUDA cache would keep the trial's peak, which a process sharing the GPU
    (fractional ``scaling.gpus_per_worker``) could not have. Only with CUDA: a full
    ``gc.collect`` costs ~0.2 s in a process holding torch and timm, and on the CPU the
    trial's tensors went with their last reference.
    """
    import gc

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        gc.collect()
        torch.cuda.empty_cache()


def _epoch_of(folder: str) -> int:
    """The (0-based) epoch of a checkpoint folder, from its metrics."""
    return int(read_metrics(folder).get("epoch") or 0)


def _test_if_asked(setup: TrialSetup, best: str, run_id: str, *, last_epoch: int) -> None:
    """With ``search.test_trials``: the best checkpoint's test metrics into the trial's run."""
    if not setup.test_trials:
        return
    from quakeray.evaluate import evaluate_checkpoint
    from quakeray.tracking import RunLogger

    evaluated = evaluate_checkpoint(best, split="test", data_path=setup.data.path)
    RunLogger(setup.ref.uri, run_id).log_metrics(evaluated.metrics, step=last_epoch)

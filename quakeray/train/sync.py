"""``quakeray sync RUN_DIR``: a training run's MLflow record completed from its checkpoints.

Training does not stop when the tracking server goes away (:mod:`quakeray.tracking.outage`):
epochs it could not log are in every checkpoint's ``history.json``, and a run that ended
while the server was away could not log its best model or close its run. Once the server
is back, this logs the epochs MLflow lacks (each once), the best checkpoint's outputs when
they are missing, and the run's true end: FINISHED when every epoch ran; KILLED when
training stopped early and nobody trains in the folder now (rerun the same ``run.name``
to continue it). A run folder that a training holds is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from quakeray import storage, tracking
from quakeray.checkpoint import (
    best_checkpoint,
    checkpoint_config,
    find_checkpoints,
    load_checkpoint,
    read_history,
)
from quakeray.errors import CheckpointError
from quakeray.locks import held
from quakeray.tracking import tags
from quakeray.train.command import RUN_INFO_FILE

__all__ = ["SyncResult", "sync_run"]


@dataclass(frozen=True)
class SyncResult:
    """What a sync did."""

    run_id: str
    tracking_uri: str
    epochs_logged: list[int]  # epochs MLflow lacked
    outputs_logged: bool  # the best checkpoint's outputs and model were logged now
    status: str  # the run's status after the sync
    epochs_run: int
    epochs_planned: int

    def format(self) -> str:
        """One paragraph for the console."""
        logged = ", ".join(str(e) for e in self.epochs_logged) or "none missing"
        lines = [
            f"MLflow run {self.run_id} in {self.tracking_uri}: {self.status}",
            f"  epochs logged now  {logged}",
            f"  best outputs       {'logged now' if self.outputs_logged else 'already there'}",
            f"  epochs run         {self.epochs_run} of {self.epochs_planned}",
        ]
        return "\n".join(lines)


def sync_run(run_dir: str | Path) -> SyncResult:
    """Bring the MLflow run of a ``quakeray train`` folder up to its checkpoints.

    Raises:
        CheckpointError: Not a training run folder, or one without checkpoints.
        BusyError: A training holds the folder now (sync it when that has ended).
        TrackingError: The tracking store still does not answer.
    """
    if storage.is_remote(str(run_dir)):
        raise CheckpointError(
            f"{run_dir}: sync reads a run folder on this machine; copy it here first"
        )
    folder = Path(run_dir).expanduser().resolve()
    info_file = folder / RUN_INFO_FILE
    if not info_file.is_file():
        raise CheckpointError(
            f"{folder} is not a quakeray train run folder (no {RUN_INFO_FILE}); pass "
            "<run.storage_path>/<run name>, printed when the training started"
        )
    info = json.loads(info_file.read_text())
    uri, run_id = str(info["tracking_uri"]), str(info["run_id"])
    with held(folder, what="run folder", instead="sync it when that training has ended"):
        tracking.check_tracking(uri)
        folders = find_checkpoints(folder)
        if not folders:
            raise CheckpointError(f"{folder} holds no checkpoint; nothing to sync")
        cfg = checkpoint_config(load_checkpoint(folders[-1]), source=str(folders[-1]))
        history = read_history(folders[-1])
        logger = tracking.RunLogger(uri, run_id)
        logged_now = logger.log_epochs(
            [(int(m.get("epoch") or 0), m) for m in history], logger.logged_steps("epoch")
        )
        epochs_run = int(history[-1].get("epoch") or 0) + 1 if history else 0
        run = tracking.mlflow_client(uri).get_run(run_id)
        outputs = False
        status = run.info.status
        if epochs_run >= cfg.optim.epochs:
            best = best_checkpoint(folder, cfg.run.checkpoint_metric)
            if best is not None and run.data.tags.get(tags.BEST_CHECKPOINT) != str(best):
                from quakeray.tracking.outputs import finalize_run

                finalize_run(uri, run_id, cfg, str(best))
                outputs = True
            status = "FINISHED"
            tracking.end_run(uri, run_id, "FINISHED")
        elif status == "RUNNING":  # nobody trains here (the folder is ours): it stopped
            status = "KILLED"
            tracking.end_run(uri, run_id, "KILLED")
    return SyncResult(
        run_id=run_id,
        tracking_uri=uri,
        epochs_logged=logged_now,
        outputs_logged=outputs,
        status=status,
        epochs_run=epochs_run,
        epochs_planned=cfg.optim.epochs,
    )

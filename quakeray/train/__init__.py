"""Training one backbone with Ray Train: the command, the trainer, the worker loop.

- :mod:`.command`: ``quakeray train`` (checks, one MLflow run around one fit, the summary);
- :mod:`.trainer`: the ``TorchTrainer`` for a config, its ``fit``, its best checkpoint;
- :mod:`.loop`: the worker loop and :class:`LoopConfig`, the driver-to-worker contract;
- :mod:`.session`: what runs the loop (a Train worker, or a Tune trial's own process);
- :mod:`.parts`: what the loop builds before its first epoch; :mod:`.epoch`: one epoch;
- :mod:`.sync`: ``quakeray sync``, a run's MLflow record completed from its checkpoints.
"""

from __future__ import annotations

from quakeray.train.command import RUN_INFO_FILE, TrainSummary, run_training
from quakeray.train.loop import LoopConfig, train_loop_per_worker
from quakeray.train.trainer import best_checkpoint_path, build_trainer, fit, loop_config

__all__ = [
    "RUN_INFO_FILE",
    "LoopConfig",
    "TrainSummary",
    "best_checkpoint_path",
    "build_trainer",
    "fit",
    "loop_config",
    "run_training",
    "train_loop_per_worker",
]

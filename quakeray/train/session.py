"""Where the worker loop runs: a Ray Train worker, or a Tune trial's own process.

:func:`~quakeray.train.loop.train_loop_per_worker` is one loop for both. What differs is
behind :class:`LoopSession`: the loop's rank, world size and device; how its model is
prepared (DDP by Ray Train, or moved to the device); the checkpoint it restarts from; and
where each epoch's report goes.

- :class:`TrainSession`: inside Ray Train, a worker of a ``TorchTrainer``'s worker group
  (or Train's in-process local mode, ``scaling.num_workers=0``). Reports go to
  ``ray.train.report``; Ray persists the checkpoint and, in a search, Train's
  ``TuneReportCallback`` passes the result on to Tune.
- :class:`TuneTrialSession`: a single-worker search trial trained in the Tune trial's own
  process, no worker group (:mod:`quakeray.search.trial`). The loop persists its
  checkpoints itself and reports to ``ray.tune.report`` with the checkpoint's folder under
  the key ``TuneReportCallback`` uses, so Tune, ASHA and the search's driver see the same
  results either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from quakeray.errors import ClusterError

__all__ = ["LoopSession", "TrainSession", "TuneTrialSession", "session_for"]

CHECKPOINT_PATH_KEY = "checkpoint_path"
"""The result key of a checkpoint's folder, as Ray's ``TuneReportCallback`` names it."""


class LoopSession(Protocol):
    """What the loop needs from whatever runs it."""

    rank: int
    world: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this process's device (wrapped for data parallelism when world > 1)."""

    def restored_checkpoint(self) -> Any:
        """A context manager giving the folder of the runner's own latest checkpoint, or None."""

    def report(self, metrics: dict[str, float], *, staged: Path | None, persisted: str) -> None:
        """One epoch's result.

        Args:
            metrics: The epoch's metrics.
            staged: A checkpoint folder for the runner to persist (rank 0 only), or None.
            persisted: The folder (path or URI) of a checkpoint the loop persisted itself;
                "" when it did not.
        """


@dataclass
class TrainSession:
    """The loop as a Ray Train worker (a worker group's, or Train's local mode)."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def current(cls) -> TrainSession:
        """This worker's rank, world size and device, from Ray Train's context."""
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        return cls(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Ray's ``prepare_model``: on the worker's device, DDP-wrapped when world > 1."""
        import ray.train.torch

        prepared: torch.nn.Module = ray.train.torch.prepare_model(model)
        return prepared

    @contextmanager
    def restored_checkpoint(self) -> Iterator[str | None]:
        """Ray Train's latest checkpoint of this run (a restart, a rerun of the name)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield str(folder)

    def report(self, metrics: dict[str, float], *, staged: Path | None, persisted: str) -> None:
        """``ray.train.report``, with the staged checkpoint for Ray to persist."""
        import ray.train

        from quakeray.checkpoint import checkpoint_dir_name

        checkpoint = ray.train.Checkpoint.from_directory(str(staged)) if staged else None
        name = checkpoint_dir_name(int(metrics.get("epoch", 0)))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


@dataclass
class TuneTrialSession:
    """The loop in a Tune trial's own process: one worker, no Ray Train."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls, *, use_gpu: bool) -> TuneTrialSession:
        """The trial's device: the GPU Ray gave the trial (it sets CUDA_VISIBLE_DEVICES).

        Raises:
            ClusterError: ``use_gpu`` and this process sees no GPU (never a silent CPU run).
        """
        if not use_gpu:
            return cls(device=torch.device("cpu"))
        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
            raise ClusterError(
                f"scaling.use_gpu=true but this trial's process sees no GPU "
                f"(CUDA_VISIBLE_DEVICES={visible}); check the node's GPUs, or train the "
                "trial in a Train worker group with search.in_process_trials=false"
            )
        torch.cuda.set_device(0)
        return cls(device=torch.device("cuda", 0))

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the trial's device (one process: nothing to wrap)."""
        return model.to(self.device)

    @contextmanager
    def restored_checkpoint(self) -> Iterator[str | None]:
        """None: Tune keeps no checkpoint of ours.

        A restarted trial finds its newest checkpoint by name and passes it as the
        loop's ``resume_from`` (:func:`quakeray.train.trainer.loop_config`).
        """
        yield None

    def report(self, metrics: dict[str, float], *, staged: Path | None, persisted: str) -> None:
        """``ray.tune.report`` with the persisted checkpoint's folder, as Train's callback does."""
        from ray import tune

        result: dict[str, Any] = dict(metrics)
        if persisted:
            result[CHECKPOINT_PATH_KEY] = persisted
        tune.report(result)


def session_for(in_trial: bool, *, use_gpu: bool) -> LoopSession:
    """The session of the process the loop runs in."""
    if in_trial:
        return TuneTrialSession.current(use_gpu=use_gpu)
    return TrainSession.current()

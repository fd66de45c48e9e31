"""What a search prints while it runs, beside Tune's trial table: one line per trial epoch.

Ray forwards its processes' output (a worker's own epoch line among it) to the driver only
with ``--verbose`` (:mod:`quakeray.runtime`). By default the driver prints each epoch as
Tune receives it instead, named by its trial. Picklable: Tune saves it with the experiment
and ``Tuner.restore`` brings it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from quakeray.config import ExperimentConfig
from quakeray.runtime import is_verbose
from quakeray.search.space import trial_config
from quakeray.search.trial_spec import spec_of

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

__all__ = ["EpochLines", "trial_label"]

_SHOWN = ("epoch", "train_loss", "val_loss", "val_MAE", "val_spearman", "lr", "samples_per_s")


class EpochLines(Callback):
    """A Tune callback: ``trial 2331f2bf (paper) epoch 3/8: train_loss ...`` per result."""

    def __init__(self, base: ExperimentConfig) -> None:
        self.base = base

    def on_trial_result(
        self,
        iteration: int,
        trials: list[Trial],
        trial: Trial,
        result: dict[str, Any],
        **info: Any,
    ) -> None:
        """The epoch's line, unless Ray already forwards the worker's own (``--verbose``)."""
        if is_verbose() or not all(k in result for k in _SHOWN):
            return
        from quakeray.train.epoch import epoch_line  # torch: loaded by now, not at import

        epochs = trial_config(self.base, trial.config).optim.epochs
        print(
            f"{trial_label(trial.trial_id, trial.config)} {epoch_line(result, epochs)}", flush=True
        )


def trial_label(trial_id: str, config: Mapping[str, Any]) -> str:
    """``trial <id>``, with its reference point or what it confirms and its seed."""
    spec = spec_of(config)
    if spec.role == "confirm":
        return f"trial {trial_id} ({spec.label}, seed {config.get('optim.seed', '?')})"
    if spec.role == "reference":
        return f"trial {trial_id} ({spec.label})"
    return f"trial {trial_id}"

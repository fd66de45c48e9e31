"""A trial's identity: what quakeray adds to the settings Tune's searcher sampled.

A trial's config is its sample (dotted config fields) plus one :class:`TrialSpec` under
the one reserved key :data:`SPEC_KEY`, the way Ray's ``Repeater`` carries its
``__trial_index__``. The searchers that serve fixed points put a spec there (a reference
point, a seed-check trial); the run opener (:class:`~quakeray.search.tracker.TrialRunOpener`)
completes it once, when it opens the trial's MLflow run, and everything downstream (the
trial itself, the tracker, the console, the scheduler, the summary) reads it from there.
Tune saves it with the trial, so a restarted trial keeps its run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["SPEC_KEY", "TrialRole", "TrialSpec", "sample_of", "spec_of"]

SPEC_KEY = "__quakeray__"
"""The key of a trial's config that holds its :class:`TrialSpec`."""

TrialRole = Literal["sampled", "reference", "confirm"]


@dataclass(frozen=True)
class TrialSpec:
    """Who a trial is: its role, its label, its MLflow run and the Train folder it uses."""

    role: TrialRole = "sampled"
    label: str = ""  # the reference point (mse_only, paper) or what a seed-check trial confirms
    run_id: str = ""  # its MLflow run (set by the run opener)
    run_name: str = ""  # that run's name: also how the console names the trial
    continues: str = ""  # the trial id whose Train folder it continues ("" = its own)

    def __str__(self) -> str:
        """The run name: what Tune's own trial table shows in this column."""
        return self.run_name or self.label or self.role

    def train_folder_of(self, trial_id: str) -> str:
        """The id whose Train folder this trial trains in: its own, or the one it continues."""
        return self.continues or trial_id


def spec_of(config: Mapping[str, Any]) -> TrialSpec:
    """The spec in a trial's config (a plain sampled trial's before the opener ran)."""
    spec = config.get(SPEC_KEY)
    return spec if isinstance(spec, TrialSpec) else TrialSpec()


def sample_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial config's sampled fields: its :data:`SPEC_KEY` (and any marker) dropped.

    Config fields are dotted names of real settings and never start with an underscore;
    what a searcher adds beside them (ours, or Ray's ``__trial_index__``) always does.
    """
    return {k: v for k, v in config.items() if not k.startswith("_")}

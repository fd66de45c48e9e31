"""Hyperparameter search with Ray Tune, Optuna and ASHA, every trial an MLflow run.

One concept per module (``docs/architecture.md`` draws how they fit):

- :mod:`.command`: ``quakeray tune`` (start or resume, fit, finish);
- :mod:`.layout`: where a search lives (:class:`SearchRef`); :mod:`.state`: its state file;
- :mod:`.trial_spec`: a trial's identity (:class:`TrialSpec`, one key in its config);
- :mod:`.space`: what is searched, the reference points, the checks;
- :mod:`.searchers`, :mod:`.study`: reference points first, then TPE or a grid;
- :mod:`.scheduler`: ASHA over epochs; :mod:`.trainable`: one trial;
- :mod:`.tuner`: Tune experiments and the interrupt-aware fit;
- :mod:`.runs`, :mod:`.tracker`, :mod:`.finalizer`, :mod:`.console`: a search's MLflow
  runs and what the driver does as trials report;
- :mod:`.recovery`: what a resumed search continues;
- :mod:`.results`, :mod:`.parent_run`, :mod:`.description`: the summary and the parent run;
- :mod:`.confirm`: the seed check.
"""

from __future__ import annotations

from quakeray.search.command import run_search
from quakeray.search.layout import STATE_FILE, TRAIN_SUBDIR, SearchRef
from quakeray.search.results import SearchSummary, TrialRow
from quakeray.search.state import load_search_state

__all__ = [
    "STATE_FILE",
    "TRAIN_SUBDIR",
    "SearchRef",
    "SearchSummary",
    "TrialRow",
    "load_search_state",
    "run_search",
]

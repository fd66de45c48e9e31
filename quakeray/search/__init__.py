"""Hyperparameter search with Ray Tune, Optuna and ASHA, every trial an MLflow run.

- :mod:`.command`: ``quakeray tune`` (start or resume, fit, finish);
- :mod:`.space`: what is searched, the reference points, the checks;
- :mod:`.searchers`: the searcher chain (reference points first, then TPE or a grid);
- :mod:`.scheduler`: ASHA over epochs; :mod:`.trial`: one trial, a ``TorchTrainer`` fit;
- :mod:`.runs`, :mod:`.tracker`, :mod:`.finalizer`: the MLflow runs of a search;
- :mod:`.results`: rows, the best trial, the summary; :mod:`.state`: the folder and
  ``--resume``.
"""

from __future__ import annotations

from quakeray.search.command import run_search
from quakeray.search.results import SearchSummary, TrialRow
from quakeray.search.state import STATE_FILE, TRAIN_SUBDIR, load_search_state

__all__ = [
    "STATE_FILE",
    "TRAIN_SUBDIR",
    "SearchSummary",
    "TrialRow",
    "load_search_state",
    "run_search",
]

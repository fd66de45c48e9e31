"""MLflow tracking: the store and its runs, tag names, and what a finished run gets.

:mod:`.store` (runs, params, metrics, tags), :mod:`.tags` (their names),
:mod:`.outputs` (predictions, figures, the model).

Importing this package stays cheap (MLflow is imported on first use); :mod:`.outputs`,
which needs torch, is imported on its own.
"""

from __future__ import annotations

from quakeray.tracking import store, tags
from quakeray.tracking.store import *  # noqa: F403  (the store's API is the package's)

__all__ = [*store.__all__, "tags"]

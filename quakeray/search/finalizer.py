"""The search's finaliser: ended trials' runs are finalised on a thread beside Tune's loop.

Finalising a trial's run (its best checkpoint's predictions, figures and model) takes
seconds; on one background thread Tune's loop starts the next trial meanwhile. The
:class:`~quakeray.search.tracker.TrialRunTracker` owns one (not pickled with it: a
restored tracker starts its own), and the search waits for it before it reads or closes
runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

__all__ = ["Finalizer"]


class Finalizer:
    """One background thread that finalises and closes trial runs, in order."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pending: set[str] = set()  # run ids handed over, not yet closed

    def submit(self, run_id: str | None, work: Callable[[], None]) -> None:
        """Run ``work`` (which closes ``run_id``) on the thread (started on first use)."""

        def tracked() -> None:
            try:
                work()
            finally:
                with self._lock:
                    self._pending.discard(run_id or "")

        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="quakeray-final"
                )
            if run_id:
                self._pending.add(run_id)
            self._executor.submit(tracked)

    def wait(self) -> None:
        """Block until every run handed over is finalised and closed.

        Interrupted (a second Ctrl-C), it leaves the thread in place: the runs it still
        holds are :meth:`pending`, which the search must not close as cancelled.
        """
        with self._lock:
            executor = self._executor
        if executor is None:
            return
        executor.shutdown(wait=True)
        with self._lock:
            if self._executor is executor:
                self._executor = None

    def pending(self) -> frozenset[str]:
        """Ids of the runs the thread has yet to close."""
        with self._lock:
            return frozenset(self._pending)

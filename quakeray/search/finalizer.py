"""The search's finaliser thread: ended trials' runs are finalised off Tune's loop.

Finalising a trial's run (its best checkpoint's predictions, figures and model) takes
seconds; on this one background thread Tune's loop starts the next trial meanwhile. One
thread serves every tracker of the process, so the tracker itself stays picklable and the
search can wait for it whichever tracker instance (a fresh one, or Tune's restored copy
on ``--resume``) handed the work over.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

__all__ = ["in_background", "pending_runs", "wait_for_finalizers"]

_finalizer: ThreadPoolExecutor | None = None
_finalizer_lock = threading.Lock()
_pending_runs: set[str] = set()  # run ids handed to the finaliser, not yet closed


def in_background(run_id: str | None, work: Callable[[], None]) -> None:
    """Run ``work`` (which closes ``run_id``) on the finaliser thread (started on first use)."""
    global _finalizer

    def tracked() -> None:
        try:
            work()
        finally:
            with _finalizer_lock:
                _pending_runs.discard(run_id or "")

    with _finalizer_lock:
        if _finalizer is None:
            _finalizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quakeray-final")
        if run_id:
            _pending_runs.add(run_id)
        _finalizer.submit(tracked)


def wait_for_finalizers() -> None:
    """Block until every trial run handed to the background is finalised and closed.

    Interrupted (a second Ctrl-C), it leaves the finaliser in place: the runs it still
    holds are :func:`pending_runs`, which the search must not close as cancelled.
    """
    global _finalizer
    with _finalizer_lock:
        executor = _finalizer
    if executor is None:
        return
    executor.shutdown(wait=True)
    with _finalizer_lock:
        if _finalizer is executor:
            _finalizer = None


def pending_runs() -> frozenset[str]:
    """Ids of the runs the finaliser thread has yet to close."""
    with _finalizer_lock:
        return frozenset(_pending_runs)

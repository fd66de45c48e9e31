"""The in-process writer's finaliser thread: runs in order, known as pending until closed."""

from __future__ import annotations

import threading

from quakeray.search.finalizer import Finalizer


def test_work_runs_in_order_and_its_runs_are_pending_until_done() -> None:
    finalizer, done, release = Finalizer(), [], threading.Event()
    finalizer.submit("run-1", lambda: (release.wait(timeout=30), done.append("run-1")))
    finalizer.submit("run-2", lambda: done.append("run-2"))
    assert finalizer.pending() == {"run-1", "run-2"}  # the search must not close these
    release.set()
    finalizer.wait()
    assert done == ["run-1", "run-2"] and finalizer.pending() == frozenset()


def test_a_failing_finalisation_leaves_no_run_pending_and_the_thread_goes_on() -> None:
    finalizer, done = Finalizer(), []

    def boom() -> None:
        raise RuntimeError("store away")

    finalizer.submit("run-1", boom)
    finalizer.submit("run-2", lambda: done.append("run-2"))
    finalizer.wait()
    assert done == ["run-2"] and finalizer.pending() == frozenset()
    finalizer.submit("run-3", lambda: done.append("run-3"))  # a new thread after a wait
    finalizer.wait()
    assert done == ["run-2", "run-3"]

"""The MLflow writer of a search's trial runs, beside the driver rather than in its loop.

Everything a search writes about its trials (a run opened when the trial is suggested,
each epoch once, the best checkpoint's outputs, the end) is done by one
:class:`TrialRunWriter`. Tune's loop only sends it messages, through a handle:

- :class:`ActorWriter` (a search): the writer runs in a Ray actor on the driver's node,
  its own process, so Tune's event loop spends a message per event on MLflow instead of
  the SQL and file work itself; calls run one at a time, in the order they were sent.
- :class:`InProcessWriter` (no Ray, tests): the same writer in the driver; a trial's end
  is finalised on a :class:`~quakeray.search.finalizer.Finalizer` thread.

Either way the search waits for the writer (:meth:`wait`) before it reads or closes runs,
and leaves the runs it is still finalising (:meth:`pending`) alone. Tracking trouble never
stops a search: a failed write is a warning on the driver's console.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

import ray

from quakeray import storage, tracking
from quakeray.checkpoint import read_history
from quakeray.config import ExperimentConfig, flatten
from quakeray.search.finalizer import Finalizer
from quakeray.search.layout import SearchRef
from quakeray.search.runs import (
    CHECKPOINT_KEY,
    TrialStatus,
    close_trial_run,
    find_trial_run,
    finish_trial_run,
    open_trial_run,
    reopen_trial_run,
)
from quakeray.search.space import trial_config, trial_params, varying_fields
from quakeray.tracking.datasets import log_dataset

__all__ = ["ActorWriter", "InProcessWriter", "TrialRunWriter", "WriterHandle", "start_writer"]

log = logging.getLogger(__name__)


class TrialRunWriter:
    """Writes a search's trial runs: opened, each epoch once, finalised and closed.

    Args:
        ref: The search.
        base: The search's resolved config.
        metric_names: The epoch metrics logged (Tune's own fields stay out).
        data_path: The prepared data file: each trial's MLflow input ("" = none).
    """

    def __init__(
        self,
        ref: SearchRef,
        base: ExperimentConfig,
        metric_names: tuple[str, ...],
        data_path: str = "",
    ) -> None:
        self.ref = ref
        self.base = base
        self.metric_names = metric_names
        self.data_path = data_path
        self._logged: dict[str, set[int]] = {}  # run id -> epochs in MLflow
        self._filled: set[str] = set()  # run ids whose missed epochs were looked up

    def call(self, method: str, *args: Any) -> None:
        """Run one of the methods below by name (how a handle sends a message)."""
        getattr(self, method)(*args)

    @ray.method(concurrency_group="open")
    def open_run_at_once(
        self, trial_id: str, config: Mapping[str, Any], run_name: str, run_tags: dict[str, str]
    ) -> str:
        """:meth:`open_run` on its own thread in an actor: not behind queued writes."""
        return self.open_run(trial_id, config, run_name, run_tags)

    @ray.method(concurrency_group="open")
    def cpu_seconds(self) -> float:
        """The CPU time this writer's process has used (all its threads)."""
        return time.process_time()

    def open_run(
        self, trial_id: str, config: Mapping[str, Any], run_name: str, run_tags: dict[str, str]
    ) -> str:
        """A trial's new run: its settings, config and data. Returns the run id."""
        run_id = open_trial_run(self.ref, trial_id, run_name=run_name, extra_tags=run_tags)
        # The searched fields always: a config the sample breaks is still visible in MLflow
        # (the trial then fails on the same error, and the tracker records it).
        params = trial_params(self.base, config)
        try:
            cfg = trial_config(self.base, config)
        except Exception:
            log.debug("trial %s: its sample breaks the config", trial_id, exc_info=True)
            tracking.RunLogger(self.ref.uri, run_id).log_params(params)
        else:
            # Only what differs from the parent's settings (which hold the rest once).
            shared, varying = flatten(self.base), varying_fields(self.base)
            own = {k: v for k, v in flatten(cfg).items() if k in varying or shared.get(k) != v}
            tracking.log_config(self.ref.uri, run_id, cfg, params=params | own)
        if self.data_path:
            log_dataset(self.ref.uri, run_id, self.data_path, ["train", "validation"])
        return run_id

    def set_tags(self, run_id: str, run_tags: dict[str, str]) -> None:
        """Tags on a run (a continued trial's run changes hands)."""
        tracking.RunLogger(self.ref.uri, run_id).set_tags(run_tags)

    def reopen(self, run_id: str) -> None:
        """A trial started again: its run RUNNING again (a first start changes nothing)."""
        run = tracking.mlflow_client(self.ref.uri).get_run(run_id)
        if run.info.status != "RUNNING":  # else a first start: the opener left it running
            reopen_trial_run(self.ref.uri, run)

    @property
    def gaps_looked_up(self) -> frozenset[str]:
        """Run ids whose epochs missing from MLflow were looked up (once per run and writer)."""
        return frozenset(self._filled)

    def log_epoch(self, run_id: str, result: Mapping[str, Any]) -> None:
        """An epoch's metrics, unless MLflow has them; a gap before it filled from history."""
        logger = tracking.RunLogger(self.ref.uri, run_id)
        if run_id not in self._logged:  # first result this session: skip epochs logged before
            self._logged[run_id] = logger.logged_steps("epoch")
        logged = self._logged[run_id]
        epoch = int(result["epoch"])
        if epoch in logged:
            return
        missed: list[tuple[int, Mapping[str, Any]]] = []
        if run_id not in self._filled and any(e not in logged for e in range(epoch)):
            self._filled.add(run_id)  # one try per run and writer: a gap may be unfillable
            try:
                missed = self._history(result)
            except Exception:  # pruned, unreadable: the current epoch still gets logged
                log.warning("trial run %s: epochs before %d are missing", run_id, epoch)
        epochs = [*((e, m) for e, m in missed if e < epoch), (epoch, result)]
        logger.log_epochs(epochs, logged, keys=self.metric_names)

    def _history(self, result: Mapping[str, Any]) -> list[tuple[int, Mapping[str, Any]]]:
        """Every epoch in the history of the result's checkpoint.

        Tune never passes on the reports Train checkpointed while the driver was being
        interrupted; the resumed trial continues after them, so only its checkpoint's
        history still holds their metrics.
        """
        path = result.get(CHECKPOINT_KEY)
        if not path:
            return []
        # Only this small file, also from s3:// (a checkpoint holds the model's state).
        history = read_history(storage.with_scheme_of(str(path), self.ref.train_root))
        return [(int(m.get("epoch") or 0), m) for m in history]

    def finish(
        self,
        run_id: str,
        config: Mapping[str, Any],
        checkpoint: str | None,
        status: TrialStatus,
        trial_id: str,
    ) -> None:
        """Finalise the run from its best checkpoint, then close it ``status``."""
        finish_trial_run(
            self.ref.uri,
            run_id,
            base=self.base,
            config=config,
            checkpoint=checkpoint,
            status=status,
            trial_id=trial_id,
        )

    def fail(self, run_id: str, trial_id: str, error: str) -> None:
        """FAILED + ``failed``, with a run created for the record if the trial had none."""
        if not run_id:
            found = find_trial_run(self.ref, trial_id)
            run_id = (
                str(found.info.run_id)
                if found is not None
                else open_trial_run(self.ref, trial_id, run_name=f"trial-{trial_id}")
            )
        close_trial_run(self.ref.uri, run_id, "failed", error=error, only_if_running=True)


class WriterHandle(Protocol):
    """How the driver's run opener and tracker reach the search's writer."""

    def open_run(
        self, trial_id: str, config: Mapping[str, Any], run_name: str, run_tags: dict[str, str]
    ) -> str:
        """Open a trial's run now and return its id."""

    def send(self, trial_id: str, method: str, *args: Any) -> None:
        """Have the writer run ``method(*args)``, after everything sent before."""

    def finish(self, trial_id: str, run_id: str, *args: Any) -> None:
        """Have the writer finalise and close ``run_id`` (:meth:`TrialRunWriter.finish`)."""

    def wait(self) -> None:
        """Block until the writer has done everything sent."""

    def pending(self) -> frozenset[str]:
        """The runs the writer has yet to close."""

    def release(self) -> None:
        """Let the writer go (once everything sent is done)."""


class InProcessWriter:
    """The writer in the driver's own process; trial ends finalised on a thread."""

    def __init__(self, writer: TrialRunWriter) -> None:
        self.writer = writer
        self.finalizer = Finalizer()

    def open_run(
        self, trial_id: str, config: Mapping[str, Any], run_name: str, run_tags: dict[str, str]
    ) -> str:
        """Open a trial's run now and return its id."""
        return self.writer.open_run(trial_id, config, run_name, run_tags)

    def send(self, trial_id: str, method: str, *args: Any) -> None:
        """Run it now; a failure is a warning."""
        _guarded(trial_id, lambda: self.writer.call(method, *args))

    def finish(self, trial_id: str, run_id: str, *args: Any) -> None:
        """On the finaliser thread, so that Tune's loop starts the next trial meanwhile."""
        self.finalizer.submit(run_id, lambda: self.send(trial_id, "finish", run_id, *args))

    def wait(self) -> None:
        """Block until every run handed to the finaliser is closed."""
        self.finalizer.wait()

    def pending(self) -> frozenset[str]:
        """The runs on the finaliser thread."""
        return self.finalizer.pending()

    def release(self) -> None:
        """Nothing to let go: the finaliser thread ends when it has nothing left."""


class ActorWriter:
    """The writer in a Ray actor on the driver's node: the driver only sends messages.

    One caller (Tune's loop thread) and one call at a time in the actor: calls run in the
    order they were sent. A call's failure comes back as a warning on the driver's console
    the next time the driver looks at its calls.
    """

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self._calls: list[tuple[Any, str, str]] = []  # (ref, trial id, run id it closes)

    def open_run(
        self, trial_id: str, config: Mapping[str, Any], run_name: str, run_tags: dict[str, str]
    ) -> str:
        """Open a trial's run now (the trial's config carries its id) and return its id."""
        self._collect(block=False)
        return str(
            ray.get(self.actor.open_run_at_once.remote(trial_id, dict(config), run_name, run_tags))
        )

    def send(self, trial_id: str, method: str, *args: Any) -> None:
        """A message to the writer; the driver goes on at once."""
        self._calls.append((self.actor.call.remote(method, *args), trial_id, ""))

    def finish(self, trial_id: str, run_id: str, *args: Any) -> None:
        """A message to finalise and close ``run_id``; it is pending until done."""
        self._calls.append((self.actor.call.remote("finish", run_id, *args), trial_id, run_id))
        self._collect(block=False)

    def wait(self) -> None:
        """Block until the writer has done everything sent (a second Ctrl-C cuts it short)."""
        self._collect(block=True)

    def pending(self) -> frozenset[str]:
        """The runs whose finalisation the writer has not finished."""
        self._collect(block=False)
        return frozenset(run_id for _, _, run_id in self._calls if run_id)

    def release(self) -> None:
        """End the actor (its process and its MLflow client); its CPU time is logged."""
        try:
            cpu = ray.get(self.actor.cpu_seconds.remote())
        except ray.exceptions.RayError:  # it died: its calls said so already
            return
        log.debug("the search's MLflow writer used %.2f s of CPU", cpu)
        ray.kill(self.actor)

    def _collect(self, *, block: bool) -> None:
        """Forget the calls that are done, saying which of them failed."""
        if not self._calls:
            return
        refs = [ref for ref, _, _ in self._calls]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=None if block else 0)
        finished = set(done)
        for ref, trial_id, _ in self._calls:
            if ref in finished:
                _guarded(trial_id, lambda ref=ref: ray.get(ref))
        self._calls = [call for call in self._calls if call[0] not in finished]


def start_writer(
    ref: SearchRef, base: ExperimentConfig, metric_names: tuple[str, ...], data_path: str
) -> WriterHandle:
    """The search's writer: in a Ray actor on this node when Ray runs, else in process."""
    writer_args = (ref, base, metric_names, data_path)
    if not ray.is_initialized():
        return InProcessWriter(TrialRunWriter(*writer_args))
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: a sqlite store and a local search folder are this node's.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # Writes run one at a time, in the order they were sent; opening a run (the driver
    # waits for it) has a thread of its own, so it never queues behind a trial's end.
    remote: Any = ray.remote  # its stubs know no concurrency_groups
    actor_class = remote(concurrency_groups={"open": 1})(TrialRunWriter)
    options = {"num_cpus": 0, "scheduling_strategy": here}
    return ActorWriter(actor_class.options(**options).remote(*writer_args))


def _guarded(trial_id: str, action: Any) -> None:
    """Run ``action``; tracking trouble never stops a search."""
    try:
        action()
    except Exception:
        log.warning("MLflow tracking failed for trial %s", trial_id, exc_info=True)

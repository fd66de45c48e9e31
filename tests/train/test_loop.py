"""The worker loop in this process, world size 1, driven by a stub session instead of Ray.

``quakeray.train.loop.session_for`` is replaced by a :class:`StubSession` that records each
report: the loop's contract with whatever runs it (a Train worker group, Train's local
mode, a Tune trial's own process) is what it reports and the checkpoints it leaves.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from quakeray.checkpoint import (
    HISTORY_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    STATE_FILE,
    checkpoint_dir_name,
    find_checkpoints,
    load_checkpoint,
    read_history,
    read_metrics,
    read_predictions,
)
from quakeray.data.prepare import PreparedData
from quakeray.metrics import EPOCH_METRICS
from quakeray.train import loop
from quakeray.train.loop import LoopConfig, train_loop_per_worker
from tests.train.conftest import Interrupted, StubSession, tiny_config

CHECKPOINT_FILES = {STATE_FILE, METRICS_FILE, HISTORY_FILE, PREDICTIONS_FILE}
TIMING = {"samples_per_s"}  # the one metric a rerun does not repeat


@pytest.fixture()
def use_session(monkeypatch: pytest.MonkeyPatch) -> Callable[[StubSession], list[Any]]:
    """Make the loop run in ``session``; returns the (in_trial, use_gpu) it was asked for."""

    def use(session: StubSession) -> list[Any]:
        asked: list[Any] = []

        def session_for(in_trial: bool, *, use_gpu: bool) -> StubSession:
            asked.append((in_trial, use_gpu))
            return session

        monkeypatch.setattr(loop, "session_for", session_for)
        return asked

    return use


def _spec(prepared: PreparedData, *overrides: str, **fields: Any) -> LoopConfig:
    return LoopConfig(
        config=tiny_config(prepared, *overrides),
        data=prepared,
        tracking_uri="",  # no MLflow run: nothing logs
        **fields,
    )


def _run(
    use: Callable[[StubSession], list[Any]], spec: LoopConfig, session: StubSession
) -> StubSession:
    use(session)
    with contextlib.suppress(Interrupted):  # the process stops where the session says
        train_loop_per_worker(spec)
    return session


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = load_checkpoint(folder)["model"]
    return state


def _assert_same_history(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [m["epoch"] for m in got] == [m["epoch"] for m in want]
    for mine, theirs in zip(got, want, strict=True):
        keys = sorted(set(theirs) - TIMING)
        assert sorted(set(mine) - TIMING) == keys
        np.testing.assert_allclose(
            [mine[k] for k in keys],
            [theirs[k] for k in keys],
            rtol=1e-5,
            atol=1e-6,
            err_msg=", ".join(keys),
        )


# ---------------------------------------------------------------- what the loop reports


def test_a_trial_process_persists_each_epoch_before_reporting_it(
    prepared: PreparedData,
    tmp_path: Path,
    use_session: Callable[[StubSession], list[Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # In a Tune trial's own process nothing persists checkpoints for the loop: it writes
    # each one to checkpoint_dir and reports that folder.
    run_dir = tmp_path / "train-trial"
    spec = _spec(prepared, "run.checkpoints_to_keep=5", checkpoint_dir=str(run_dir), in_trial=True)
    assert not spec.on_driver
    session = StubSession()
    asked = use_session(session)
    train_loop_per_worker(spec)

    assert asked == [(True, False)]
    assert session.epochs == [0, 1]  # one report per epoch
    for epoch, report in enumerate(session.reports):
        assert not report.staged
        assert report.persisted == str(run_dir / checkpoint_dir_name(epoch))
        assert report.files == CHECKPOINT_FILES  # whole when reported
        assert tuple(report.metrics) == EPOCH_METRICS
        assert all(math.isfinite(v) for v in report.metrics.values())
        assert read_metrics(report.folder) == pytest.approx(report.metrics)
        assert [h["epoch"] for h in read_history(report.folder)] == list(range(epoch + 1))
        assert read_history(report.folder)[-1] == read_metrics(report.folder)
        state = load_checkpoint(report.folder)
        assert state["epoch"] == epoch and state["world_size"] == 1
        assert state["data_path"] == prepared.path
        assert len(read_predictions(report.folder / PREDICTIONS_FILE).prediction) == 19
    assert [f.name for f in find_checkpoints(run_dir)] == [
        checkpoint_dir_name(0),
        checkpoint_dir_name(1),
    ]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]


def test_local_mode_keeps_the_best_checkpoints_and_the_latest(
    prepared: PreparedData, tmp_path: Path, use_session: Callable[[StubSession], list[Any]]
) -> None:
    # Train's local mode (num_workers=0) runs in the person's process: it prunes too.
    run_dir = tmp_path / "local"
    spec = _spec(
        prepared,
        "optim.epochs=3",
        "run.checkpoints_to_keep=1",
        "run.checkpoint_metric=val_loss",
        checkpoint_dir=str(run_dir),
    )
    assert spec.on_driver
    session = _run(use_session, spec, StubSession())
    assert session.epochs == [0, 1, 2]
    assert all(r.files == CHECKPOINT_FILES for r in session.reports)  # none pruned yet then
    history = load_checkpoint(run_dir / checkpoint_dir_name(2))["history"]
    best = int(min(history, key=lambda m: m["val_loss"])["epoch"])
    kept = {f.name for f in find_checkpoints(run_dir)}
    assert kept == {checkpoint_dir_name(best), checkpoint_dir_name(2)}
    assert load_checkpoint(run_dir / checkpoint_dir_name(2))["best_epoch"] == best


def test_in_a_worker_group_the_checkpoint_is_handed_over_to_persist(
    prepared: PreparedData, tmp_path: Path, use_session: Callable[[StubSession], list[Any]]
) -> None:
    # No checkpoint_dir: Ray Train persists what the loop stages; the loop writes nothing.
    spec = _spec(prepared)
    session = _run(use_session, spec, StubSession(keep_staged=tmp_path / "persisted"))
    assert session.epochs == [0, 1]
    for report in session.reports:
        assert report.staged and report.persisted == ""
        assert report.files == CHECKPOINT_FILES
        assert read_metrics(report.folder) == pytest.approx(report.metrics)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["persisted"]


# ---------------------------------------------------------------------------------- resume


def _interrupted_and_resumed(
    prepared: PreparedData,
    tmp_path: Path,
    use: Callable[[StubSession], list[Any]],
    *overrides: str,
) -> tuple[Path, Path, StubSession]:
    """3 epochs straight; and 3 epochs stopped after 2, then resumed from the checkpoint."""
    full = tmp_path / "full"
    _run(
        use, _spec(prepared, "optim.epochs=3", *overrides, checkpoint_dir=str(full)), StubSession()
    )
    part = tmp_path / "part"
    stopped = _run(
        use,
        _spec(prepared, "optim.epochs=3", *overrides, checkpoint_dir=str(part)),
        StubSession(stop_after=2),  # killed right after its second report
    )
    assert stopped.epochs == [0, 1]
    resumed = _run(
        use,
        _spec(
            prepared,
            "optim.epochs=3",
            *overrides,
            checkpoint_dir=str(tmp_path / "resumed"),
            resume_from=str(part / checkpoint_dir_name(1)),
        ),
        StubSession(),
    )
    return full / checkpoint_dir_name(2), tmp_path / "resumed" / checkpoint_dir_name(2), resumed


def test_a_resumed_run_trains_only_what_is_left_and_ends_as_an_uninterrupted_one(
    prepared: PreparedData, tmp_path: Path, use_session: Callable[[StubSession], list[Any]]
) -> None:
    # Without random flips (no draws from the global RNG) the resumed epoch repeats the
    # uninterrupted one exactly: same weights, optimiser moments and schedule.
    full, resumed, session = _interrupted_and_resumed(
        prepared, tmp_path, use_session, "data.flips=false"
    )
    assert session.epochs == [2]  # epochs 0 and 1 came from the checkpoint
    want, got = _weights(full), _weights(resumed)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    _assert_same_history(read_history(resumed), read_history(full))
    assert load_checkpoint(resumed)["best_epoch"] == load_checkpoint(full)["best_epoch"]


def test_a_resumed_run_with_random_flips_ends_as_an_uninterrupted_one(
    prepared: PreparedData, tmp_path: Path, use_session: Callable[[StubSession], list[Any]]
) -> None:
    # The defaults (data.flips=true): what `--resume`, a restarted worker group and a
    # continued search trial all rely on.
    full, resumed, session = _interrupted_and_resumed(prepared, tmp_path, use_session)
    assert session.epochs == [2]
    _assert_same_history(read_history(resumed), read_history(full))


def test_the_runner_s_restored_checkpoint_continues_the_run(
    prepared: PreparedData, tmp_path: Path, use_session: Callable[[StubSession], list[Any]]
) -> None:
    # A worker group Ray restarts: its own latest checkpoint, whatever resume_from says.
    run_dir = tmp_path / "run"
    spec = _spec(prepared, "optim.epochs=3", "data.flips=false", checkpoint_dir=str(run_dir))
    _run(use_session, spec, StubSession(stop_after=2))
    assert [f.name for f in find_checkpoints(run_dir)] == [
        checkpoint_dir_name(0),
        checkpoint_dir_name(1),
    ]
    restarted = replace(spec, resume_from=str(run_dir / checkpoint_dir_name(0)))
    session = StubSession(restored=str(run_dir / checkpoint_dir_name(1)))
    _run(use_session, restarted, session)
    assert session.epochs == [2]
    history = read_history(run_dir / checkpoint_dir_name(2))
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[:2] == read_history(run_dir / checkpoint_dir_name(1))


def test_a_finished_run_resumed_trains_and_reports_nothing(
    prepared: PreparedData, tmp_path: Path, use_session: Callable[[StubSession], list[Any]]
) -> None:
    run_dir = tmp_path / "run"
    spec = _spec(prepared, checkpoint_dir=str(run_dir))
    _run(use_session, spec, StubSession())
    last = run_dir / checkpoint_dir_name(1)
    before = json.loads((last / METRICS_FILE).read_text())
    session = _run(use_session, replace(spec, resume_from=str(last)), StubSession())
    assert session.reports == []
    assert json.loads((last / METRICS_FILE).read_text()) == before
    assert [f.name for f in find_checkpoints(run_dir)] == [
        checkpoint_dir_name(0),
        checkpoint_dir_name(1),
    ]

"""Single-worker trials trained in the Tune trial's own process (``search.in_process_trials``).

The process is kept for the next trial (Tune's ``reuse_actors``), so a reused process must
train exactly as a fresh one, and exactly as Ray Train's one-worker group does (the old
path, still what ``in_process_trials=false`` and multi-worker trials run). A trial
process that dies (SIGKILL, as the kernel's OOM killer sends) is recorded failed in Tune
and MLflow, and the search goes on in a fresh process.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from quakeray.config import load_config
from quakeray.search import SearchSummary, run_search
from quakeray.search.runs import child_runs
from quakeray.search.trainable import trial_resources

pytestmark = pytest.mark.slow

TRIAL_PROCESS = "ImplicitFunc"  # the process title of a Tune function trial's actor


def _search(root: Path, data: Path, name: str, *extra: str) -> SearchSummary:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(
        None,
        [
            f"data.path={data}",
            f"run.storage_path={root / 'ray_results'}",
            f"tracking.uri={uri}",
            "model.backbone=test_resnet",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=0.5",
            "optim.batch_size=8",
            "tracking.log_model=false",
            f"search.name={name}",
            "search.max_concurrent=1",
            "search.reference_points=false",
            "search.asha=false",
            "search.evaluate_best=false",
            # One point only: every trial trains the same configuration.
            "search.space={loss.margin: {kind: choice, choices: [0.05]}}",
            *extra,
        ],
    )
    return run_search(cfg)


def _val_mae(summary: SearchSummary) -> list[list[float]]:
    client = MlflowClient(summary.tracking_uri)
    runs = child_runs(summary.tracking_uri, summary.experiment_id, summary.parent_run_id)
    return [
        [m.value for m in sorted(client.get_metric_history(r.info.run_id, "val_MAE"), key=_step)]
        for r in runs
    ]


def _step(metric: object) -> int:
    return int(getattr(metric, "step", 0))


def _trial_pids(summary: SearchSummary) -> set[int]:
    """The process of every trial, from the ``pid`` Tune adds to each result."""
    pids = set()
    for result in Path(summary.search_dir).glob("*/result.json"):
        pids |= {json.loads(line)["pid"] for line in result.read_text().splitlines() if line}
    return pids


def test_trials_share_a_warm_process_and_train_as_a_worker_group_does(
    ray_local: None, tiny_h5: Path, tmp_path: Path
) -> None:
    warm = _search(tmp_path, tiny_h5, "warm", "optim.epochs=2", "search.num_samples=3")
    group = _search(
        tmp_path,
        tiny_h5,
        "group",
        "optim.epochs=2",
        "search.num_samples=1",
        "search.in_process_trials=false",
    )
    assert [r.status for r in warm.rows] == ["completed"] * 3
    assert len(_trial_pids(warm)) == 1  # three trials, one process
    histories = _val_mae(warm)
    assert len(histories) == 3 and all(len(h) == 2 for h in histories)
    # The first trial ran in a fresh process, the others in the same one, reused.
    assert histories[0] == histories[1] == histories[2]
    (in_group,) = _val_mae(group)
    assert in_group == pytest.approx(histories[0], rel=1e-5)
    # Each trial kept its own checkpoints, by name, as Train's worker group does.
    for row in warm.rows:
        assert row.checkpoint and Path(row.checkpoint, "checkpoint.pt").is_file()
        assert Path(row.checkpoint).parent.name == f"train-{row.trial_id}"


def test_the_trial_process_holds_its_workers_share() -> None:
    cfg = load_config(None, ["scaling.num_workers=1", "scaling.cpus_per_worker=0.5"])
    assert trial_resources(cfg) == {"cpu": cfg.search.trial_cpus + 0.5}
    gpu = load_config(None, ["scaling.num_workers=1", "scaling.use_gpu=true"])
    assert trial_resources(gpu)["gpu"] == 1.0
    group = load_config(None, ["scaling.num_workers=2"])  # the group reserves its own
    assert trial_resources(group) == {"cpu": group.search.trial_cpus}
    off = load_config(None, ["scaling.num_workers=1", "search.in_process_trials=false"])
    assert trial_resources(off) == {"cpu": off.search.trial_cpus}


def _trial_processes() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if TRIAL_PROCESS in title:
                pids.append(int(entry.name))
    return pids


def test_a_killed_trial_process_is_recorded_failed_and_the_search_goes_on(
    ray_local: None, tiny_h5: Path, tmp_path: Path
) -> None:
    killed: list[int] = []

    def kill_the_first_trial_while_it_trains() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            training = list((tmp_path / "ray_results").glob("*/train/train-*/checkpoint_epoch_*"))
            pids = _trial_processes()
            if training and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_first_trial_while_it_trains, daemon=True)
    killer.start()
    summary = _search(tmp_path, tiny_h5, "killed", "optim.epochs=12", "search.num_samples=3")
    killer.join(timeout=10)
    assert killed, "no trial process was seen training"
    statuses = sorted(r.status for r in summary.rows)
    assert statuses == ["completed", "completed", "failed"], statuses
    client = MlflowClient(summary.tracking_uri)
    (failed,) = [r for r in summary.rows if r.status == "failed"]
    run = client.get_run(failed.run_id)
    assert run.info.status == "FAILED" and run.data.tags.get("quakeray.error")
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_failed"] == 1
    # The killed process reported its first epochs; the next two trials got a new one.
    pids = _trial_pids(summary)
    assert killed[0] in pids and len(pids) == 2

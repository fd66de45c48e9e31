"""A search driver SIGKILLed at the wrong moment, then resumed: the same end as no kill.

Real processes and real signals: ``quakeray tune`` runs in its own process, is killed
with SIGKILL when its output reaches a chosen line, and ``quakeray tune --resume`` then
finishes the search. The end state must be the uninterrupted search's: the same trials
with the same ASHA decisions (status and epochs per configuration), one MLflow run per
trial, none left RUNNING, the parent FINISHED. Tune saves no scheduler state and may
hold a trial as RUNNING whose last epoch Train had already persisted: both used to make
a resumed search fail or repeat a stopped trial.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

# 4 trials one at a time, 3 epochs, ASHA from epoch 1: in the uninterrupted search the
# two reference points and one sampled trial run 3 epochs and the other is stopped at 1.
SEARCH = [
    "--smoke-test",
    "optim.epochs=3",
    "search.num_samples=4",
    "search.asha=true",
    "search.grace_period=1",
    "search.max_concurrent=1",
]

Outcome = dict[tuple[tuple[str, str], ...], tuple[str, int]]


def _tune(root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "quakeray", "tune", *args, f"tracking.uri={_uri(root)}"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def _outcome(root: Path) -> tuple[Outcome, list[str]]:
    """Per configuration: (status, epochs in MLflow); and every problem with the runs."""
    client = MlflowClient(_uri(root))
    experiment = client.get_experiment_by_name("search")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    problems, outcome = [], {}
    parents = [r for r in runs if r.data.tags.get("quakeray.role") == "search"]
    if [p.info.status for p in parents] != ["FINISHED"]:
        problems.append(f"parent runs {[p.info.status for p in parents]}")
    for run in runs:
        if run.data.tags.get("quakeray.role") == "search":
            continue
        params = tuple(sorted((k, v) for k, v in run.data.params.items() if k.startswith("trial.")))
        epochs = [m.step for m in client.get_metric_history(run.info.run_id, "epoch")]
        if params in outcome:
            problems.append(f"two runs for {params}")
        if run.info.status == "RUNNING" or sorted(epochs) != list(range(len(epochs))):
            problems.append(f"run {run.info.run_name}: {run.info.status}, epochs {epochs}")
        outcome[params] = (run.data.tags.get("quakeray.status", "?"), len(epochs))
    return outcome, problems


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    root = tmp_path_factory.mktemp("uninterrupted")
    proc = _tune(root, *SEARCH)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    outcome, problems = _outcome(root)
    assert not problems
    assert sorted(outcome.values()) == [("completed", 3)] * 3 + [("stopped", 1)]
    return outcome


@pytest.mark.parametrize(
    ("line", "nth", "delay_s"),
    [
        # The reported case: just after a trial's last epoch, before Tune recorded its end.
        (r"epoch 3/3:", 1, 1.0),
        # Just after the epoch on which ASHA stops the fourth trial.
        (r"epoch 1/3:", 4, 0.2),
        # After the last trial ended: the driver closing runs and summarising.
        (r"completed after \d+ iterations", 4, 0.3),
    ],
    ids=["after-last-epoch", "during-asha-stop", "during-finalisation"],
)
def test_a_search_killed_at_any_moment_resumes_to_the_same_end(
    uninterrupted: Outcome, tmp_path: Path, line: str, nth: int, delay_s: float
) -> None:
    proc, seen = _tune(tmp_path, *SEARCH), 0
    assert proc.stdout is not None
    for text in proc.stdout:
        seen += bool(re.search(line, text))
        if seen == nth:
            time.sleep(delay_s)
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=600)
    assert seen == nth and proc.returncode == -signal.SIGKILL
    time.sleep(5)  # the killed driver's own Ray processes go with it
    folder = next((tmp_path / "ray_results").glob("search-*"))
    resumed = _tune(tmp_path, "--resume", str(folder))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    # The driver ends cleanly. (A trial ASHA stops while it reports its epochs again may
    # leave a Python traceback of Ray's from its own process: its thread is stopped.)
    assert "quakeray: error" not in out
    outcome, problems = _outcome(tmp_path)
    assert not problems
    assert outcome == uninterrupted
    # Nothing trained twice: one Train folder per trial. A fast trial the killed driver
    # ran (even to its end) before Tune saved its state is continued, not repeated.
    assert len(list((folder / "train").glob("train-*"))) == len(uninterrupted)

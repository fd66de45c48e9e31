"""What ``quakeray tune`` prints: Tune's table, a line per trial epoch, the summary; Ray's
own lines only with ``--verbose``, and in Ray's log files either way.

Each test runs the real command in a subprocess, as a person would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

RAY_LINES = (
    "Reporting training result",
    "Checkpoint successfully created",
    "PreemptionWatcher",
    "Started a local Ray instance",
)

pytestmark = pytest.mark.slow


def _quakeray(cwd: Path, *args: str) -> tuple[int, str, int]:
    """(exit code, stdout and stderr, pid) of ``python -m quakeray ARGS``."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "quakeray", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out, proc.pid


def test_a_search_prints_its_progress_and_summary_and_keeps_ray_in_its_logs(
    tmp_path: Path,
) -> None:
    code, out, pid = _quakeray(
        tmp_path, "tune", "-c", str(REPO / "experiments/demo.yaml"), "--smoke-test"
    )
    assert code == 0, out[-3000:]
    for line in RAY_LINES:
        assert line not in out, line
    assert "(pid=" not in out  # nothing forwarded from Ray's processes
    assert "Trial status:" in out  # Tune's table
    assert len(re.findall(r"^trial \w+ \((mse_only|paper)\) epoch [12]/2: ", out, re.M)) == 4
    for needle in ("search demo finished in", "best trial", "best config", "search folder"):
        assert needle in out, needle
    # Hidden, not lost: the driver's Ray lines and the workers' are in the session's logs.
    mine = {
        p.resolve()  # session_latest links to the session itself: one file, two paths
        for p in Path("/tmp/ray").glob(f"session_*/logs/quakeray-driver-{pid}.log")
        if str(tmp_path) in p.read_text()  # Tune's "Wrote ... experiment state to <folder>"
    }
    assert mine
    driver_log = max(mine, key=lambda p: p.stat().st_mtime)  # (pids recur across sessions)
    assert "Started a local Ray instance" in driver_log.read_text()
    logs = driver_log.parent
    worker_text = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*"))
    # The demo's single-worker trials train in the trial's own process (no Train worker).
    assert ":actor_name:search_trial" in worker_text
    assert "epoch 2/2:" in worker_text


def test_verbose_shows_rays_own_lines(tmp_path: Path) -> None:
    code, out, _ = _quakeray(
        tmp_path,
        "--verbose",
        "tune",
        "-c",
        str(REPO / "experiments/demo.yaml"),
        "--smoke-test",
        "search.num_samples=1",
        "optim.epochs=1",
    )
    assert code == 0, out[-3000:]
    assert "Started a local Ray instance" in out
    # Forwarded from the trial's process, which trains (one worker, no Train group).
    assert re.search(r"\(search_trial pid=\d+\)\S* epoch 1/1: ", out), out[-3000:]
    assert "search demo finished in" in out

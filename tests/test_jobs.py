"""Ray job submission end to end, the way the README tells users to do it.

The test starts its own Ray head (``ray start --head --block``, its own ``--temp-dir`` and
ports, dashboard on 127.0.0.1, token authentication on) and an MLflow server, then drives
everything with the ``ray job`` CLI from the repository root: a smoke-test search succeeds
and lands in MLflow, ``ray job logs`` shows its progress, ``ray job stop`` cancels a running
search without leaving RUNNING runs, a job without its dataset fails in one line, and a
client without the token is refused. Only the head started here is stopped (SIGTERM to its
``--block`` process, which takes its own processes down), never a global ``ray stop``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass
class Head:
    """A running Ray head of this test module and how to talk to it."""

    address: str  # Jobs API (dashboard) URL
    client_env: dict[str, str]  # what a job-submitting client needs: RAY_AUTH_MODE + token
    temp_dir: str

    def ray(self, *args: str, timeout: float = 600, env: dict[str, str] | None = None) -> str:
        """Run ``ray <args>`` from the repo root; returns stdout+stderr, asserts success."""
        out = subprocess.run(
            [str(BIN / "ray"), *args],
            cwd=REPO,
            env=env or self.client_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        text = out.stdout + out.stderr
        assert out.returncode == 0, f"ray {' '.join(args)} failed:\n{text[-4000:]}"
        return text

    def submit(self, job_id: str, *entrypoint: str, wait: bool) -> str:
        return self.ray(
            "job",
            "submit",
            "--address",
            self.address,
            "--submission-id",
            job_id,
            "--working-dir",
            ".",
            *([] if wait else ["--no-wait"]),
            "--",
            *entrypoint,
        )

    def status(self, job_id: str) -> str:
        from ray.job_submission import JobSubmissionClient

        token = self.client_env["RAY_AUTH_TOKEN"]
        client = JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {token}"})
        return str(client.get_job_status(job_id).value)

    def logs(self, job_id: str) -> str:
        return self.ray("job", "logs", "--address", self.address, job_id)


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the venv, as if activated
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    token = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="qr-jobs-")  # short: Ray's socket paths have a limit
    dashboard = free_port()
    env = _base_env() | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        # `ray job stop` sends SIGINT (Tune's graceful stop) and waits for the search to close
        # its MLflow runs before any SIGKILL; cluster.yaml sets the same.
        "RAY_JOB_STOP_SIGNAL": "SIGINT",
        "RAY_JOB_STOP_WAIT_TIME_S": "60",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180",
        # Ray's memory monitor kills *our* workers when the shared test machine as a whole is
        # above 95% RAM, whoever uses it; leave memory pressure to the kernel here.
        "RAY_memory_monitor_refresh_ms": "0",
        "RAY_TRAIN_V2_ENABLED": "1",
        "HF_HUB_OFFLINE": "1",
    }
    log = open(Path(temp_dir) / "ray_start.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--port",
            str(free_port()),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard),
            "--include-dashboard",
            "true",
            "--num-cpus",
            "4",
            "--temp-dir",
            temp_dir,
            "--ray-client-server-port",
            str(free_port()),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    client_env = _base_env() | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    try:
        deadline = time.monotonic() + 180
        auth = {"Authorization": f"Bearer {token}"}
        while True:
            assert proc.poll() is None, (Path(temp_dir) / "ray_start.log").read_text()
            try:
                if requests.get(f"{address}/api/version", headers=auth, timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the Ray head did not answer within 180 s"
            time.sleep(0.5)
        yield Head(address, client_env, temp_dir)
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: the head stops the processes it started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session)
        log.close()
        _kill_leftovers(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)  # session logs of this head only


def _kill_leftovers(temp_dir: str) -> None:
    """SIGKILL any process still naming this head's temp dir (its own workers, nothing else)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if temp_dir in cmdline and int(pid) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _runs(uri: str, experiment: str) -> list[object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else list(client.search_runs([exp.experiment_id]))


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(2)


# --------------------------------------------------------------------------- tests


def test_client_without_the_token_is_refused(head: Head) -> None:
    assert requests.get(f"{head.address}/api/jobs/", timeout=10).status_code == 401
    out = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", head.address],
        cwd=REPO,
        env=_base_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "token" in (out.stdout + out.stderr).lower()


def test_search_job_succeeds_logs_progress_and_lands_in_mlflow(
    head: Head, mlflow_server: str, tmp_path: Path
) -> None:
    job = f"qr-smoke-{uuid.uuid4().hex[:8]}"
    name = f"jobsmoke{uuid.uuid4().hex[:6]}"
    head.submit(
        job,
        "python",
        "-m",
        "quakeray",
        "tune",
        "-c",
        "experiments/demo.yaml",
        "--smoke-test",
        f"tracking.uri={mlflow_server}",
        f"run.storage_path={tmp_path / 'results'}",
        f"search.name={name}",
        wait=True,
    )
    assert head.status(job) == "SUCCEEDED", head.logs(job)[-4000:]

    logs = head.logs(job)
    assert "resolved config" in logs
    assert "epoch 2/2" in logs  # rank 0's per-epoch progress reached the job log
    assert "MLflow parent run" in logs

    runs = _runs(mlflow_server, name)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all("val_MAE" in r.data.metrics for r in children)


@pytest.mark.timeout(900)  # a worker group can take minutes to start on a loaded 2-core box
def test_job_stop_cancels_a_running_search_cleanly(
    head: Head, mlflow_server: str, tmp_path: Path
) -> None:
    job = f"qr-stop-{uuid.uuid4().hex[:8]}"
    name = f"jobstop{uuid.uuid4().hex[:6]}"
    head.submit(
        job,
        "python",
        "-m",
        "quakeray",
        "tune",
        "-c",
        "experiments/demo.yaml",
        "--smoke-test",
        "optim.epochs=20",  # long enough to be stopped mid-trial
        "search.asha=false",
        f"tracking.uri={mlflow_server}",
        f"run.storage_path={tmp_path / 'results'}",
        f"search.name={name}",
        wait=False,
    )

    def trial_running() -> bool:
        children = [r for r in _runs(mlflow_server, name) if "mlflow.parentRunId" in r.data.tags]
        return any(r.info.status == "RUNNING" and "val_MAE" in r.data.metrics for r in children)

    _wait_for(trial_running, 480, "a trial to log its first epoch")
    head.ray("job", "stop", "--address", head.address, job, timeout=180)
    _wait_for(lambda: head.status(job) == "STOPPED", 120, "the job to stop")

    def all_closed() -> bool:
        return all(r.info.status != "RUNNING" for r in _runs(mlflow_server, name))

    # The driver closes the runs before it exits; allow the server a moment.
    _wait_for(all_closed, 30, "no RUNNING MLflow runs")
    runs = _runs(mlflow_server, name)
    assert runs and {r.info.status for r in runs} <= {"KILLED", "FINISHED"}
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "KILLED"


def test_job_without_the_dataset_fails_before_training(head: Head) -> None:
    job = f"qr-nodata-{uuid.uuid4().hex[:8]}"
    out = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            head.address,
            "--submission-id",
            job,
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "quakeray",
            "train",
            "--smoke-test",
            "data.path=/data/quakeset/earthquakes.h5",
        ],
        cwd=REPO,
        env=head.client_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert head.status(job) == "FAILED"
    logs = head.logs(job)
    errors = [line for line in logs.splitlines() if line.startswith("quakeray: error:")]
    assert len(errors) == 1 and "/data/quakeset/earthquakes.h5" in errors[0], logs[-3000:]
    assert "Traceback" not in logs
    assert "epoch 1/" not in logs  # nothing trained

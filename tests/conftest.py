"""Shared fixtures: real generated HDF5 files, a real local Ray, real MLflow stores.

Everything here is the real thing at a small size: files from the project's own
generator, ``ray.init(address="local")`` with a few logical CPUs, a sqlite MLflow store,
and an ``mlflow server`` on 127.0.0.1 for HTTP tracking tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Ray reads these at start-up: no usage reporting, and room for a worker group to start on
# a loaded 2-core CI machine (the default 60 s is reached under load).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Tests never reach the internet: timm / huggingface must not try the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated QuakeSet-format file (24 events, 32 px), shared by the session.

    Treat it as read-only; copy it when a test needs to modify a file.
    """
    from quakeray.data.synthetic import write_synthetic

    path = tmp_path_factory.mktemp("quakeset") / "earthquakes.h5"
    return write_synthetic(path, events=24, size=32, seed=0)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A real local Ray with 4 logical CPUs and the dashboard, shared per test module.

    The dashboard is needed: without it Train V2 cannot remove the placement group of a
    stopped trial and the next trial waits for workers until it times out.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        object_store_memory=256 * 1024**2,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture()
def mlflow_uri(tmp_path: Path) -> str:
    """An absolute sqlite tracking URI in a fresh temp dir (one store per test)."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 that a test can stop and start again.

    The store (sqlite) and the artifacts live under ``root``, so a restarted server
    serves the same runs: the outage tests kill it mid-run and bring it back.
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120.0) -> MlflowServer:
        """Start it and wait until ``/health`` answers."""
        import requests

        mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(
            [
                mlflow_bin,
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.root / 'server.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stop() kills its workers too
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                log_text = (self.root / "server.log").read_text()
                raise RuntimeError(f"mlflow server exited: {log_text}")
            try:
                if requests.get(f"{self.uri}/health", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer /health within {timeout_s} s")
            time.sleep(0.25)

    def stop(self, *, kill: bool = False) -> None:
        """Terminate (or SIGKILL) the server and its workers, and wait for them."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 and a free port; yields its http:// URI."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    try:
        yield server.uri
    finally:
        server.stop()


@dataclass
class S3Server:
    """A real S3 API (``moto_server``) on 127.0.0.1 and one bucket in it."""

    endpoint: str  # host:port
    bucket: str

    def uri(self, key: str) -> str:
        """``s3://bucket/key``: pyarrow (and so Ray) find the server by ``AWS_ENDPOINT_URL``."""
        return f"s3://{self.bucket}/{key}"

    def upload(self, local: Path, key: str) -> str:
        """Copy a local file into the bucket; returns its URI."""
        from pyarrow.fs import FileSystem

        uri = self.uri(key)
        fs, inner = FileSystem.from_uri(uri)
        with fs.open_output_stream(inner) as out:
            out.write(local.read_bytes())
        return uri


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """``moto_server`` on a free loopback port; the environment points S3 clients at it.

    ``AWS_ENDPOINT_URL`` and fake credentials are set for the rest of the session, so a Ray
    started after this fixture (its workers inherit the environment) reaches it too: a test
    module that needs both asks for ``s3_server`` before ``ray_local``.
    """
    import requests
    from pyarrow.fs import FileSystem

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        os.environ.setdefault(key, value)
    port = free_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    server_bin = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen(
        [server_bin, "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/moto-api/", timeout=2).ok:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("moto_server did not start")
        time.sleep(0.2)
    server = S3Server(f"127.0.0.1:{port}", "quakeray-test")
    fs, _ = FileSystem.from_uri(server.uri("x") + "?allow_bucket_creation=true")
    fs.create_dir(server.bucket)
    try:
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        os.environ.pop("AWS_ENDPOINT_URL", None)

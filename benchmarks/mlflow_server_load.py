"""MLflow server under a search's load: sqlite against PostgreSQL behind ``--workers 4``.

``cluster.yaml`` runs one ``mlflow server --workers 4`` on the head for every job. This
starts that server for real on 127.0.0.1 (a free port; uvicorn, as ``mlflow server`` runs
it; artifacts proxied by the server, ``--serve-artifacts``, into a temporary folder) with
each backend store in turn:

- **sqlite**: a fresh ``mlflow.db`` in a temporary folder (what ``cluster.yaml`` had);
- **postgres**: a throwaway PostgreSQL cluster (Debian's package, ``apt-get install -y
  postgresql`` when it is missing; ``initdb`` + ``pg_ctl`` in a temporary folder, a free
  port, trust auth on loopback only, run as the ``postgres`` user when we are root), one
  fresh database per case, reached through ``psycopg2``.

Against each, ``--clients`` processes (default 32: a 64-trial search's runs at once, or
several jobs) each open their own ``MlflowClient``, wait at a barrier, then all at once:
create a run (child of one parent run), log 8 params in one ``log_batch`` and 2 tags, then
per epoch 10 metrics in one ``log_batch`` (as ``quakeray``'s ``RunLogger.log_metrics``) plus
2 single ``log_metric`` calls, then a 2 KB ``log_text`` and a 32 KB ``log_artifact``, and
end the run. Epochs follow each other without a pause (``--epoch-interval`` adds one): a
burst, harsher than real epochs of seconds to minutes.

Measured per case: every HTTP request the clients send (timed around
``requests.Session.request``, so one figure per request including any retries inside it)
with its status; errors per client call, by kind ('database is locked', HTTP 5xx,
timeouts, connection errors, ...); then every run is read back (``get_metric_history`` per
key, ``list_artifacts``, run status) by a client with MLflow's default retries, and the
metric points stored are compared with those logged: lost = logged - stored (distinct
(key, step)), duplicated = stored rows beyond one per (key, step). The server's log is
searched for 'database is locked' and tracebacks.

Client retries are explicit (``--retries``, one case per value): ``0`` sets
``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` so every failure reaches the caller; ``default``
unsets it (MLflow's 7 retries with exponential backoff, factor 2), which hides transient
errors behind latency. ``MLFLOW_HTTP_REQUEST_TIMEOUT`` is ``--timeout`` (120 s, MLflow's
default) in both.

Prints a table and writes ``benchmarks/results/mlflow_server_load.json`` (``--output``).
PostgreSQL needs ``psycopg2`` in this venv: ``.venv/bin/pip install psycopg2-binary``.

    .venv/bin/python benchmarks/mlflow_server_load.py                     # ~4 min on 2 cores
    .venv/bin/python benchmarks/mlflow_server_load.py --clients 64 --no-save
    .venv/bin/python benchmarks/mlflow_server_load.py --backends sqlite --retries 0 default
    .venv/bin/python benchmarks/mlflow_server_load.py --smoke-test        # ~1 min
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no calls out, in any process

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "mlflow_server_load.json"
MLFLOW = str(Path(sys.executable).with_name("mlflow"))

SERVER_WORKERS = 4  # cluster.yaml's --workers
BATCH_METRICS = (  # one log_batch per epoch, as a trainer logs its epoch
    "train_loss",
    "train_MAE",
    "val_loss",
    "val_MAE",
    "val_RMSE",
    "val_spearman",
    "val_kendall",
    "val_rank_acc",
    "val_detection_acc",
    "epoch",
)
SINGLE_METRICS = ("lr", "epoch_time_s")  # one log_metric call each per epoch
PARAMS = 8
ARTIFACTS = {"config.yaml": 2 * 1024, "summary.bin": 32 * 1024}  # name: bytes
HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


# --------------------------------------------------------------------------- clients


def _op(method: str, url: str) -> str:
    """A short name for an HTTP request: ``runs/log-batch``, ``artifacts PUT``."""
    path = url.split("://", 1)[-1].split("/", 1)[-1].split("?")[0]
    if "mlflow-artifacts/artifacts" in path:
        return f"artifacts {method}"
    parts = path.split("/")
    return "/".join(parts[-2:]) if "mlflow" in parts else path


def error_kind(exc: BaseException) -> str:
    """What a failed client call ran into, in a few words."""
    text = str(exc)
    low = text.lower()
    if "database is locked" in low:
        return "database is locked"
    if "queuepool limit" in low:  # the server's connections all wait on the database
        return "server DB pool exhausted (HTTP 400)"
    for code in ("500", "502", "503", "504"):
        if f"too many {code} error responses" in low:  # urllib3, retries used up
            return f"HTTP {code}"
    if "timed out" in low or "timeout" in type(exc).__name__.lower() or "Read timed" in text:
        return "timeout"
    for code in ("500", "502", "503", "504"):
        if f"status code {code}" in low or f"error code {code}" in low or f"({code})" in text:
            return f"HTTP {code}"
    if "TEMPORARILY_UNAVAILABLE" in text:
        return "HTTP 503"
    if "INTERNAL_ERROR" in text:
        return "HTTP 500"
    if "connection" in low or "max retries exceeded" in low:
        return "connection error"
    return type(exc).__name__


def client_main(
    index: int,
    uri: str,
    experiment_id: str,
    parent_run_id: str,
    epochs: int,
    epoch_interval: float,
    env: dict[str, str | None],
    barrier: Any,
    out: Any,
) -> None:
    """One trial's logging, start to end; puts its records on ``out``."""
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (MLflow prints a link per run)
    import requests
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    requests_log: list[tuple[str, float, str]] = []  # (op, ms, status or exception name)
    original = requests.Session.request

    def timed(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            response = original(self, method, url, *args, **kwargs)
        except Exception as exc:
            if url.startswith(uri):
                requests_log.append((_op(method, url), _ms(t0), type(exc).__name__))
            raise
        if url.startswith(uri):  # the server's requests only
            requests_log.append((_op(method, url), _ms(t0), str(response.status_code)))
        return response

    requests.Session.request = timed  # type: ignore[method-assign]
    client = MlflowClient(tracking_uri=uri)
    errors: list[tuple[str, str, str]] = []  # (call, kind, message)
    failed_points = 0

    def call(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            text = str(exc)  # its head (the request) and its tail (the cause)
            text = text if len(text) <= 400 else f"{text[:150]} ... {text[-250:]}"
            errors.append((name, error_kind(exc), text))
            return None

    scratch = Path(tempfile.mkdtemp(prefix=f"qr-mlflow-client-{index}-"))
    blob = scratch / "summary.bin"
    blob.write_bytes(os.urandom(ARTIFACTS["summary.bin"]))
    config_text = "".join(f"key_{i}: value_{i}_{index}\n" for i in range(110))[
        : ARTIFACTS["config.yaml"]
    ]
    barrier.wait()
    t_start = time.perf_counter()
    run = call(
        "create_run",
        client.create_run,
        experiment_id,
        run_name=f"trial-{index:03d}",
        tags={"mlflow.parentRunId": parent_run_id},
    )
    run_id = run.info.run_id if run is not None else None
    if run_id is not None:
        params = [Param(f"param_{i}", f"{index}.{i}") for i in range(PARAMS)]
        call("log_batch(params)", client.log_batch, run_id, params=params)
        call("set_tag", client.set_tag, run_id, "trial_id", str(index))
        call("set_tag", client.set_tag, run_id, "status", "running")
        for epoch in range(epochs):
            now = int(time.time() * 1000)
            batch = [
                Metric(key, float(index + epoch + k / 10), now, epoch)
                for k, key in enumerate(BATCH_METRICS)
            ]
            n_errors = len(errors)
            call("log_batch(metrics)", client.log_batch, run_id, metrics=batch)
            failed_points += len(batch) * (len(errors) - n_errors)
            for key in SINGLE_METRICS:
                n_errors = len(errors)
                call("log_metric", client.log_metric, run_id, key, 0.1 * epoch, step=epoch)
                failed_points += len(errors) - n_errors
            if epoch_interval:
                time.sleep(epoch_interval)
        call("log_text", client.log_text, run_id, config_text, "config.yaml")
        call("log_artifact", client.log_artifact, run_id, str(blob))
        call("set_terminated", client.set_terminated, run_id, "FINISHED")
    else:
        failed_points = epochs * (len(BATCH_METRICS) + len(SINGLE_METRICS))
    shutil.rmtree(scratch, ignore_errors=True)
    out.put(
        {
            "index": index,
            "run_id": run_id,
            "seconds": time.perf_counter() - t_start,
            "requests": requests_log,
            "errors": errors,
            "points_in_failed_calls": failed_points,
        }
    )


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before answering")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, log: Path) -> Iterator[str]:
    """``mlflow server --workers 4`` on a free loopback port; stopped (its whole group) after."""
    port = free_port()
    cmd = [
        MLFLOW,
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(artifacts),
        "--workers",
        str(SERVER_WORKERS),
    ]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MLFLOW_") or k == "MLFLOW_DISABLE_TELEMETRY"
    }
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        uri = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{uri}/health", 180, proc)
        except (RuntimeError, TimeoutError):
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"mlflow server on {backend_uri} did not start:\n{tail}") from None
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def warm_up(uri: str, concurrent: int = 16, rounds: int = 4) -> float:
    """Seconds until every server worker has opened its store (its first request is slow).

    Each uvicorn worker builds its tracking store on its first request (for PostgreSQL:
    connect, check the schema): seconds on this machine, once per server start. A
    long-running server has paid it, so it is paid here before the clients start.
    """
    from concurrent.futures import ThreadPoolExecutor

    url = f"{uri}/api/2.0/mlflow/experiments/get?experiment_id=0"

    def get(_: int) -> float:
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=120) as response:
            response.read()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrent) as pool:
        for i in itertools.count():  # until a round answers within 1 s, 2 min at most
            slowest = max(pool.map(get, range(concurrent)))
            if (i + 1 >= rounds and slowest < 1.0) or time.perf_counter() - t0 > 120:
                break
    return time.perf_counter() - t0


def pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    return Path(dirs[-1]) if dirs else None


def ensure_postgres() -> Path:
    """The PostgreSQL binaries' folder; installs Debian's package when it is missing."""
    bindir = pg_bindir()
    if bindir is None:
        if os.geteuid() != 0:
            raise RuntimeError("PostgreSQL is missing: apt-get install -y postgresql (as root)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], check=True, env=env)
        bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL installed, but no pg_ctl found")
    return bindir


class Postgres:
    """A throwaway PostgreSQL cluster on a free loopback port (trust auth, loopback only)."""

    def __init__(self) -> None:
        try:
            import psycopg2  # noqa: F401  (the server's driver, from this venv)
        except ImportError:
            hint = "psycopg2 is missing: .venv/bin/pip install psycopg2-binary"
            raise RuntimeError(hint) from None
        self.bindir = ensure_postgres()
        self.root = Path(tempfile.mkdtemp(prefix="qr-mlflow-load-pg-"))  # its own, chowned
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # postgres refuses to run as root
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.started = False

    def _run(self, *args: str) -> str:
        out = subprocess.run(
            [*self.as_user, *args], capture_output=True, text=True, check=False, cwd="/"
        )
        if out.returncode:
            raise RuntimeError(f"{' '.join(args)}: {out.stderr.strip() or out.stdout.strip()}")
        return out.stdout

    def start(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self.started = True
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "server.log"),
            "-w",
            "start",
        )

    def create_db(self, name: str) -> str:
        self._run(
            str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
            "postgres", name,
        )  # fmt: skip
        # The driver named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3.
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def settings(self) -> dict[str, str]:
        query = "SHOW max_connections; SHOW shared_buffers; SHOW synchronous_commit;"
        out = self._run(
            str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
            "postgres", "-At", "-c", query,
        )  # fmt: skip
        names = ("max_connections", "shared_buffers", "synchronous_commit")
        return dict(zip(names, out.split(), strict=True))

    def version(self) -> str:
        return subprocess.run(
            [str(self.bindir / "postgres"), "--version"], capture_output=True, text=True
        ).stdout.strip()

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(RuntimeError):
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------- one case


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def latency(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": percentile(values, 50),
        "p99_ms": percentile(values, 99),
        "max_ms": max(values) if values else float("nan"),
    }


def client_env(retries: str, timeout: int) -> dict[str, str | None]:
    env: dict[str, str | None] = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = None if retries == "default" else retries
    env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = None  # MLflow's default (2) either way
    return env


def run_case(
    backend: str,
    backend_uri: str,
    root: Path,
    *,
    clients: int,
    epochs: int,
    epoch_interval: float,
    retries: str,
    timeout: int,
) -> dict[str, Any]:
    """Start the server on ``backend_uri``, load it, read everything back, stop it."""
    from mlflow import MlflowClient

    tag = f"{backend}-r{retries}"
    artifacts = root / f"artifacts-{tag}"
    artifacts.mkdir()
    log = root / f"server-{tag}.log"
    with mlflow_server(backend_uri, artifacts, log) as uri:
        warm_s = warm_up(uri)
        setup = MlflowClient(tracking_uri=uri)
        experiment_id = setup.create_experiment(f"load-{tag}")
        parent = setup.create_run(experiment_id, run_name="search").info.run_id
        ctx = mp.get_context("forkserver")  # clients fork from one process that imported MLflow
        ctx.set_forkserver_preload(["mlflow", "mlflow.entities", "requests"])
        barrier = ctx.Barrier(clients + 1)
        out = ctx.Queue()
        env = client_env(retries, timeout)
        procs = [
            ctx.Process(
                target=client_main,
                args=(i, uri, experiment_id, parent, epochs, epoch_interval, env, barrier, out),
            )
            for i in range(clients)
        ]
        for p in procs:
            p.start()
        try:
            barrier.wait(timeout=600)  # every client has imported MLflow and made its client
            t0 = time.perf_counter()
            results = collect(out, procs)
            wall = time.perf_counter() - t0
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
        readback = read_back(setup, [r["run_id"] for r in results if r["run_id"]], epochs)
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            setup.set_terminated(parent, "FINISHED")
    server_log = log.read_text(errors="replace")
    case = summarise(
        backend, retries, results, readback, wall, server_log, clients=clients, epochs=epochs
    )
    return {**case, "server_warm_up_s": warm_s}


def collect(out: Any, procs: list[Any]) -> list[dict[str, Any]]:
    """Every client's record; a client that died without one counts as all lost."""
    import queue

    results: list[dict[str, Any]] = []
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=5))
        except queue.Empty:
            if all(not p.is_alive() for p in procs):
                try:
                    results.append(out.get(timeout=5))
                except queue.Empty:
                    break
    for index in sorted(set(range(len(procs))) - {r["index"] for r in results}):
        results.append(
            {
                "index": index,
                "run_id": None,
                "seconds": float("nan"),
                "requests": [],
                "errors": [("client", "client process died", "no record")],
                "points_in_failed_calls": 0,
            }
        )
    return results


def read_back(client: Any, run_ids: list[str], epochs: int) -> dict[str, Any]:
    """What the store holds for each run: points per (key, step), artifacts, status."""
    stored = duplicated = artifacts = finished = params = 0
    for run_id in run_ids:
        for key in BATCH_METRICS + SINGLE_METRICS:
            history = client.get_metric_history(run_id, key)
            steps = [m.step for m in history]
            stored += len(set(steps) & set(range(epochs)))
            duplicated += len(steps) - len(set(steps))
        artifacts += len({f.path for f in client.list_artifacts(run_id)} & set(ARTIFACTS))
        run = client.get_run(run_id)
        finished += run.info.status == "FINISHED"
        params += sum(key.startswith("param_") for key in run.data.params)
    return {
        "stored": stored,
        "duplicated": duplicated,
        "artifacts": artifacts,
        "finished": finished,
        "params": params,
    }


def summarise(
    backend: str,
    retries: str,
    results: list[dict[str, Any]],
    readback: dict[str, Any],
    wall: float,
    server_log: str,
    *,
    clients: int,
    epochs: int,
) -> dict[str, Any]:
    requests_log = [r for res in results for r in res["requests"]]
    ms = [r[1] for r in requests_log]
    by_op: dict[str, list[float]] = {}
    for op, t, _ in requests_log:
        by_op.setdefault(op, []).append(t)
    errors = [e for res in results for e in res["errors"]]
    kinds = Counter(e[1] for e in errors)
    examples = {}
    for _, kind, message in errors:
        examples.setdefault(kind, message)
    expected = clients * epochs * (len(BATCH_METRICS) + len(SINGLE_METRICS))
    return {
        "backend": backend,
        "client_retries": retries,
        "clients": clients,
        "epochs": epochs,
        "runs_created": sum(1 for res in results if res["run_id"]),
        "runs_finished": readback["finished"],
        "wall_s": wall,
        "client_seconds_max": max(res["seconds"] for res in results),
        "requests": len(requests_log),
        "requests_per_s": len(requests_log) / wall,
        "http_status": dict(Counter(r[2] for r in requests_log)),
        "http_non_200_by_op": dict(
            Counter(f"{r[0]} {r[2]}" for r in requests_log if r[2] not in ("200", "201", "204"))
        ),
        "latency": latency(ms),
        "latency_by_op": {op: latency(v) for op, v in sorted(by_op.items())},
        "calls_failed": len(errors),
        "errors_by_kind": dict(kinds),
        "errors_by_call": dict(Counter(e[0] for e in errors)),
        "error_examples": examples,
        "points_expected": expected,
        "points_stored": readback["stored"],
        "points_lost": expected - readback["stored"],
        "points_duplicated": readback["duplicated"],
        "points_in_failed_calls": sum(res["points_in_failed_calls"] for res in results),
        "params_expected": clients * PARAMS,
        "params_stored": readback["params"],
        "artifacts_expected": clients * len(ARTIFACTS),
        "artifacts_stored": readback["artifacts"],
        "server_log": {
            "database is locked": server_log.count("database is locked"),
            "Traceback": server_log.count("Traceback"),
            "OperationalError": server_log.count("OperationalError"),
        },
    }


# --------------------------------------------------------------------------- main


def versions(pg: Postgres | None) -> dict[str, str]:
    import mlflow
    import sqlalchemy
    import uvicorn

    found = {
        "python": platform.python_version(),
        "mlflow": mlflow.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "uvicorn": uvicorn.__version__,
        "sqlite": sqlite3.sqlite_version,
    }
    with contextlib.suppress(ImportError):
        import psycopg2

        found["psycopg2"] = psycopg2.__version__.split()[0]
    if pg is not None:
        found["postgres"] = pg.version()
    return found


def print_table(cases: list[dict[str, Any]]) -> None:
    head = (
        f"{'backend':<9} {'retries':>7} {'clients':>7} {'requests':>8} {'req/s':>6} "
        f"{'p50 ms':>7} {'p99 ms':>8} {'max ms':>8} {'failed calls':>12} "
        f"{'points lost':>14} {'dup':>4} {'runs':>7} {'params':>9} {'artifacts':>9} {'wall s':>6}"
    )
    print("\n" + head)
    print("-" * len(head))
    for c in cases:
        lat = c["latency"]
        print(
            f"{c['backend']:<9} {c['client_retries']:>7} {c['clients']:>7} {c['requests']:>8} "
            f"{c['requests_per_s']:>6.0f} {lat['p50_ms']:>7.0f} {lat['p99_ms']:>8.0f} "
            f"{lat['max_ms']:>8.0f} {c['calls_failed']:>12} "
            f"{c['points_lost']:>5}/{c['points_expected']:<8} {c['points_duplicated']:>4} "
            f"{c['runs_finished']:>3}/{c['clients']:<3} "
            f"{c['params_stored']:>4}/{c['params_expected']:<4} "
            f"{c['artifacts_stored']:>4}/{c['artifacts_expected']:<4} {c['wall_s']:>6.0f}"
        )
    for c in cases:
        if c["errors_by_kind"]:
            print(f"  {c['backend']} (retries {c['client_retries']}) errors: {c['errors_by_kind']}")
            for kind, message in c["error_examples"].items():
                print(f"    {kind}: {message[:160]}")
        print(
            f"  {c['backend']} (retries {c['client_retries']}) server log: {c['server_log']}; "
            f"HTTP statuses {c['http_status']}; not OK: {c['http_non_200_by_op']}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent client processes")
    parser.add_argument("--epochs", type=int, default=10, help="epochs logged per run")
    parser.add_argument(
        "--epoch-interval", type=float, default=0.0, help="seconds between epochs (0: a burst)"
    )
    parser.add_argument(
        "--backends", nargs="+", choices=("sqlite", "postgres"), default=["sqlite", "postgres"]
    )
    parser.add_argument(
        "--retries",
        nargs="+",
        default=["0"],
        help="MLFLOW_HTTP_REQUEST_MAX_RETRIES per case: an integer, or 'default' (7)",
    )
    parser.add_argument(
        "--timeout", type=int, default=120, help="MLFLOW_HTTP_REQUEST_TIMEOUT, seconds"
    )
    parser.add_argument("--smoke-test", action="store_true", help="4 clients, 2 epochs")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()
    if args.smoke_test:
        args.clients, args.epochs = 4, 2
    for value in args.retries:
        if value != "default" and not value.isdigit():
            parser.error(f"--retries: {value!r} is neither an integer nor 'default'")

    root = Path(tempfile.mkdtemp(prefix="qr-mlflow-load-"))
    pg: Postgres | None = None
    cases: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    try:
        if "postgres" in args.backends:
            pg = Postgres()
            pg.start()
        for retries in args.retries:
            for backend in args.backends:
                if backend == "sqlite":
                    uri = f"sqlite:///{root / f'mlflow-r{retries}.db'}"
                else:
                    assert pg is not None
                    uri = pg.create_db(f"mlflow_r{retries}")
                print(f"{backend}, retries {retries}: {args.clients} clients ...", flush=True)
                case = run_case(
                    backend,
                    uri,
                    root,
                    clients=args.clients,
                    epochs=args.epochs,
                    epoch_interval=args.epoch_interval,
                    retries=retries,
                    timeout=args.timeout,
                )
                cases.append(case)
                print_table([case])
        figures = {
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "accelerator": "none (loopback only; the server and clients share the CPUs)",
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "versions": versions(pg),
            "postgres_settings": pg.settings() if pg is not None else None,
            "parameters": {
                "server": f"mlflow server --workers {SERVER_WORKERS} (uvicorn), "
                "--artifacts-destination <tmp>, --serve-artifacts (default)",
                "clients": args.clients,
                "epochs": args.epochs,
                "epoch_interval_s": args.epoch_interval,
                "metrics_per_epoch": {
                    "log_batch": len(BATCH_METRICS),
                    "log_metric": len(SINGLE_METRICS),
                },
                "params_per_run": PARAMS,
                "artifacts_per_run": ARTIFACTS,
                "client_env": {
                    r: client_env(r, args.timeout) for r in args.retries
                },  # None: unset, MLflow's default
            },
            "cases": cases,
        }
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    print_table(cases)
    if not args.smoke_test and not args.no_save:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(figures, indent=1))
        print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

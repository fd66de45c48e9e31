"""A search driver that scales: its CPU time per trial over a search of 200 tiny trials.

Two cases, each a search of ``--trials`` trials, two at a time, on a fresh local Ray of 3
logical CPUs (its own ``ray.init`` / ``ray.shutdown`` and temporary folder), interleaved
over ``--rounds`` rounds (quakeray, bare, quakeray, bare, ...):

- **quakeray**: one ``quakeray.search.run_search`` of tiny trials (test_resnet, 32 px, one
  epoch, Optuna TPE after the two reference points, ASHA on, in-process trials). The
  driver is the process that runs Tune, the searcher and every MLflow write (trial runs
  opened at suggestion, epochs logged, runs finalised and closed on the finaliser thread).
- **bare**: a plain ``ray.tune.Tuner`` over the same space (``loss.margin`` and
  ``loss.rank_weight``, loguniform, the bounds of ``search.space``'s default): Ray's
  ``OptunaSearch`` (TPE, the same seed) in ``ConcurrencyLimiter(max_concurrent=2)``,
  ``ASHAScheduler`` on ``val_MAE`` (min; quakeray's ``max_t``, grace period and reduction
  factor), ``reuse_actors=True``, and a function trainable that imports torch and timm
  and reports once a fake ``val_MAE`` computed from its config. Each trial reserves what
  a quakeray trial reserves (``quakeray.search.trial.trial_resources``). No MLflow.

A Tune callback reads the driver process's CPU time (all its threads) each time a trial
completes; the CPU time between two completions is one trial's share.

Reported per case and round: the mean driver CPU per trial in blocks of 20 trials, the
mean over trials 21..N (the first block holds Ray's and the imports' warm-up), the
least-squares slope of per-trial CPU against the trial's number (ms per trial, per trial;
over all trials and over 21..N), and the last block over the first. For quakeray, the
MLflow store is read back: the search must hold exactly ``--trials`` child runs, none of
them left RUNNING. Then the ratio of quakeray's driver CPU per trial to the bare search's
(trials 21..N, per round; the median over rounds). Target: <= 3x.

Prints a table and writes ``benchmarks/results/search_driver_scaling.json`` (``--out``).

    .venv/bin/python benchmarks/search_driver_scaling.py               # ~3 min on 2 cores
    .venv/bin/python benchmarks/search_driver_scaling.py --rounds 3
    .venv/bin/python benchmarks/search_driver_scaling.py --smoke-test --out /tmp/sds.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import ray
from ray import tune
from ray.tune import Callback

from quakeray.config import ExperimentConfig, load_config
from quakeray.search import run_search
from quakeray.search.runs import child_runs
from quakeray.search.scheduler import max_epochs

try:  # where a quakeray trial's reservation is decided (trial.py became trainable.py)
    from quakeray.search.trainable import trial_resources
except ImportError:
    from quakeray.search.trial import trial_resources  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "search_driver_scaling.json"
BLOCK = 20
CASES = ("quakeray", "bare")
TARGET_RATIO = 3.0  # quakeray's driver CPU per trial over the bare search's, at most
# What both cases share (the quakeray search's settings; the bare one reads its space,
# seed, resources and ASHA settings from the same config).
COMMON = [
    "model.backbone=test_resnet",
    "optim.epochs=1",
    "optim.batch_size=8",
    "scaling.num_workers=1",
    "scaling.cpus_per_worker=0.5",
    "tracking.log_model=false",
    "search.name=driver-scaling",
    "search.max_concurrent=2",
    "search.evaluate_best=false",
]
BARE_SPACE = ("loss.margin", "loss.rank_weight")


class DriverClock(Callback):  # type: ignore[misc]
    """The driver's CPU and wall time at each trial's completion (or error)."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = [(time.process_time(), time.perf_counter())]

    def _stamp(self) -> None:
        self.stamps.append((time.process_time(), time.perf_counter()))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._stamp()

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._stamp()

    def per_trial(self) -> tuple[list[float], list[float]]:
        """CPU seconds and wall seconds between consecutive completions."""
        cpu = [b[0] - a[0] for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        wall = [b[1] - a[1] for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        return cpu, wall


def _bare_trial(config: dict[str, Any]) -> None:
    """A Tune function trial that imports torch and timm, then reports once a fake metric."""
    import timm  # noqa: F401
    import torch  # noqa: F401

    # Deterministic in the sampled point, least at margin 0.1 and rank_weight 1.
    value = math.log10(config["loss.margin"]) + 1.0
    weight = math.log10(config["loss.rank_weight"])
    tune.report({"val_MAE": value * value + weight * weight, "epoch": 0})


def commit() -> str:
    """The commit of the quakeray measured (``-dirty`` when its tracked files differ).

    Read where the imported package lives: ``PYTHONPATH=<an older checkout>`` measures
    that checkout's driver with this script (the "before" of a change).
    """
    import quakeray

    git = ["git", "-C", str(Path(quakeray.__file__).resolve().parents[1])]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    status = subprocess.run(
        [*git, "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    )
    sha = head.stdout.strip() or "unknown"
    return sha + ("-dirty" if status.stdout.strip() else "")


def clock_figures(clock: DriverClock) -> dict[str, Any]:
    """Blocks, slopes and means of the driver's CPU per trial."""
    cpu, gaps = clock.per_trial()
    ms = np.asarray(cpu) * 1000
    index = np.arange(1, len(cpu) + 1)
    slope, intercept = np.polyfit(index, ms, 1)
    slope_late = np.polyfit(index[BLOCK:], ms[BLOCK:], 1)[0] if len(cpu) > BLOCK + 1 else None
    blocks: list[dict[str, Any]] = [
        {
            "trials": f"{i + 1}-{min(i + BLOCK, len(cpu))}",
            "driver_cpu_ms_per_trial": float(np.mean(cpu[i : i + BLOCK]) * 1000),
            "wall_s_per_trial": float(np.mean(gaps[i : i + BLOCK])),
        }
        for i in range(0, len(cpu), BLOCK)
    ]
    return {
        "completions": len(cpu),
        "driver_cpu_s_total": float(sum(cpu)),
        "driver_cpu_ms_per_trial_after_first_block": (
            float(np.mean(ms[BLOCK:])) if len(cpu) > BLOCK else None
        ),
        "wall_s_per_trial_after_first_block": (
            float(np.mean(gaps[BLOCK:])) if len(cpu) > BLOCK else None
        ),
        "blocks": blocks,
        "slope_ms_per_trial_per_trial": float(slope),
        "intercept_ms": float(intercept),
        "slope_ms_per_trial_per_trial_after_first_block": (
            None if slope_late is None else float(slope_late)
        ),
        "last_block_over_first": blocks[-1]["driver_cpu_ms_per_trial"]
        / blocks[0]["driver_cpu_ms_per_trial"],
        "per_trial_cpu_s": cpu,
    }


def _ray_init() -> None:
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)


class WriterCpu(logging.Handler):
    """Catches the search's writer's closing line: the CPU seconds its process used."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seconds: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("the search's MLflow writer used"):
            self.seconds = float(record.args[0])  # type: ignore[index]


def run_quakeray(n: int) -> dict[str, Any]:
    """One quakeray search of ``n`` trials in a fresh Ray and folder; its figures."""
    from quakeray.data.synthetic import write_synthetic

    root = Path(tempfile.mkdtemp(prefix="qr-driver-scaling-"))
    try:
        data = write_synthetic(root / "q.h5", events=16, size=32, seed=0)
        cfg = load_config(
            None,
            [
                *COMMON,
                f"data.path={data}",
                f"run.storage_path={root / 'ray_results'}",
                f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
                f"search.num_samples={n}",
            ],
        )
        load_before = os.getloadavg()
        _ray_init()
        writer_log = WriterCpu()
        logging.getLogger("quakeray.search.writer").addHandler(writer_log)
        logging.getLogger("quakeray.search.writer").setLevel(logging.DEBUG)
        try:
            clock = DriverClock()
            t0 = time.perf_counter()
            summary = run_search(cfg, callbacks=[clock])
            wall = time.perf_counter() - t0
        finally:
            logging.getLogger("quakeray.search.writer").removeHandler(writer_log)
            ray.shutdown()
        runs = child_runs(summary.tracking_uri, summary.experiment_id, summary.parent_run_id)
        statuses = Counter(r.info.status for r in runs)
        figures = {
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "trials": n,
            "wall_s": wall,
            **clock_figures(clock),
            # The MLflow writer's own process (an actor beside the driver): its CPU for the
            # whole search, per trial, so driver + writer shows what the MLflow work costs.
            "writer_cpu_s_total": writer_log.seconds,
            "writer_cpu_ms_per_trial": None
            if writer_log.seconds is None
            else writer_log.seconds / n * 1000,
            "child_runs": len(runs),
            "child_run_statuses": dict(statuses),
            "running_left": statuses.get("RUNNING", 0),
        }
        figures["ok"] = len(runs) == n and not statuses.get("RUNNING")
        return figures
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bare_tuner(cfg: ExperimentConfig, storage: Path, clock: DriverClock) -> Any:
    """A plain Tune search shaped like quakeray's: Optuna TPE, ASHA, 2 at a time."""
    import optuna
    from optuna.distributions import BaseDistribution, FloatDistribution
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    s = cfg.search
    space: dict[str, BaseDistribution] = {}
    for name in BARE_SPACE:
        p = s.space[name]
        if p.kind != "loguniform" or p.low is None or p.high is None:
            raise SystemExit(f"search.space[{name!r}] is {p}, no longer loguniform: update")
        space[name] = FloatDistribution(float(p.low), float(p.high), log=True)
    searcher = OptunaSearch(
        space=space,
        metric=s.metric,
        mode=s.mode,
        sampler=optuna.samplers.TPESampler(seed=s.seed),
    )
    max_t = max_epochs(cfg)
    scheduler = ASHAScheduler(
        metric=s.metric,
        mode=s.mode,
        max_t=max_t,
        grace_period=min(s.grace_period, max_t),
        reduction_factor=s.reduction_factor,
    )
    return tune.Tuner(
        tune.with_resources(_bare_trial, trial_resources(cfg)),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent),
            scheduler=scheduler,
            num_samples=s.num_samples,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name="bare-driver-scaling", storage_path=str(storage), callbacks=[clock]
        ),
    )


def run_bare(n: int) -> dict[str, Any]:
    """One bare Tune search of ``n`` trials in a fresh Ray and folder; its figures."""
    cfg = load_config(None, [*COMMON, f"search.num_samples={n}"])
    root = Path(tempfile.mkdtemp(prefix="qr-driver-scaling-bare-"))
    try:
        load_before = os.getloadavg()
        _ray_init()
        try:
            clock = DriverClock()
            tuner = bare_tuner(cfg, root / "ray_results", clock)
            t0 = time.perf_counter()
            grid = tuner.fit()
            wall = time.perf_counter() - t0
        finally:
            ray.shutdown()
        figures = {
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "trials": n,
            "wall_s": wall,
            "resources_per_trial": trial_resources(cfg),
            **clock_figures(clock),
            "results": len(grid),
            "errors": grid.num_errors,
        }
        figures["ok"] = len(grid) == n and not grid.num_errors and figures["completions"] == n
        return figures
    finally:
        shutil.rmtree(root, ignore_errors=True)


RUNNERS = {"quakeray": run_quakeray, "bare": run_bare}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_tables(figures: dict[str, Any]) -> None:
    """The driver's CPU per trial by block for every run, then the summary and the ratio."""
    runs = [
        (case, figures["cases"][case][r])
        for r in range(figures["rounds"])
        for case in figures["case_names"]
    ]
    heads = [f"{case} r{i // len(figures['case_names']) + 1}" for i, (case, _) in enumerate(runs)]
    print(f"\n{figures['trials']} trials a search; driver CPU ms per trial, by block:")
    print(f"  {'trials':>9} " + " ".join(f"{h:>12}" for h in heads))
    for i, block in enumerate(runs[0][1]["blocks"]):
        cells = [
            _ms(fig["blocks"][i]["driver_cpu_ms_per_trial"]) if i < len(fig["blocks"]) else "-"
            for _, fig in runs
        ]
        print(f"  {block['trials']:>9} " + " ".join(f"{c:>12}" for c in cells))
    print(
        f"\n  {'case':>12} {'wall s':>7} {'CPU ms/trial':>12} "
        f"{'21..N ms/trial':>14} {'slope 21..N':>11} {'last/first':>10}  check"
    )
    for (case, fig), head in zip(runs, heads, strict=True):
        late = fig["slope_ms_per_trial_per_trial_after_first_block"]
        writer = fig.get("writer_cpu_ms_per_trial")
        check = (
            f"{fig['child_runs']} child runs, {fig['running_left']} RUNNING; MLflow writer "
            + ("in the driver" if writer is None else f"{writer:.0f} ms CPU/trial beside it")
            if case == "quakeray"
            else f"{fig['results']} results, {fig['errors']} errors"
        )
        print(
            f"  {head:>12} {fig['wall_s']:7.0f} "
            f"{fig['driver_cpu_s_total'] * 1000 / max(fig['completions'], 1):12.0f} "
            f"{_ms(fig['driver_cpu_ms_per_trial_after_first_block']):>14} "
            f"{'-' if late is None else f'{late:+.3f}':>11} "
            f"{fig['last_block_over_first']:10.2f}  {check}"
        )
    ratio = figures["ratio_quakeray_over_bare"]
    if ratio is not None:
        rounds = ", ".join(f"{r:.2f}" for r in figures["ratio_per_round"])
        verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
        print(
            f"\nquakeray / bare driver CPU per trial (trials {BLOCK + 1}..{figures['trials']}): "
            f"{ratio:.2f}x (median of rounds: {rounds}); target <= {TARGET_RATIO:g}x: {verdict}"
        )
    print(
        f"commit {figures['commit']}; load {figures['load_before'][0]:.1f} -> "
        f"{figures['load_after'][0]:.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="30 trials")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES)
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the cases")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results JSON")
    args = parser.parse_args()
    n = 30 if args.smoke_test else args.trials
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or any(c not in CASES for c in cases) or len(set(cases)) != len(cases):
        parser.error(f"--cases: a comma-separated list of distinct {', '.join(CASES)}")
    if n <= BLOCK:
        parser.error(f"--trials must exceed {BLOCK}: the first block is left out")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    load_before = os.getloadavg()
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    for r in range(args.rounds):
        for case in cases:
            print(f"\n=== round {r + 1}/{args.rounds}: {case} ({n} trials) ===", flush=True)
            results[case].append(RUNNERS[case](n))
            fig = results[case][-1]
            print(
                f"=== {case}: {fig['wall_s']:.0f} s, "
                f"{_ms(fig['driver_cpu_ms_per_trial_after_first_block'])} ms driver CPU per "
                f"trial over trials {BLOCK + 1}..{n} ===",
                flush=True,
            )

    ratios: list[float] = []
    if "quakeray" in results and "bare" in results:
        for qr, bare in zip(results["quakeray"], results["bare"], strict=True):
            a = qr["driver_cpu_ms_per_trial_after_first_block"]
            b = bare["driver_cpu_ms_per_trial_after_first_block"]
            if a is not None and b:
                ratios.append(a / b)
    figures: dict[str, Any] = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "commit": commit(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "trials": n,
        "rounds": args.rounds,
        "case_names": cases,
        "order": [c for _ in range(args.rounds) for c in cases],
        "ratio_quakeray_over_bare": statistics.median(ratios) if ratios else None,
        "ratio_per_round": ratios,
        "ratio_trials": f"{BLOCK + 1}-{n}",
        "target_ratio_at_most": TARGET_RATIO,
        "cases": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1))
    print_tables(figures)
    print(f"saved {args.out}")
    ok = all(fig["ok"] for runs in results.values() for fig in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

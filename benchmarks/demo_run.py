"""The README's demo end to end: its wall time and the summary it prints, as a record.

Runs ``quakeray tune -c experiments/demo.yaml`` (the README's first command, without the
install) in a fresh temporary folder, as a newcomer would, and saves what the README
quotes from it: the wall time, the best trial against the constant, the test score and
the seed check's block, with the commit and the load before and after.

Prints the summary and writes ``benchmarks/results/demo_run.json``.

    .venv/bin/python benchmarks/demo_run.py      # ~2.5 min on 2 cores
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "demo_run.json"


def commit() -> str:
    """``git rev-parse HEAD``, with ``-dirty`` when tracked files differ from it."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    status = subprocess.run(
        [*git, "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    )
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def main() -> int:
    quakeray = Path(sys.executable).with_name("quakeray")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="qr-demo-") as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [str(quakeray), "tune", "-c", str(REPO / "experiments" / "demo.yaml")],
            cwd=tmp,
            capture_output=True,
            text=True,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
        wall = time.perf_counter() - t0
    lines = proc.stdout.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("search demo finished")), None)
    summary = lines[start:] if start is not None else []
    figures = {
        "commit": commit(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "command": "quakeray tune -c experiments/demo.yaml",
        "exit_code": proc.returncode,
        "wall_s": wall,
        "summary": summary,
    }
    RESULTS.write_text(json.dumps(figures, indent=1))
    print("\n".join(summary) or proc.stderr[-2000:])
    print(f"\nexit {proc.returncode}; wall {wall:.0f} s; saved {RESULTS}")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())

"""Process-level behaviour of the ``quakeray`` command: signals and exit codes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


def test_sigterm_interrupts_cleanly_and_leaves_no_partial_file(tmp_path: Path) -> None:
    out = tmp_path / "big.h5"
    proc = subprocess.Popen(
        [sys.executable, "-m", "quakeray", "data", "synth", str(out), "--events", "3000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(4)  # past the imports, inside the write
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists()  # written atomically: no half file under the final name
    assert not any(p.name.startswith(".") and "big.h5" in p.name for p in tmp_path.iterdir())

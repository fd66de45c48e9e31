"""Bad input to ``quakeray tune`` / ``quakeray report``: one line, exit code 2, nothing started.

Every case fails before Ray or MLflow start, so the tests run the real CLI entry point
in-process (``quakeray.cli.main``); one runs it as a subprocess to show what a user sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from quakeray.cli import main

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A bad input must not leave an mlflow.db or ray_results behind: look in an empty dir.
    monkeypatch.chdir(tmp_path)


def _assert_one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("quakeray: error: ")
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize(
    ("yaml_text", "needles"),
    [
        ("search:\n  space: {}\n", ["search.space is empty"]),
        ("search:\n  space: [1, 2]\n", ["search.space must map field names"]),
        ("search:\n  space:\n    loss.margin: {low: 0.1, high: 1}\n", ["kind"]),
        (
            "search:\n  space:\n    loss.margni: {kind: uniform, low: 0.1, high: 1}\n",
            ["search.space.loss.margni: no such config field", "did you mean 'loss.margin'"],
        ),
        (
            "search:\n  space:\n    loss.margin: {kind: uniform, low: -0.1, high: 1}\n",
            ["search.space.loss.margin", "bounds must be >= 0"],
        ),
        (
            "search:\n  space:\n    loss.rank_weight: {kind: uniform, low: -1, high: 2}\n",
            ["search.space.loss.rank_weight", "bounds must be >= 0"],
        ),
        (
            "search:\n  space:\n    loss.rank_weight: {kind: loguniform, low: 0, high: 2}\n",
            ["loguniform needs low > 0"],
        ),
        ("search:\n  num_samples: 0\n", ["search.num_samples must be >= 1"]),
        ("search:\n  metric: val_mae\n", ["search.metric 'val_mae'", "did you mean 'val_MAE'"]),
        ("search:\n  space:\n    loss.margin: 0.1\n", ["search.space.loss.margin"]),
    ],
)
def test_bad_search_config_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], yaml_text: str, needles: list[str]
) -> None:
    cfg = _write(tmp_path / "bad.yaml", yaml_text)
    assert main(["tune", "-c", str(cfg)]) == 2
    _assert_one_line_error(capsys, *needles)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_bad_space_override_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["tune", "--smoke-test", "search.space.optim.epochs={kind: uniform, low: 1, high: 3}"]
    )
    assert code == 2
    _assert_one_line_error(capsys, "optim.epochs is an integer setting")


@pytest.mark.parametrize("make", ["missing", "empty_dir", "not_a_search"])
def test_resume_path_without_a_search(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: str
) -> None:
    target = tmp_path / "somewhere"
    if make == "empty_dir":
        target.mkdir()
    elif make == "not_a_search":
        target.mkdir()
        (target / "quakeray_search.json").write_text(yaml.safe_dump({"config": {}}))
    assert main(["tune", "--resume", str(target)]) == 2
    _assert_one_line_error(capsys, f"--resume {target}", "search folder")


def test_resume_of_a_search_another_version_started(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Version 1 searches had their trials do the MLflow work: a newer driver cannot take
    # such a search over halfway.
    target = tmp_path / "old-search"
    target.mkdir()
    (target / "tuner.pkl").write_bytes(b"")  # what Tune looks for
    keys = ("config", "tracking_uri", "experiment_id", "parent_run_id", "data_path")
    state = {"version": 1, **dict.fromkeys(keys, "x")}
    (target / "quakeray_search.json").write_text(json.dumps(state))
    assert main(["tune", "--resume", str(target)]) == 2
    _assert_one_line_error(capsys, f"--resume {target}", "state version 1", "start a new search")


def test_report_of_an_unknown_experiment_or_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["report", "demo", "--tracking-uri", uri]) == 2
    _assert_one_line_error(capsys, f"no MLflow store at {uri}")
    assert not (tmp_path / "mlflow.db").exists()

    MlflowClient(tracking_uri=uri).create_experiment("other")
    capsys.readouterr()
    assert main(["report", "no-such-search", "--tracking-uri", uri]) == 2
    _assert_one_line_error(capsys, "no MLflow experiment 'no-such-search'", "other")


def test_cli_subprocess_shows_one_line_and_no_traceback(tmp_path: Path) -> None:
    cfg = _write(
        tmp_path / "bad.yaml",
        "search:\n  space:\n    loss.margin: {kind: loguniform, low: 1.0, high: 0.1}\n",
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "quakeray", "tune", "-c", str(cfg)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "quakeray: error: config: search.space.loss.margin: low (1.0) must be below high (0.1)"
    ]

"""The typed config: defaults, YAML, overrides, validation, and what the CLI makes of errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quakeray.cli import SMOKE_TEST_OVERRIDES
from quakeray.config import (
    ExperimentConfig,
    dump_config,
    field_paths,
    flatten,
    from_dict,
    load_config,
    to_dict,
    with_overrides,
)
from quakeray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers_protocol() -> None:
    cfg = load_config(None)
    assert isinstance(cfg, ExperimentConfig)
    assert (cfg.loss.margin, cfg.loss.rank_weight) == (0.02, 1.0)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.batch_size) == (1e-4, 0.01, 16)
    assert (cfg.optim.pct_start, cfg.optim.div_factor, cfg.optim.final_div_factor) == (
        0.1,
        1e9,
        1e4,
    )
    assert cfg.optim.seed == 42
    assert set(cfg.search.space) == {"loss.margin", "loss.rank_weight"}


def test_yaml_then_overrides_in_that_order(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("loss:\n  margin: 0.5\n  pairing: halves\noptim:\n  epochs: 3\n")
    cfg = load_config(path, ["loss.margin=0.1", "scaling.use_gpu=true"])
    assert cfg.loss.margin == 0.1  # override beats file
    assert cfg.loss.pairing == "halves"  # file beats default
    assert cfg.optim.epochs == 3
    assert cfg.scaling.use_gpu is True
    assert cfg.optim.lr == 1e-4  # untouched default


def test_search_space_given_replaces_the_default_and_overrides_add(tmp_path: Path) -> None:
    cfg = load_config(None, ["search.space.optim.lr={kind: loguniform, low: 1.0e-5, high: 1.0e-2}"])
    assert cfg.search.space["optim.lr"].kind == "loguniform"
    assert cfg.search.space["optim.lr"].high == 1e-2
    assert set(cfg.search.space) == {"optim.lr"}  # the space written is the space searched
    path = tmp_path / "exp.yaml"
    path.write_text("search:\n  space:\n    loss.margin: {kind: uniform, low: 0.0, high: 1.0}\n")
    cfg = load_config(path, ["search.space.loss.pairing={kind: choice, choices: [all, halves]}"])
    assert set(cfg.search.space) == {"loss.margin", "loss.pairing"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.margn=1", "did you mean 'loss.margin'"),
        ("losss.margin=1", "did you mean 'loss'"),
        ("loss.margin=abc", "loss.margin"),
        ("loss.margin=-0.1", "loss.margin must be >= 0"),
        ("loss.rank_weight=-1", "loss.rank_weight must be >= 0"),
        ("loss.pairing=pairs", "loss.pairing"),
        ("optim.epochs=0", "optim.epochs must be >= 1"),
        ("search.num_samples=0", "search.num_samples must be >= 1"),
        ("search.confirm_seeds=0", "search.confirm_seeds must be >= 1"),
        ("optim.batch_size=5", "divisible by scaling.num_workers"),
        ("optim.batch_size=2", "gives each of 2 worker.s. batches of 1"),
        ("nokey", "not key=value"),
        ("search.space.loss.marg={kind: uniform, low: 0, high: 1}", "did you mean 'loss.margin'"),
        ("search.space.loss.margin={kind: uniform, low: -1, high: 1}", "bounds must be >= 0"),
        ("search.space.loss.margin={kind: loguniform, low: 0, high: 1}", "needs low > 0"),
        ("search.space.loss.margin={kind: uniform, low: 2, high: 1}", "must be below high"),
        ("search.space.model.backbone={kind: choice, choices: []}", "non-empty 'choices'"),
        ("search.space.loss.margin={kind: normal, low: 0, high: 1}", "search.space.loss.margin"),
        ("search.space.loss.margin=3", "must be a mapping"),
    ],
)
def test_bad_values_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)
    scalar_section = tmp_path / "scalar.yaml"
    scalar_section.write_text("loss: 3\n")
    with pytest.raises(ConfigError, match="'loss' must be a mapping"):
        load_config(scalar_section)


def test_round_trip_through_yaml_and_dict(tmp_path: Path) -> None:
    cfg = load_config(None, ["loss.margin=0.3", "model.backbone=test_vit"])
    path = dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(path)
    assert again == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_flatten_gives_dotted_params() -> None:
    flat = flatten(load_config(None))
    assert flat["loss.margin"] == 0.02
    assert flat["model.backbone"] == "test_resnet"
    assert flat["search.space.loss.margin"] == "loguniform(0.001, 1.0)"
    assert "search.space" not in flat
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())


def test_with_overrides_validates_the_sample() -> None:
    cfg = load_config(None)
    trial = with_overrides(cfg, {"loss.margin": 0.2, "loss.rank_weight": 0.0})
    assert (trial.loss.margin, trial.loss.rank_weight) == (0.2, 0.0)
    assert cfg.loss.margin == 0.02  # the base is not mutated
    with pytest.raises(ConfigError, match=r"loss\.margin must be >= 0"):
        with_overrides(cfg, {"loss.margin": -1.0})
    with pytest.raises(ConfigError, match="unknown key"):
        with_overrides(cfg, {"loss.nope": 1.0})


def test_field_paths_lists_leaves() -> None:
    paths = field_paths()
    assert "loss.margin" in paths and "scaling.num_workers" in paths
    assert "loss" not in paths


def test_smoke_test_overrides_are_valid() -> None:
    cfg = load_config(None, list(SMOKE_TEST_OVERRIDES))
    assert cfg.optim.epochs <= 2 and cfg.data.path == ""


def test_every_shipped_experiment_file_loads() -> None:
    files = sorted((REPO / "experiments").rglob("*.yaml"))
    for path in files:
        raw = yaml.safe_load(path.read_text()) or {}
        assert isinstance(raw, dict), path
        load_config(path)  # raises ConfigError on any mistake


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quakeray", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_config_error_is_one_line_exit_2() -> None:
    proc = _cli("train", "loss.margn=0.1")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "did you mean 'loss.margin'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_debug_shows_traceback() -> None:
    proc = _cli("--debug", "train", "loss.margin=-1")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "loss.margin must be >= 0" in proc.stderr


def test_cli_help_and_version() -> None:
    proc = _cli("--help")
    assert proc.returncode == 0
    for command in ("data", "train", "tune", "evaluate", "report"):
        assert command in proc.stdout
    assert _cli("--version").stdout.startswith("quakeray ")
    assert _cli().returncode == 2  # no command: usage, not a crash

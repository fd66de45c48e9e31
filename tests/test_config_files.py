"""Experiment files that extend others: the paper's presets and their improved variants."""

from __future__ import annotations

from pathlib import Path

import pytest

from quakeray.config import load_config, to_dict
from quakeray.config_files import merge, read_yaml
from quakeray.errors import ConfigError
from quakeray.search.space import trial_config

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "experiments" / "paper"
BACKBONES = ("mobilenetv3", "convnextv2", "mobilevitv2", "vit_tiny", "levit")


def test_a_file_states_only_what_it_changes_over_the_file_it_extends(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("optim: {epochs: 10, lr: 0.001}\nloss: {margin: 0.5}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.yaml").write_text("extends: ../base.yaml\noptim: {epochs: 20}\n")
    (tmp_path / "top.yaml").write_text("extends: sub/mid.yaml\nloss: {rank_weight: 0}\n")
    assert read_yaml(tmp_path / "top.yaml") == {
        "optim": {"epochs": 20, "lr": 0.001},
        "loss": {"margin": 0.5, "rank_weight": 0},
    }
    cfg = load_config(tmp_path / "top.yaml", ["optim.epochs=3"])  # overrides still on top
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.loss.margin, cfg.loss.rank_weight) == (
        3,
        0.001,
        0.5,
        0.0,
    )
    # A mapping merges key by key; anything else (a list, a scalar) replaces.
    assert merge({"a": {"x": 1, "y": [1]}}, {"a": {"y": [2]}}) == {"a": {"x": 1, "y": [2]}}


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.yaml": "extends: a.yaml\n"}, "comes back to a file already extended"),
        ({"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"}, "a.yaml -> b.yaml"),
        ({"a.yaml": "extends: gone.yaml\n"}, "gone.yaml (extended by"),
        ({"a.yaml": "extends: [b.yaml]\n"}, "extends must be a path to another YAML file"),
        ({"a.yaml": "extends: b.yaml\n", "b.yaml": "loss: [\n"}, "b.yaml: line"),
    ],
)
def test_a_broken_chain_is_one_clear_line(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "a.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def _training(cfg: object) -> dict[str, object]:
    """The settings that decide what a run learns (not where it logs or what it searches)."""
    full = to_dict(cfg)  # type: ignore[arg-type]
    return {k: full[k] for k in ("data", "model", "loss", "optim", "run")}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_paper_presets_are_the_paper_protocol_and_improved_turns_each_improvement_on(
    backbone: str,
) -> None:
    faithful = load_config(PAPER / f"{backbone}.yaml")
    improved = load_config(PAPER / "improved" / f"{backbone}.yaml")
    # Faithful in every respect DESIGN.md lists, checkpoint selection on val_loss included.
    assert faithful.model.backbone == improved.model.backbone == backbone
    assert (faithful.model.clamp_in_forward, faithful.model.standardize_target) == (True, False)
    assert (faithful.loss.pairing, faithful.loss.margin, faithful.loss.rank_weight) == (
        "halves",
        0.02,
        1.0,
    )
    assert faithful.run.checkpoint_metric == "val_loss" and faithful.data.normalize is False
    assert (faithful.optim.lr, faithful.optim.epochs, faithful.optim.batch_size) == (1e-4, 10, 16)
    # Improved differs from faithful in exactly the improvements, nothing else.
    a, b = _training(faithful), _training(improved)
    changed = {
        f"{section}.{key}"
        for section in a
        for key in a[section]  # type: ignore[attr-defined]
        if a[section][key] != b[section][key]  # type: ignore[index]
    }
    assert changed == {
        "data.normalize",
        "model.clamp_in_forward",
        "model.standardize_target",
        "loss.pairing",
        "run.checkpoint_metric",
    }
    assert improved.tracking.experiment == f"paper-{backbone}-improved"


def test_the_comparison_search_runs_exactly_the_two_presets() -> None:
    search = load_config(PAPER / "faithful_vs_improved.yaml")
    for variant, preset in (
        ("faithful", PAPER / "mobilenetv3.yaml"),
        ("improved", PAPER / "improved" / "mobilenetv3.yaml"),
    ):
        trial = trial_config(search, {"variant": variant, "loss.rank_weight": 1.0})
        assert _training(trial) == _training(load_config(preset)), variant

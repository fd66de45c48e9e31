"""ASHA over epochs: weak trials stopped, never on their last epoch, never a reference point."""

from __future__ import annotations

from types import SimpleNamespace

from ray.tune.schedulers import TrialScheduler

from quakeray.config import load_config
from quakeray.search.scheduler import EpochASHA, build_scheduler
from quakeray.search.trial_spec import SPEC_KEY, TrialSpec


def _trial(tid: str, config: dict[str, object] | None = None) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, config=config or {}, status="PENDING")


def test_epoch_asha_stops_weak_trials_but_never_on_their_last_epoch() -> None:
    cfg = load_config(
        None, ["optim.epochs=3", "search.grace_period=1", "search.reduction_factor=2"]
    )
    asha = build_scheduler(cfg)
    assert isinstance(asha, EpochASHA)
    asha.set_search_properties("val_MAE", "min")
    good, bad, late = _trial("good"), _trial("bad"), _trial("late")
    for t in (good, bad, late):
        asha.on_trial_add(None, t)
    # Time is epochs completed (epoch + 1), whatever Tune's own iteration count says.
    assert (
        asha.on_trial_result(None, good, {"epoch": 0.0, "val_MAE": 1.0, "training_iteration": 7})
        == TrialScheduler.CONTINUE
    )
    assert (
        asha.on_trial_result(None, bad, {"epoch": 0.0, "val_MAE": 5.0, "training_iteration": 1})
        == TrialScheduler.STOP
    )
    # A weak result on the last epoch (max_t = 3) ends the trial anyway: no STOP from ASHA.
    asha.on_trial_result(None, late, {"epoch": 0.0, "val_MAE": 0.5, "training_iteration": 1})
    assert (
        asha.on_trial_result(None, late, {"epoch": 2.0, "val_MAE": 9.0, "training_iteration": 3})
        == TrialScheduler.CONTINUE
    )


def test_no_scheduler_when_asha_is_off() -> None:
    assert build_scheduler(load_config(None, ["search.asha=false"])) is None


def test_epoch_asha_never_stops_a_reference_point() -> None:
    asha = build_scheduler(load_config(None, ["optim.epochs=3"]))
    assert asha is not None
    asha.set_search_properties("val_MAE", "min")
    good, baseline = _trial("good"), _trial("mse", {SPEC_KEY: TrialSpec("reference", "mse_only")})
    asha.on_trial_add(None, good)
    asha.on_trial_add(None, baseline)
    asha.on_trial_result(None, good, {"epoch": 0.0, "val_MAE": 1.0})
    decision = asha.on_trial_result(None, baseline, {"epoch": 0.0, "val_MAE": 5.0})
    assert decision == TrialScheduler.CONTINUE

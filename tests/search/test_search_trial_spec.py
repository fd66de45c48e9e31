"""A trial's identity travels under one key of its config, and only its settings are sampled."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

from quakeray.search.trial_spec import SPEC_KEY, TrialSpec, sample_of, spec_of


def test_the_spec_rides_under_one_key_and_the_sample_is_the_rest() -> None:
    spec = TrialSpec("reference", "paper", run_id="r1", run_name="paper")
    config = {"loss.margin": 0.02, "loss.rank_weight": 1.0, SPEC_KEY: spec}
    assert spec_of(config) is spec
    assert sample_of(config) == {"loss.margin": 0.02, "loss.rank_weight": 1.0}
    assert sample_of({"x.y": 1, "__trial_index__": 3}) == {"x.y": 1}  # Ray's own markers too


def test_a_plain_suggestion_is_a_sampled_trial_until_its_run_is_opened() -> None:
    spec = spec_of({"loss.margin": 0.1})
    assert (spec.role, spec.run_id, spec.continues) == ("sampled", "", "")
    opened = replace(spec, run_id="r2", run_name="tpe-001 m=0.1")
    assert str(opened) == "tpe-001 m=0.1"  # what Tune's own trial table shows
    assert str(TrialSpec("confirm", "best")) == "best"


def test_a_continued_trial_trains_in_the_folder_it_continues() -> None:
    assert TrialSpec().train_folder_of("new") == "new"
    assert TrialSpec(continues="old").train_folder_of("new") == "old"


def test_the_spec_survives_tunes_saving_of_a_trial() -> None:
    spec = TrialSpec("confirm", "mse_only", run_id="r3", run_name="seed-mse_only-43")
    config = {"optim.seed": 43, SPEC_KEY: spec}
    assert pickle.loads(pickle.dumps(config)) == config  # Tune pickles trial configs
    assert json.dumps(config, default=str)  # and writes params.json with a fallback

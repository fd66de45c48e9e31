"""Where the worker loop runs: a trial's own process never trains a GPU trial on the CPU."""

from __future__ import annotations

import pytest
import torch

from quakeray.errors import ClusterError
from quakeray.train.session import TuneTrialSession


def test_a_gpu_trial_without_a_gpu_is_refused_not_run_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ClusterError, match=r"use_gpu=true.*in_process_trials=false"):
        TuneTrialSession.current(use_gpu=True)
    cpu = TuneTrialSession.current(use_gpu=False)
    assert (cpu.device.type, cpu.rank, cpu.world) == ("cpu", 0, 1)
    model = cpu.prepare_model(torch.nn.Linear(2, 1))
    assert next(model.parameters()).device.type == "cpu"
    with cpu.restored_checkpoint() as folder:  # Tune keeps no checkpoint of ours
        assert folder is None

"""The train loop's guards: inf / NaN found without a sync per step, and signals that stop it at a step boundary."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from fewshot.config import load_config
from fewshot.trainer import FiniteWatch, StopSignals, TrainingDiverged

CPU = torch.device("cpu")


def test_finite_watch_names_the_first_nonfinite_loss():
    watch = FiniteWatch(load_config(None, ["optim.lr=0.5"]), CPU)
    weights = [torch.ones(3)]
    for step, loss in enumerate([0.7, 0.6], 1):
        watch.update(torch.tensor(loss), step)
    watch.check(2, weights, saved=None)
    watch.update(torch.tensor(float("inf")), 3)
    watch.update(torch.tensor(float("nan")), 4)
    diverged = (
        r"the loss is inf at step 3; nothing from then on was saved \(no last.pt was written\)\. Try a lower "
        r"optim.lr \(now 0.5\)"
    )
    with pytest.raises(TrainingDiverged, match=diverged):
        watch.check(4, weights, saved=None)


def test_finite_watch_checks_the_weights_too():
    watch = FiniteWatch(load_config(None, ["optim.lr=2e-4", "optim.grad_clip=5.0", "train.amp=bf16"]), CPU)
    watch.update(torch.tensor(0.5), 7)
    watch.check(7, [], saved=4)  # a training-free model: nothing to check
    diverged = (
        r"the weights are no longer finite by step 7 .*last.pt holds step 4\)\. Try a lower optim.lr "
        r"\(now 0.0002\), a lower optim.grad_clip \(now 5\) or train.amp=none \(now bf16\)"
    )
    with pytest.raises(TrainingDiverged, match=diverged):
        watch.check(7, [torch.ones(2), torch.tensor([1.0, float("-inf")])], saved=4)


def test_stop_signals_ask_to_stop_once_then_step_aside():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # stands for the default
    sigint = signal.getsignal(signal.SIGINT)
    try:
        stop = StopSignals(CPU)
        assert stop.requested() == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() == signal.SIGTERM and seen == []
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal acts as before the loop: at once
        assert seen == [signal.SIGTERM]
        stop.restore()
        assert signal.getsignal(signal.SIGINT) is sigint
    finally:
        signal.signal(signal.SIGTERM, previous)

from __future__ import annotations

import pytest
import torch

from fewshot.config import OptimConfig
from fewshot.optim import build_optimizer, build_scheduler, lr_factor


def test_warmup_then_cosine_reaches_zero():
    cfg = OptimConfig(schedule="cosine", warmup_iters=10)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.5)
    assert lr_factor(110, cfg, 110) == pytest.approx(0.0, abs=1e-12)


def test_poly_and_constant():
    poly = OptimConfig(schedule="poly", poly_power=0.9, warmup_iters=0)
    assert lr_factor(50, poly, 100) == pytest.approx(0.5**0.9)
    assert lr_factor(50, OptimConfig(schedule="constant", warmup_iters=0), 100) == 1.0


def test_optimizers_skip_frozen_parameters_and_schedule_steps():
    frozen, live = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    frozen.requires_grad_(False)
    params = list(frozen.parameters()) + list(live.parameters())
    for name in ("adamw", "sgd"):
        opt = build_optimizer(params, OptimConfig(name=name, lr=0.1))
        assert sum(len(g["params"]) for g in opt.param_groups) == 2
        sched = build_scheduler(opt, OptimConfig(name=name, lr=0.1, schedule="poly", warmup_iters=0), max_iters=10)
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**0.9)
    with pytest.raises(KeyError, match="choose from"):
        build_optimizer(params, OptimConfig(name="lion"))

"""Optimisers and learning-rate schedules (linear warm-up, then cosine, poly or constant)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import get_args

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .config import OptimConfig, OptimName


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise KeyError(f"unknown optimizer {cfg.name!r}; choose from {list(get_args(OptimName))}")


def lr_factor(step: int, cfg: OptimConfig, max_iters: int) -> float:
    """Multiplier of the base learning rate at `step` (0-based)."""
    if cfg.warmup_iters > 0 and step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    span = max(1, max_iters - cfg.warmup_iters)
    progress = min(1.0, (step - cfg.warmup_iters) / span)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "poly":
        return (1.0 - progress) ** cfg.poly_power
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_iters: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_iters))

"""Losses on hand-computed values: cross-entropy ignores void, both Dice forms, weighted sums, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from fewshot.config import LossConfig
from fewshot.losses import build_loss, cross_entropy, dice_loss


def logits_for(prob_fg: list[list[float]]) -> torch.Tensor:
    """[1, 2, H, W] logits whose softmax foreground probability is `prob_fg`."""
    p = torch.tensor(prob_fg, dtype=torch.float64)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))])[None]


LOGITS = logits_for([[0.8, 0.4], [0.6, 0.9]])
TARGET = torch.tensor([[[1, 0], [1, 255]]])  # the 0.9 pixel is void


def test_cross_entropy_ignores_void():
    expected = -(math.log(0.8) + math.log(0.6) + math.log(0.6)) / 3  # pixels (1, p=0.8), (0, p=0.4), (1, p=0.6)
    assert cross_entropy(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)
    changed = LOGITS.clone()
    changed[0, :, 1, 1] = torch.tensor([5.0, -5.0])  # a void pixel's prediction does not matter
    assert cross_entropy(changed, TARGET).item() == pytest.approx(expected, rel=1e-6)


def test_all_void_gives_zero_not_nan():
    target = torch.full((1, 2, 2), 255)
    assert cross_entropy(LOGITS, target).item() == 0
    assert dice_loss(LOGITS, target).item() == 0  # no foreground and p masked to 0: Dice = s / s


def test_dice_forms_by_hand():
    # valid pixels: p = 0.8, 0.4, 0.6 and g = 1, 0, 1; sum(pg) = 1.4; smoothing 1
    squared = 1 - (2 * 1.4 + 1) / (0.64 + 0.16 + 0.36 + 2 + 1)  # = 0.36 / 4.16
    plain = 1 - (2 * 1.4 + 1) / (1.8 + 2 + 1)  # = 1 / 4.8
    assert dice_loss(LOGITS, TARGET, "squared").item() == pytest.approx(squared, rel=1e-6)
    assert dice_loss(LOGITS, TARGET, "plain").item() == pytest.approx(plain, rel=1e-6)
    assert squared == pytest.approx(0.36 / 4.16) and plain == pytest.approx(1 / 4.8)


def test_dice_is_per_episode_mean():
    other = logits_for([[0.1, 0.2], [0.3, 0.4]])  # all background: Dice = (0 + 1) / (sum(p^2) + 0 + 1)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    single = 1 - 1 / (0.01 + 0.04 + 0.09 + 0.16 + 1)
    assert dice_loss(other, target).item() == pytest.approx(single, rel=1e-6)
    batch = dice_loss(torch.cat([LOGITS, other]), torch.cat([TARGET, target]))
    assert batch.item() == pytest.approx((0.36 / 4.16 + single) / 2, rel=1e-6)


def test_weighted_sum_from_config_and_gradient():
    loss = build_loss(LossConfig(ce=0.5, dice=2.0, dice_form="plain"))
    logits = LOGITS.clone().requires_grad_(True)
    value = loss(logits, TARGET)
    expected = 0.5 * cross_entropy(LOGITS, TARGET) + 2.0 * dice_loss(LOGITS, TARGET, "plain")
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    assert logits.grad[0, :, :, 1].any() and not logits.grad[0, :, 1, 1].any()  # void pixel: no gradient
    assert build_loss(LossConfig()).dice == 0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="both 0"):
        build_loss(LossConfig(ce=0.0, dice=0.0))
    with pytest.raises(ValueError, match="squared"):
        build_loss(LossConfig(dice=1.0, dice_form="cubed"))
    with pytest.raises(ValueError, match=r"logits \(1, 2, 2, 2\) and target \(1, 3, 3\)"):
        build_loss(LossConfig())(LOGITS, torch.zeros(1, 3, 3, dtype=torch.long))

"""Segmentation losses on 2-class logits: cross-entropy with void ignored, Dice on the foreground probability.

`build_loss(cfg.loss)` gives one callable `loss(logits [B,2,H,W], target [B,H,W]) -> scalar` that sums the terms with
the weights of the config. Targets hold 0 (background), 1 (foreground) and 255 (void, ignored by every term).
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.config import DiceForm, LossConfig

DICE_FORMS = get_args(DiceForm)
DICE_SMOOTH = 1.0  # added to numerator and denominator: an episode with no foreground and p = 0 gives loss 0


def _check(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 4 or logits.shape[1] != 2 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match: expected logits [B,2,H,W] "
            "and target [B,H,W] of the same B, H, W (upsample the logits to the target size first)"
        )


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Mean cross-entropy over the non-void pixels of the batch; 0 (not NaN) when every pixel is void.

    Args:
        logits: [B, 2, H, W].
        target: [B, H, W] with values 0, 1 and `ignore_index`.
    """
    _check(logits, target)
    target = target.long()
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp_min(1)


def dice_loss(logits: Tensor, target: Tensor, form: str = "squared", ignore_index: int = 255) -> Tensor:
    """1 - Dice of the foreground probability, per episode over its non-void pixels, averaged over the batch.

    Dice = (2 sum(p g) + s) / (sum(p^2) + sum(g^2) + s) for `squared` (V-Net) or (sum(p) + sum(g) + s) for `plain`,
    with p = softmax(logits)[:, 1], g = [target == 1] and s = DICE_SMOOTH.

    Args:
        logits: [B, 2, H, W].
        target: [B, H, W] with values 0, 1 and `ignore_index`.
        form: "squared" or "plain".
    """
    _check(logits, target)
    if form not in DICE_FORMS:
        raise ValueError(f"unknown Dice form {form!r}; choose from {list(DICE_FORMS)}")
    valid = (target != ignore_index).float()
    prob = logits.float().softmax(dim=1)[:, 1] * valid  # (B, H, W)
    fg = (target == 1).float()
    inter = (prob * fg).sum(dim=(1, 2))
    if form == "squared":
        denom = prob.square().sum(dim=(1, 2)) + fg.square().sum(dim=(1, 2))
    else:
        denom = prob.sum(dim=(1, 2)) + fg.sum(dim=(1, 2))
    dice = (2 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)
    return (1 - dice).mean()


class SegmentationLoss(nn.Module):
    """ce * cross_entropy + dice * dice_loss, void pixels ignored by both."""

    def __init__(self, ce: float = 1.0, dice: float = 0.0, dice_form: str = "squared", ignore_index: int = 255):
        super().__init__()
        if ce < 0 or dice < 0 or ce + dice == 0:
            raise ValueError(f"loss weights loss.ce={ce} and loss.dice={dice} must be >= 0 and not both 0")
        if dice_form not in DICE_FORMS:
            raise ValueError(f"loss.dice_form={dice_form!r} is not valid; choose from {list(DICE_FORMS)}")
        self.ce, self.dice, self.dice_form, self.ignore_index = ce, dice, dice_form, ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits [B, 2, H, W], target [B, H, W] in {0, 1, 255} -> scalar loss."""
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.ce:
            loss = loss + self.ce * cross_entropy(logits, target, self.ignore_index)
        if self.dice:
            loss = loss + self.dice * dice_loss(logits, target, self.dice_form, self.ignore_index)
        return loss

    def extra_repr(self) -> str:
        return f"ce={self.ce}, dice={self.dice}, dice_form={self.dice_form!r}"


def build_loss(cfg: LossConfig) -> SegmentationLoss:
    """The weighted loss of `cfg` (loss.ce, loss.dice, loss.dice_form)."""
    return SegmentationLoss(ce=cfg.ce, dice=cfg.dice, dice_form=cfg.dice_form)

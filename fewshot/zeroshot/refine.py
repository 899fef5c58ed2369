"""Post-processing of zero-shot scores in the official code: PAMR (NACLIP) and SCLIP's area rule.

PAMR (Araslanov & Roth, "Single-stage semantic segmentation from image labels", the `pamr.py` NACLIP and SCLIP ship):
for each pixel, its 8 neighbours at every dilation d (replicate padding) form P = 8 * len(dilations) neighbours.
The affinity to neighbour j is softmax_j(mean over channels of -|x - x_j| / (1e-8 + 0.1 * std)), where std is the
unbiased standard deviation, per image channel, of the 3x3 windows of every dilation taken together (9 values per
dilation, the pixel itself counted once per dilation). Each of `steps` iterations replaces every
score map by the affinity-weighted sum of its neighbours' scores. NACLIP: 10 steps, dilations (8, 16), on the
normalised image resized to the output size, applied to the cosine scores before the softmax.

Area rule (SCLIP, `area_thd`): with the argmax labels of the per-class probabilities, a foreground class (channel >= 1)
whose predicted area is not larger than `area_threshold` times the whole foreground area has its probabilities set
to 0 everywhere in the image; the argmax and the probability threshold then act on what remains.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]  # the 8 neighbours


def _neighbours(x: Tensor, dilations: Sequence[int], centre: bool = False) -> Tensor:
    """x [B, K, H, W] -> [B, K, P, H, W]: the value of each neighbour (offsets times every dilation; with the
    centre too, per dilation, when `centre`), borders replicated."""
    H, W = x.shape[-2:]
    offsets = [(0, 0), *_OFFSETS] if centre else _OFFSETS
    out = []
    for d in dilations:
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        out += [padded[..., d + dy * d : d + dy * d + H, d + dx * d : d + dx * d + W] for dy, dx in offsets]
    return torch.stack(out, dim=2)


def pamr(image: Tensor, scores: Tensor, steps: int = 10, dilations: Sequence[int] = (8, 16)) -> Tensor:
    """Pixel-adaptive mask refinement.

    Args:
        image: [B, K, H, W] the (normalised) image; scores: [B, C, h, w], resized to the image (bilinear, corners
            aligned) when their size differs.

    Returns:
        refined scores [B, C, H, W] at the image's size.
    """
    if image.shape[-2:] != scores.shape[-2:]:
        scores = F.interpolate(scores, size=image.shape[-2:], mode="bilinear", align_corners=True)
    image = image.float()
    spread = _neighbours(image, dilations, centre=True).std(2, keepdim=True)  # (B, K, 1, H, W)
    distance = (image.unsqueeze(2) - _neighbours(image, dilations)).abs()  # (B, K, P, H, W)
    affinity = (-distance / (1e-8 + 0.1 * spread)).mean(1, keepdim=True).softmax(2)  # (B, 1, P, H, W)
    refined = scores.float()
    for _ in range(steps):
        refined = (_neighbours(refined, dilations) * affinity).sum(2)  # (B, C, H, W)
    return refined.to(scores.dtype)


def area_keep(scores: Tensor, area_threshold: float) -> Tensor:
    """SCLIP's `area_thd` on per-channel scores [B, 1 + N, H, W] (channel 0 background; probabilities or any
    increasing function of them): [B, 1 + N] bool, False for the channels >= 1 whose argmax area is at most
    `area_threshold` times the summed foreground area."""
    labels = scores.argmax(1).flatten(1)  # (B, H*W)
    area = torch.zeros(scores.shape[:2], device=scores.device).scatter_add_(
        1, labels, torch.ones_like(labels, dtype=torch.float)
    )
    foreground = area[:, 1:]
    keep = foreground > area_threshold * foreground.sum(1, keepdim=True)  # (B, N)
    return torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)


def area_filter(probs: Tensor, area_threshold: float) -> Tensor:
    """`probs` [B, 1 + N, H, W] with the probabilities of the channels `area_keep` drops set to 0; 0 = off."""
    if not area_threshold:
        return probs
    return probs * area_keep(probs, area_threshold)[:, :, None, None].to(probs.dtype)

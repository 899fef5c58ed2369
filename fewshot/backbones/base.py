"""The interface every frozen backbone gives the heads.

Input: images [N, 3, H, W], uint8 or float in [0, 1] (the backbone applies its own mean/std normalisation), any H
and W (position embeddings are resampled; a ViT's input is resized to the nearest multiple of its patch, see
`prepare_images`).
Output: one NCHW feature map per selected layer.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def prepare_images(
    images: Tensor, mean: tuple[float, ...], std: tuple[float, ...], multiple: int = 1, dtype: torch.dtype | None = None
) -> Tensor:
    """uint8 or [0, 1] float images [N, 3, H, W] -> normalised float [N, 3, H', W'].

    H' and W' are H and W rounded to the nearest multiple of `multiple` (at least one), reached by a bilinear resize, so
    the feature grid still covers the whole image evenly (a pad would shift it); `multiple=1` leaves the size alone.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"backbone input must be images [N, 3, H, W], got shape {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    height, width = images.shape[-2:]
    size = tuple(max(1, int(side / multiple + 0.5)) * multiple for side in (height, width))
    if size != (height, width):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    shift, scale = _normalizer(tuple(mean), tuple(std), x.device)
    x = (x - shift) / scale
    return x if dtype is None else x.to(dtype)


@functools.lru_cache(maxsize=32)
def _normalizer(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """mean and std as [1, 3, 1, 1] tensors on `device`, made once: a copy to the GPU per call would wait for the
    GPU's queue and stall the host."""
    as_tensor = functools.partial(torch.tensor, dtype=torch.float32, device=device)
    with torch.inference_mode(False):  # normal tensors, usable in and outside inference mode
        return as_tensor(mean).view(1, 3, 1, 1), as_tensor(std).view(1, 3, 1, 1)


class Backbone(nn.Module):
    """Base class: subclasses fill `feature_info`, `mean`, `std`, `patch_size` and `forward_intermediates`."""

    feature_info: list[dict]  # per selected layer: {"num_chs": C, "reduction": stride, "index": block/stage index}
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    identity: str  # "<family>:<name>|<weights>|<layers>": keys feature caches
    patch_size: int  # input sides are resized to a multiple of this (the ViT patch; 1 for CNNs)

    def forward_intermediates(self, images: Tensor) -> list[Tensor]:
        """images [N, 3, H, W] in [0, 1] -> features of the selected layers, each [N, C_l, H / s_l, W / s_l]."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.forward_intermediates(images)

    @property
    def channels(self) -> list[int]:
        return [info["num_chs"] for info in self.feature_info]

    @property
    def strides(self) -> list[int]:
        return [info["reduction"] for info in self.feature_info]

    def train(self, mode: bool = True) -> Backbone:
        """A frozen backbone stays in eval mode (norm statistics and dropout fixed) whatever the caller asks."""
        super().train(False if getattr(self, "frozen", True) else mode)
        return self


def resolve_layers(layers: list[int], count: int, what: str) -> list[int]:
    """Config layer indices (negative count from the end) -> sorted absolute indices in [0, count)."""
    if not layers:
        raise ValueError(f"model.backbone.layers is empty; give block/stage indices of {what}, e.g. [-1]")
    bad = [i for i in layers if not -count <= i < count]
    if bad:
        raise ValueError(f"model.backbone.layers {bad} out of range for {what}: valid are {-count}..{count - 1}")
    resolved = sorted({i % count for i in layers})
    if len(resolved) != len(layers):
        raise ValueError(f"model.backbone.layers {layers} repeats a layer for {what} (negatives count from the end)")
    return resolved

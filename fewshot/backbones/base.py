"""The interface every frozen backbone gives the heads.

Input: images [N, 3, H, W], float in [0, 1] (the backbone applies its own mean/std normalisation), any H and W
(position embeddings are resampled; sizes are padded or resized to a multiple of the patch where the model needs it).
Output: one NCHW feature map per selected layer.
"""

from __future__ import annotations

from torch import Tensor, nn


class Backbone(nn.Module):
    """Base class: subclasses fill `feature_info`, `mean`, `std`, `patch_size` and `forward_intermediates`."""

    feature_info: list[dict]  # per selected layer: {"num_chs": C, "reduction": stride, "index": block/stage index}
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    identity: str  # "<family>:<name>|<weights>|<layers>": keys feature caches

    def forward_intermediates(self, images: Tensor) -> list[Tensor]:
        """images [N, 3, H, W] in [0, 1] -> features of the selected layers, each [N, C_l, H / s_l, W / s_l]."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.forward_intermediates(images)

    @property
    def channels(self) -> list[int]:
        return [info["num_chs"] for info in self.feature_info]

    def train(self, mode: bool = True) -> Backbone:
        """A frozen backbone stays in eval mode (norm statistics and dropout fixed) whatever the caller asks."""
        super().train(False if getattr(self, "frozen", True) else mode)
        return self

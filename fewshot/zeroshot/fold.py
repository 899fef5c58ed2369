"""Zero-shot numbers on the few-shot folds: text instead of support images (LSeg's protocol).

Each test episode asks for one class c of the fold. The segmenter scores background and every class of the fold;
a pixel is foreground when c wins, so the other classes of the fold count as background. The supports are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..backbones.weights import parse_weights
from ..config import Config, to_dict
from ..text import readable_name
from .dense_clip import DenseCLIP
from .segmenter import ZeroShotSegmenter


class TextEpisodeModel(nn.Module):
    """The few-shot model interface over a ZeroShotSegmenter: (query, supports, masks, class_ids) -> [B, 2, H, W].

    The model reports its part of the results' protocol (`protocol_fields()`, fewshot.provenance): 0 shots (the
    zero-shot column), no shot fusion, and what `from_config` adds: backbone, weights, head and the zeroshot settings.

    Args:
        segmenter: built over the prompts of `class_ids`, in the same order.
        class_ids: dataset class ids of the segmenter's classes (the fold's novel classes).
        protocol_fields: what defines the model in the protocol beyond its identity.
    """

    def __init__(
        self, segmenter: ZeroShotSegmenter, class_ids: Sequence[int], protocol_fields: dict[str, Any] | None = None
    ):
        super().__init__()
        if len(class_ids) != segmenter.num_classes:
            raise ValueError(f"{len(class_ids)} class ids for a segmenter of {segmenter.num_classes} classes")
        self.segmenter = segmenter
        self.class_ids = [int(c) for c in class_ids]
        self.identity = f"{segmenter.identity}|classes{','.join(map(str, self.class_ids))}"
        self._protocol_fields = {"shots": 0, "shot_fusion": "none", **(protocol_fields or {})}

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        class_names: dict[int, str],
        class_ids: Sequence[int],
        device: torch.device | str | None = None,
    ) -> TextEpisodeModel:
        """Prompts from the dataset's names of `class_ids` ('pottedplant' -> 'potted plant'), `zeroshot.*` settings;
        built on `device` (the prompts are encoded there)."""
        missing = [c for c in class_ids if c not in class_names]
        if missing:
            raise KeyError(f"class ids {missing} have no name; the dataset names {sorted(class_names)}")
        prompts = [readable_name(class_names[c]) for c in class_ids]
        z = cfg.zeroshot
        dense = DenseCLIP.from_config(z).to(device)
        fields = {
            "backbone": z.backbone,
            "pretrained": str(parse_weights(z.pretrained)),  # normalised as fewshot.provenance records weights
            "head": f"zeroshot:{z.method}",
            "zeroshot": to_dict(z),
        }
        return cls(ZeroShotSegmenter.from_config(z, prompts, dense).to(device), class_ids, fields)

    def protocol_fields(self) -> dict[str, Any]:
        """The protocol's model fields: the supports are never looked at (0 shots), and what it was built with."""
        return dict(self._protocol_fields)

    def forward(
        self,
        query_image: Tensor,
        support_images: Tensor | None = None,
        support_masks: Tensor | None = None,
        class_ids: Tensor | None = None,
    ) -> Tensor:
        """query_image [B,3,H,W] -> logits [B,2,H,W]: channel 1 the episode class's log-probability, channel 0 the
        best of background and the other classes. Supports are ignored."""
        if class_ids is None:
            raise ValueError("TextEpisodeModel needs class_ids: the class each episode asks for")
        unknown = sorted({int(c) for c in class_ids.tolist()} - set(self.class_ids))
        if unknown:
            raise ValueError(f"episode classes {unknown} are not among the prompted classes {self.class_ids}")
        scores = self.segmenter(query_image)  # (B, 1 + N, H, W); channel 0 background
        channel = torch.tensor([1 + self.class_ids.index(int(c)) for c in class_ids.tolist()], device=scores.device)
        index = channel.view(-1, 1, 1, 1).expand(-1, 1, *scores.shape[-2:])
        fg = scores.gather(1, index)  # (B, 1, H, W)
        others = scores.scatter(1, index, float("-inf")).amax(1, keepdim=True)  # (B, 1, H, W)
        return torch.cat([others, fg], dim=1)

    def encode(self, images: Tensor) -> list[Tensor]:
        """The episode path's backbone pass (fewshot.cache.Encoder): the images themselves, [N,3,H,W] as one layer;
        the segmenter runs on each whole query in `forward_features`, so there are no features to share or cache."""
        return [images]

    def forward_features(
        self,
        query_feats: list[Tensor],
        support_feats: list[Tensor],
        support_masks: Tensor,
        class_ids: Tensor | None,
        out_size: tuple[int, int],
    ) -> Tensor:
        """`forward` on the query images `encode` passed through: logits [B,2,H,W] (supports ignored)."""
        return self(query_feats[0], class_ids=class_ids)

"""Prototype-matching head (PANet): masked average pooling of support features, cosine similarity to the query.

Per selected backbone layer, the support masks are resized to the feature grid by area weighting (each cell gets the
fraction of its pixels that are foreground, and of those that are background; void counts as neither), giving a
foreground and a background prototype per shot. K shots are fused by averaging the prototypes of the shots where the
region is present, which does not depend on the order of the supports.

Empty regions: when no shot has a foreground pixel, the foreground prototype is the zero vector and its similarity
map is set to -1 (the lowest cosine) everywhere, so the training-free head predicts background everywhere (argmax
ties go to background). An empty background likewise gets -1 on the background channel. Never NaN.

`trainable: False` has no parameters: logits = temperature * mean over layers of the cosine maps. `trainable: True`
adds a 1x1 projection per layer, learned layer weights and a small conv decoder that refines the fused maps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.config import ModelConfig
from fewshot.losses import cross_entropy
from fewshot.metrics import predict_mask


def region_weights(masks: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Fraction of each feature cell covered by foreground and by background.

    Args:
        masks: [..., H, W] with 0 background, 1 foreground, 255 void (void counts as neither).
        size: (h, w) of the feature grid.

    Returns:
        fg, bg: [..., h, w] float in [0, 1]. Area weighting keeps every object: one foreground pixel gives a
        positive weight to the cells it falls in.
    """
    lead, (H, W) = masks.shape[:-2], masks.shape[-2:]
    both = torch.stack([masks == 1, masks == 0], dim=-3).float().reshape(-1, 2, H, W)  # (N, 2, H, W)
    both = F.interpolate(both, size=tuple(size), mode="area")  # (N, 2, h, w)
    both = both.reshape(*lead, 2, *both.shape[-2:])  # (..., 2, h, w)
    return both[..., 0, :, :], both[..., 1, :, :]


def masked_average(feats: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted mean feature of each map.

    Args:
        feats: [N, C, h, w].
        weights: [N, h, w], non-negative.

    Returns:
        prototypes [N, C] (the zero vector where the weights sum to 0) and present [N] (bool, weights sum > 0).
    """
    weights = weights.to(feats.dtype)
    total = weights.sum(dim=(1, 2))  # (N,)
    summed = torch.einsum("nchw,nhw->nc", feats, weights)
    return summed / total.clamp_min(1e-6)[:, None], total > 0


def shot_prototypes(support_feats: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Prototypes of one region averaged over the shots where the region is present.

    Args:
        support_feats: [B, S, C, h, w].
        weights: [B, S, h, w] region weights on the feature grid.

    Returns:
        prototypes [B, C] (zero vector when no shot holds the region) and present [B] (bool).
    """
    B, S = support_feats.shape[:2]
    protos, present = masked_average(support_feats.flatten(0, 1), weights.flatten(0, 1))
    protos, present = protos.view(B, S, -1), present.view(B, S)  # (B, S, C), (B, S)
    count = present.sum(dim=1)  # (B,)
    mean = (protos * present[..., None].to(protos.dtype)).sum(dim=1) / count.clamp_min(1)[:, None].to(protos.dtype)
    return mean, count > 0


def check_supports(support_feats: list[Tensor], support_masks: Tensor) -> None:
    """Raises ValueError naming both shapes when support features and masks disagree on [B, S]."""
    if support_masks.dim() != 4 or any(f.shape[:2] != support_masks.shape[:2] for f in support_feats):
        shapes = [tuple(f.shape) for f in support_feats]
        raise ValueError(
            f"support_masks {tuple(support_masks.shape)} must be [B, S, H, W] with the same B, S as the support "
            f"features {shapes}"
        )


def similarity_maps(query: Tensor, support: Tensor, support_masks: Tensor) -> Tensor:
    """Cosine similarity of query features to the [bg, fg] prototypes of the supports.

    Args:
        query: [B, C, h, w]; support: [B, S, C, h', w']; support_masks: [B, S, H, W].

    Returns:
        [B, 2, h, w] in [-1, 1]; a channel whose region is absent from every shot is -1.
    """
    fg_w, bg_w = region_weights(support_masks, support.shape[-2:])
    maps = []
    for weights in (bg_w, fg_w):
        proto, present = shot_prototypes(support, weights)  # (B, C), (B,)
        sim = F.cosine_similarity(query, proto[:, :, None, None], dim=1, eps=1e-8)  # (B, h, w)
        maps.append(torch.where(present[:, None, None], sim, torch.full_like(sim, -1.0)))
    return torch.stack(maps, dim=1)


class PrototypeHead(nn.Module):
    """PANet-style prototype matching over several layers, training-free or with a light learned projection."""

    def __init__(
        self,
        channels: list[int],
        temperature: float = 20.0,
        trainable: bool = True,
        proj_dim: int = 128,
        align_loss: float = 0.0,
        decoder_dim: int = 32,
    ):
        super().__init__()
        if not channels:
            raise ValueError("PrototypeHead needs at least one feature layer (model.backbone.layers is empty)")
        self.temperature = temperature
        self.trainable = trainable
        self.align_loss = align_loss
        if trainable:
            self.proj = nn.ModuleList(nn.Conv2d(c, proj_dim, kernel_size=1) for c in channels)
            self.layer_logits = nn.Parameter(torch.zeros(len(channels)))  # softmax -> layer fusion weights
            self.refine = nn.Sequential(
                nn.Conv2d(2 * len(channels), decoder_dim, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(decoder_dim, decoder_dim, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(decoder_dim, 2, kernel_size=1),
            )

    @classmethod
    def from_config(
        cls, model_cfg: ModelConfig, channels: list[int], class_names: dict[int, str] | None = None, text: Any = None
    ) -> PrototypeHead:
        """The head `model_cfg` configures; class names and the text source are for text-conditioned heads."""
        p = model_cfg.prototype
        return cls(channels, p.temperature, p.trainable, p.proj_dim, p.align_loss)

    def forward(
        self,
        query_feats: list[Tensor],
        support_feats: list[Tensor],
        support_masks: Tensor,
        class_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, 2, h, w] on the finest feature grid.

        Args:
            query_feats: per layer [B, C_l, h_l, w_l].
            support_feats: per layer [B, S, C_l, h_l, w_l].
            support_masks: [B, S, H, W] in {0, 1, 255}.
            class_ids: unused.
        """
        check_supports(support_feats, support_masks)
        size = max((f.shape[-2:] for f in query_feats), key=lambda s: s[0] * s[1])
        maps = []  # per layer (B, 2, h, w) on the finest grid
        for layer, (query, support) in enumerate(zip(query_feats, support_feats, strict=True)):
            if self.trainable:
                query = self.proj[layer](query)
                support = self.proj[layer](support.flatten(0, 1)).unflatten(0, support.shape[:2])
            sim = similarity_maps(query, support, support_masks)
            maps.append(F.interpolate(sim, size=size, mode="bilinear", align_corners=False))
        stacked = torch.stack(maps, dim=0)  # (L, B, 2, h, w)
        if not self.trainable:
            return self.temperature * stacked.mean(dim=0)
        weights = self.layer_logits.softmax(dim=0).to(stacked.dtype)
        fused = self.temperature * torch.einsum("l,lbchw->bchw", weights, stacked)
        return fused + self.refine(torch.cat(maps, dim=1))

    def auxiliary_loss(
        self, query_feats: list[Tensor], support_feats: list[Tensor], support_masks: Tensor, logits: Tensor
    ) -> Tensor:
        """PANet's prototype alignment loss, already weighted by `align_loss` (0 when off or training-free).

        The query prediction (argmax of `logits` [B, 2, H', W'], no gradient) serves as a 1-shot support mask; each
        support image is then segmented from the query's prototypes and scored with cross-entropy against its own
        mask (void ignored).
        """
        if not self.trainable or self.align_loss == 0:
            return logits.new_zeros((), dtype=torch.float32)
        B, S = support_masks.shape[:2]
        pred = predict_mask(logits.detach())  # (B, H', W')
        queries = [f.flatten(0, 1) for f in support_feats]  # (B*S, C, h, w): every support becomes a query
        supports = [f.repeat_interleave(S, dim=0)[:, None] for f in query_feats]  # (B*S, 1, C, h, w)
        masks = pred.repeat_interleave(S, dim=0)[:, None]  # (B*S, 1, H', W')
        support_logits = self(queries, supports, masks)
        target = support_masks.flatten(0, 1)  # (B*S, H, W)
        support_logits = F.interpolate(support_logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return self.align_loss * cross_entropy(support_logits, target)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, trainable={self.trainable}, align_loss={self.align_loss}"

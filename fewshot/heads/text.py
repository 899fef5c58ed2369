"""Text-conditioned head (LSeg / CLIPSeg style): the class's CLIP text embedding conditions a light decoder.

The backbone is a frozen open_clip ViT (`model.backbone.name: open_clip:<name>`). At construction the text tower of
that same CLIP model (`OpenClipBackbone.encode_text`) embeds every class name of the dataset (templates from
`model.text.templates`), one row per synonym, into buffers saved with the head, so a checkpoint carries them and
testing it encodes no prompt (`fewshot.text.StoredText`). Per episode and synonym:

    x    = sum over layers of proj_l(query_feats[l])               (B, dim, h, w), on the finest grid
    c    = text_proj(text[synonym]) [+ proto_proj(support prototype) with model.text.use_supports]
    x    = decoder(x * (1 + gamma(c)) + beta(c))                     FiLM conditioning (CLIPSeg)
    fg   = scale * cos(pixel(x), c),  bg = scale * cos(pixel(x), background)   (LSeg's pixel-text read-out)

A class with synonyms ('tv monitor,television') takes, at each pixel, the synonym whose foreground probability is
highest: the synonym rule of the zero-shot segmenter (fewshot/text.py). Trained per fold on base-class names, it is
tested on the novel names: LSeg's zero-shot protocol. Supports are ignored unless `use_supports` is set.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.config import ModelConfig
from fewshot.heads.prototype import check_supports, region_weights, shot_prototypes
from fewshot.text import ClassEmbeddings, parse_class, readable_name

log = logging.getLogger(__name__)


class TextSource(Protocol):
    """Where class embeddings come from: a backbone's text tower (`OpenClipBackbone`) or a checkpoint (`StoredText`)."""

    def encode_text(self, classes: list[tuple[str, ...]], templates: str) -> ClassEmbeddings: ...


def class_text_embeddings(text: TextSource, class_names: dict[int, str], templates: str) -> tuple[Tensor, Tensor]:
    """A dataset's class names -> (embeddings [M, D], owner [M] class id of each row), one row per synonym, rows in
    class-id order. Names go through `fewshot.text.readable_name` ('pottedplant' -> 'potted plant')."""
    if not class_names:
        raise ValueError("model.head=text needs the dataset's class names (build_head(..., class_names={id: name}))")
    ids = sorted(class_names)
    encoded = text.encode_text([parse_class(readable_name(class_names[i])) for i in ids], templates)
    return encoded.embeddings, torch.tensor(ids, dtype=torch.long)[encoded.owner]


class TextHead(nn.Module):
    """Decoder over frozen backbone features conditioned on the class's text embedding (and optionally supports).

    Args:
        channels: channels of each backbone layer.
        text_embeddings: [M, D] text embedding per synonym row.
        text_owner: [M] class id (1-based) of each row; rows of one class are adjacent, classes in id order.
        dim: decoder width.
        use_supports: add a support prototype to the text conditioning.
    """

    def __init__(
        self,
        channels: list[int],
        text_embeddings: Tensor,
        text_owner: Tensor | None = None,
        dim: int = 128,
        use_supports: bool = False,
    ):
        super().__init__()
        if not channels:
            raise ValueError("TextHead needs at least one feature layer (model.backbone.layers is empty)")
        owner = torch.arange(1, len(text_embeddings) + 1) if text_owner is None else text_owner.long()
        if len(owner) != len(text_embeddings) or bool((owner[1:] < owner[:-1]).any()) or int(owner.min()) < 1:
            raise ValueError("text_owner must give a class id >= 1 per embedding row, rows sorted by class id")
        self.use_supports = use_supports
        self.register_buffer("text_embeddings", text_embeddings.float().clone())  # (M, D), saved with the head
        self.register_buffer("text_owner", owner.clone())  # (M,)
        embed_dim = text_embeddings.shape[1]
        groups = math.gcd(8, dim)
        self.proj = nn.ModuleList(nn.Conv2d(c, dim, kernel_size=1) for c in channels)
        self.text_proj = nn.Linear(embed_dim, dim)
        self.proto_proj = nn.Linear(dim, dim) if use_supports else None
        self.film = nn.Linear(dim, 2 * dim)
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, padding=1),
            nn.GroupNorm(groups, dim),
            nn.GELU(),
            nn.Conv2d(dim, dim, kernel_size=3, padding=1),
            nn.GroupNorm(groups, dim),
            nn.GELU(),
        )
        self.pixel = nn.Conv2d(dim, dim, kernel_size=1)
        self.background = nn.Parameter(torch.randn(dim) * dim**-0.5)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    @classmethod
    def from_config(
        cls,
        model_cfg: ModelConfig,
        channels: list[int],
        class_names: dict[int, str] | None,
        text: TextSource | None = None,
    ) -> TextHead:
        """`text`: the backbone (its text tower encodes the class names where the backbone is) or a checkpoint's
        StoredText; a backbone without a text tower is an error saying what the head needs."""
        if text is None:
            raise ValueError(
                f"model.head=text needs an open_clip backbone for its text tower: set model.backbone.name to "
                f"open_clip:<model> (e.g. open_clip:ViT-B-16), not {model_cfg.backbone.name!r}"
            )
        cfg = model_cfg.text
        embeddings, owner = class_text_embeddings(text, class_names or {}, cfg.templates)
        return cls(channels, embeddings, owner, cfg.dim, cfg.use_supports)

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
            support_feats: per layer [B, S, C_l, h_l, w_l] (used with use_supports only).
            support_masks: [B, S, H, W] in {0, 1, 255}.
            class_ids: [B] dataset class ids (1-based); required.
        """
        if class_ids is None:
            raise ValueError("TextHead needs class_ids: the text embedding of each episode's class conditions it")
        rows, episode, counts = self._rows(class_ids)
        size = max((f.shape[-2:] for f in query_feats), key=lambda s: s[0] * s[1])
        x = sum(self._project(layer, f, size) for layer, f in enumerate(query_feats))  # (B, dim, h, w)
        cond = self.text_proj(self.text_embeddings[rows].to(x.dtype))  # (R, dim): one per synonym row
        if self.use_supports:
            check_supports(support_feats, support_masks)
            B, S = support_masks.shape[:2]
            support = sum(self._project(i, f.flatten(0, 1), size) for i, f in enumerate(support_feats))
            fg_weights, _ = region_weights(support_masks, size)  # (B, S, h, w)
            proto, _ = shot_prototypes(support.unflatten(0, (B, S)), fg_weights)  # (B, dim), zero when absent
            cond = cond + self.proto_proj(proto)[episode]
        if len(rows) > len(class_ids):
            x = x[episode]  # (R, dim, h, w): the query once per synonym of its class
        gamma, beta = self.film(cond)[:, :, None, None].chunk(2, dim=1)  # (R, dim, 1, 1) each
        x = self.pixel(self.decoder(x * (1 + gamma) + beta))
        pixels = F.normalize(x, dim=1)
        fg = torch.einsum("bchw,bc->bhw", pixels, F.normalize(cond, dim=1))
        bg = torch.einsum("bchw,c->bhw", pixels, F.normalize(self.background, dim=0).to(x.dtype))
        logits = self.log_scale.exp() * torch.stack([bg, fg], dim=1)  # (R, 2, h, w)
        return logits if len(rows) == len(class_ids) else best_synonym(logits, counts)

    def _rows(self, class_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Embedding rows of the episodes' classes [R], the episode of each row [R] and rows per episode [B]."""
        per_class = torch.bincount(self.text_owner)  # (K + 1,) rows of each class id
        known = (class_ids >= 1) & (class_ids < len(per_class))
        if not bool(known.all()) or not bool((per_class[class_ids.clamp(0, len(per_class) - 1)] > 0).all()):
            raise ValueError(
                f"class_ids {class_ids.tolist()} include classes whose names the head did not embed at construction "
                f"(it has {sorted(set(self.text_owner.tolist()))})"
            )
        counts = per_class[class_ids]  # (B,)
        first = (per_class.cumsum(0) - per_class)[class_ids]  # (B,) first row of each episode's class
        episode = torch.repeat_interleave(torch.arange(len(class_ids), device=class_ids.device), counts)  # (R,)
        offset = torch.arange(len(episode), device=class_ids.device) - (counts.cumsum(0) - counts)[episode]
        return first[episode] + offset, episode, counts

    def _project(self, layer: int, feats: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.proj[layer](feats)
        return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        classes = len(set(self.text_owner.tolist()))
        return f"classes={classes}, rows={len(self.text_owner)}, use_supports={self.use_supports}"


def best_synonym(logits: Tensor, counts: Tensor) -> Tensor:
    """Per synonym logits [R, 2, h, w], rows of each episode adjacent, `counts` [B] rows per episode -> [B, 2, h, w]:
    at each pixel the (bg, fg) pair of the synonym with the highest foreground probability (largest fg - bg)."""
    first = counts.cumsum(0) - counts  # (B,) first row of each episode
    best = logits[first]  # (B, 2, h, w)
    for slot in range(1, int(counts.max())):
        has = (counts > slot).nonzero().squeeze(1)  # episodes with a synonym in this slot
        candidate, current = logits[first[has] + slot], best[has]
        better = (candidate[:, 1] - candidate[:, 0] > current[:, 1] - current[:, 0])[:, None]  # (n, 1, h, w)
        best = best.index_copy(0, has, torch.where(better, candidate, current))
    return best

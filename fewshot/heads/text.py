"""Text-conditioned head (LSeg / CLIPSeg style): the class's CLIP text embedding conditions a light decoder.

The backbone is a frozen open_clip ViT (`model.backbone.name: open_clip:<name>`). At construction the text tower of
the same open_clip model and weights embeds every class name of the dataset (templates from `model.text.templates`,
synonyms averaged) into a buffer indexed by class id, saved with the head. Per episode:

    x    = sum over layers of proj_l(query_feats[l])               (B, dim, h, w), on the finest grid
    c    = text_proj(text[class_id]) [+ proto_proj(support prototype) with model.text.use_supports]
    x    = decoder(x * (1 + gamma(c)) + beta(c))                     FiLM conditioning (CLIPSeg)
    fg   = scale * cos(pixel(x), c),  bg = scale * cos(pixel(x), background)   (LSeg's pixel-text read-out)

Trained per fold on base-class names, it is tested on the novel names: LSeg's zero-shot protocol. Supports are
ignored unless `use_supports` is set.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.config import ModelConfig
from fewshot.heads.prototype import check_supports, region_weights, shot_prototypes

log = logging.getLogger(__name__)


def open_clip_name(backbone_name: str) -> str:
    """'open_clip:ViT-B-16' -> 'ViT-B-16'; any other family is an error saying what the text head needs."""
    family, _, name = backbone_name.partition(":")
    if family != "open_clip" or not name:
        raise ValueError(
            f"model.head=text needs an open_clip backbone for its text tower: set model.backbone.name to "
            f"open_clip:<model> (e.g. open_clip:ViT-B-16), not {backbone_name!r}"
        )
    return name


def class_text_embeddings(
    name: str, pretrained: str, class_names: dict[int, str], templates: str, device: torch.device | str = "cpu"
) -> Tensor:
    """CLIP text embeddings of a dataset's classes: [max_id + 1, D] on the CPU (row = class id; row 0 'background').

    Each class name goes through `fewshot.text.readable_name` ('pottedplant' -> 'potted plant'); synonyms are averaged
    and re-normalised. The text tower runs on `device` (80 templates x 80 COCO classes take minutes on a CPU).
    """
    import open_clip

    from fewshot.backbones.weights import create_open_clip_model
    from fewshot.text import TextEncoder, parse_class, readable_name

    if not class_names:
        raise ValueError("model.head=text needs the dataset's class names (build_head(..., class_names={id: name}))")
    model = create_open_clip_model(name, pretrained).to(device)
    encoder = TextEncoder(model, open_clip.get_tokenizer(name), f"{name}|{pretrained}")
    ids = sorted(class_names)
    classes = [("background",)] + [parse_class(readable_name(class_names[i])) for i in ids]
    encoded = encoder.encode(classes, templates)
    per_class = torch.zeros(len(classes), encoded.embeddings.shape[1]).index_add_(0, encoded.owner, encoded.embeddings)
    per_class = F.normalize(per_class, dim=1)  # synonym mean, re-normalised
    table = torch.zeros(max(ids) + 1, per_class.shape[1])
    table[0] = per_class[0]
    table[torch.tensor(ids)] = per_class[1:]
    return table


class TextHead(nn.Module):
    """Decoder over frozen backbone features conditioned on the class's text embedding (and optionally supports).

    Args:
        channels: channels of each backbone layer.
        text_embeddings: [K + 1, D] text embedding per class id (row 0 unused).
        dim: decoder width.
        use_supports: add a support prototype to the text conditioning.
    """

    def __init__(self, channels: list[int], text_embeddings: Tensor, dim: int = 128, use_supports: bool = False):
        super().__init__()
        if not channels:
            raise ValueError("TextHead needs at least one feature layer (model.backbone.layers is empty)")
        self.use_supports = use_supports
        self.register_buffer("text_embeddings", text_embeddings.float().clone())  # saved with the head
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
    def from_config(cls, model_cfg: ModelConfig, channels: list[int], class_names: dict[int, str] | None) -> TextHead:
        name = open_clip_name(model_cfg.backbone.name)
        text = model_cfg.text
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a one-off computation at construction
        embeddings = class_text_embeddings(
            name, model_cfg.backbone.pretrained, class_names or {}, text.templates, device
        )
        return cls(channels, embeddings, text.dim, text.use_supports)

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
        if int(class_ids.max()) >= len(self.text_embeddings) or int(class_ids.min()) < 1:
            raise ValueError(
                f"class_ids {class_ids.tolist()} outside 1..{len(self.text_embeddings) - 1}, the classes whose names "
                "the head embedded at construction"
            )
        size = max((f.shape[-2:] for f in query_feats), key=lambda s: s[0] * s[1])
        x = sum(self._project(layer, f, size) for layer, f in enumerate(query_feats))  # (B, dim, h, w)
        cond = self.text_proj(self.text_embeddings[class_ids].to(x.dtype))  # (B, dim)
        if self.use_supports:
            check_supports(support_feats, support_masks)
            B, S = support_masks.shape[:2]
            support = sum(self._project(i, f.flatten(0, 1), size) for i, f in enumerate(support_feats))
            fg_weights, _ = region_weights(support_masks, size)  # (B, S, h, w)
            proto, _ = shot_prototypes(support.unflatten(0, (B, S)), fg_weights)  # (B, dim), zero when absent
            cond = cond + self.proto_proj(proto)
        gamma, beta = self.film(cond)[:, :, None, None].chunk(2, dim=1)  # (B, dim, 1, 1) each
        x = self.pixel(self.decoder(x * (1 + gamma) + beta))
        pixels = F.normalize(x, dim=1)
        fg = torch.einsum("bchw,bc->bhw", pixels, F.normalize(cond, dim=1))
        bg = torch.einsum("bchw,c->bhw", pixels, F.normalize(self.background, dim=0).to(x.dtype))
        return self.log_scale.exp() * torch.stack([bg, fg], dim=1)

    def auxiliary_loss(
        self, query_feats: list[Tensor], support_feats: list[Tensor], support_masks: Tensor, logits: Tensor
    ) -> Tensor:
        """No auxiliary loss: 0."""
        return logits.new_zeros((), dtype=torch.float32)

    def _project(self, layer: int, feats: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.proj[layer](feats)
        return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"classes={len(self.text_embeddings) - 1}, use_supports={self.use_supports}"

"""Segmentation heads: everything between the frozen backbone's features and the 2-class logits.

A head class in HEADS provides `from_config(model_cfg, channels, class_names, text)` (class names and `text`, where
class embeddings come from: the backbone's text tower or a checkpoint, are for text-conditioned heads) and
`forward(query_feats, support_feats, support_masks, class_ids) -> logits [B, 2, h', w']` with
query_feats per layer [B, C_l, h_l, w_l], support_feats per layer [B, S, C_l, h_l, w_l], support_masks [B, S, H, W]
(0 / 1 / 255, void counts as not-foreground) and class_ids [B] or None; plus
optionally `auxiliary_loss(query_feats, support_feats, support_masks, logits) -> scalar` (already weighted; a head
without one adds nothing). `MODEL_HEADS` adds the SAM heads, which are models of their own (fewshot.sam.model).
"""

from __future__ import annotations

from torch import nn

from fewshot.config import ModelConfig
from fewshot.heads.prototype import PrototypeHead
from fewshot.heads.text import TextHead, TextSource
from fewshot.heads.transformer import TransformerHead
from fewshot.sam import SAM_HEADS

HEADS = {
    "prototype": PrototypeHead,
    "transformer": TransformerHead,
    "text": TextHead,  # text-conditioned (LSeg / CLIPSeg style): needs class_names and an open_clip backbone
}

# Every valid model.head: the feature heads above, and the heads that prompt SAM (fewshot.sam.SAM_HEADS), a different
# kind (they need SAM embeddings and the query size, so they come with their own model class and tests,
# tests/test_sam_model.py, rather than the registry tests of HEADS).
MODEL_HEADS = {**HEADS, **SAM_HEADS}


def build_head(
    model_cfg: ModelConfig,
    channels: list[int],
    class_names: dict[int, str] | None = None,
    text: TextSource | None = None,
) -> nn.Module:
    """The head named by `model_cfg.head`, for backbone layers with `channels` channels each."""
    if model_cfg.head not in HEADS:
        raise KeyError(f"unknown head {model_cfg.head!r} (model.head); choose from {sorted(HEADS)}")
    return HEADS[model_cfg.head].from_config(model_cfg, list(channels), class_names, text)

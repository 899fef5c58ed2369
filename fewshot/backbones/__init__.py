"""Frozen backbones behind one interface (`Backbone`): `build_backbone(cfg.model.backbone)`.

`cfg.name` is `<family>:<model>`: `timm:resnet50`, `timm:vit_small_patch14_dinov2`, `open_clip:ViT-B-16`.
Weights (`cfg.pretrained`) are parsed in `weights.parse_weights`: none, a tag, hf-hub:org/repo or a local file.
"""

from __future__ import annotations

from fewshot.backbones.base import Backbone
from fewshot.backbones.open_clip import OpenClipBackbone
from fewshot.backbones.timm import TimmBackbone
from fewshot.config import BackboneConfig

BACKBONES = {"timm": TimmBackbone, "open_clip": OpenClipBackbone}


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """The backbone `cfg.name` names, with `cfg.pretrained` weights, `cfg.layers` features, frozen if `cfg.frozen`."""
    family, sep, name = cfg.name.partition(":")
    if not sep or not name:
        raise ValueError(
            f"model.backbone.name={cfg.name!r} must be <family>:<model>, e.g. timm:resnet50 or open_clip:ViT-B-16; "
            f"families: {sorted(BACKBONES)}"
        )
    if family not in BACKBONES:
        raise KeyError(
            f"unknown backbone family {family!r} in model.backbone.name={cfg.name!r}; choose from {sorted(BACKBONES)}"
        )
    return BACKBONES[family](name, pretrained=cfg.pretrained, layers=list(cfg.layers), frozen=cfg.frozen)


__all__ = ["BACKBONES", "Backbone", "OpenClipBackbone", "TimmBackbone", "build_backbone"]

"""Zero-shot segmentation from text: dense CLIP features (MaskCLIP, SCLIP, ClearCLIP, NACLIP) against class prompts.

DenseCLIP(name, pretrained, method)       open_clip ViT with a dense last block: images -> [B, D, h, w]
ZeroShotSegmenter(dense, classes, ...)    images -> log-probabilities [B, 1 + N, H, W] (0 = background)
TextEpisodeModel(segmenter, class_ids)    the few-shot model interface with text instead of supports
"""

from __future__ import annotations

from .dense_clip import METHODS, DenseCLIP
from .fold import TextEpisodeModel
from .segmenter import ZeroShotSegmenter, window_boxes

__all__ = ["METHODS", "DenseCLIP", "TextEpisodeModel", "ZeroShotSegmenter", "window_boxes"]

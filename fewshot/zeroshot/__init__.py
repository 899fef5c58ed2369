"""Zero-shot segmentation from text: dense CLIP features (MaskCLIP, SCLIP, ClearCLIP, NACLIP) against class prompts.

DenseCLIP(name, pretrained, method)          the open_clip backbone with LAST_BLOCKS[method]: images -> [B, D, h, w]
ZeroShotSegmenter(dense, classes, ...)       images -> log-probabilities [B, 1 + N, H, W] (0 = background)
TextEpisodeModel(segmenter, class_ids)       the few-shot model interface with text instead of supports
proxy.ProxyCLIP(name, pretrained, vfm)       ProxyCLIP: a timm VFM's attention as CLIP's last block
refine                                       PAMR and SCLIP's area rule
benchmarks                                   the eight training-free benchmarks, their metric, official presets, table
"""

from __future__ import annotations

from .dense_clip import LAST_BLOCKS, DenseCLIP
from .fold import TextEpisodeModel
from .segmenter import DenseFeatures, ZeroShotSegmenter, window_boxes

__all__ = ["LAST_BLOCKS", "DenseCLIP", "DenseFeatures", "TextEpisodeModel", "ZeroShotSegmenter", "window_boxes"]

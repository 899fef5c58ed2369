"""Scoring through the real evaluation path: resized against original-resolution scoring on non-square images with
keep-aspect resizing, hand-computed, cached and uncached; and the crop of the keep-aspect padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from fewshot.backbones.base import Backbone
from fewshot.config import load_config
from fewshot.evaluation import at_original_resolution, evaluate_fold
from fewshot.model import FewShotSegmenter


class PixelBackbone(Backbone):
    """The image itself as the one feature layer [N, 3, S, S] (values in [0, 1]): the head sees the pixels."""

    def __init__(self):
        super().__init__()
        self.frozen = True
        self.feature_info = [{"num_chs": 3, "reduction": 1, "index": 0}]
        self.mean, self.std, self.patch_size = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1
        self.identity = "test:pixels|none|0"

    def forward_intermediates(self, images: Tensor) -> list[Tensor]:
        return [images]


class LeftHalfHead(nn.Module):
    """Foreground (logit +1 against 0) where the query has image content (a non-zero pixel) in the left half of the
    canvas, background (-1) elsewhere, the keep-aspect padding included."""

    def forward(self, query_feats, support_feats, support_masks, class_ids=None) -> Tensor:
        x = query_feats[0]  # (B, 3, S, S)
        left = torch.arange(x.shape[-1], device=x.device) < x.shape[-1] // 2
        fg = torch.where((x.sum(dim=1) > 0) & left, 1.0, -1.0)  # (B, S, S)
        return torch.stack([torch.zeros_like(fg), fg], dim=1)

    def auxiliary_loss(self, query_feats, support_feats, support_masks, logits) -> Tensor:
        return logits.new_zeros(())


def wide_images(root: Path, count: int = 3) -> Path:
    """`count` images of 4 x 8 pixels (grey 200) whose class mask is columns 0..2, in the generic folder layout."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("thing\n")
    mask = np.zeros((4, 8), np.uint8)
    mask[:, :3] = 1
    for n in range(count):
        Image.fromarray(np.full((4, 8, 3), 200, np.uint8)).save(root / "images" / f"im{n}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"im{n}.png")
    return root


# Hand computation. keep_aspect at image_size 4: the 4 x 8 image becomes 2 x 4 (scale 1/2) in the top rows of a
# 4 x 4 canvas. The head predicts foreground on rows 0-1, columns 0-1 of the canvas.
# - resized: the mask resized by nearest neighbour (pixel centres: source columns 1, 3, 5, 7) is [1, 0, 0, 0] on rows
#   0-1, void below. Foreground: I = 2, U = 4 -> 50 %. Background: I = 4 (columns 2-3), U = 6 -> 66.7 %.
# - original: the logits cropped to the 2 x 4 image part and resized bilinearly to 4 x 8 put foreground on columns
#   0-3 (column 3 samples 3/4 of canvas column 1 and 1/4 of column 2: 0.75 - 0.25 > 0). Against columns 0-2:
#   foreground I = 12, U = 16 -> 75 %; background I = 16 (columns 4-7), U = 20 -> 80 %.
# Stretching the uncropped canvas instead would give foreground rows 0-1, columns 0-3 only: 6 / 14 -> 42.9 %.
EXPECTED = {"resized": (50.0, 100 * (0.5 + 4 / 6) / 2), "original": (75.0, 100 * (0.75 + 0.8) / 2)}


@pytest.mark.parametrize("cache", ["auto", "off"])
@pytest.mark.parametrize("resolution", ["resized", "original"])
def test_keep_aspect_scoring_at_either_resolution_gives_the_hand_computed_iou(tmp_path, monkeypatch, resolution, cache):
    from episodes.folder import FolderSource

    root = wide_images(tmp_path / "wide")
    cfg = load_config(None, [
        "data.dataset=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=4",
        "data.resize=keep_aspect", f"data.eval_resolution={resolution}", "data.min_pixels=1", "data.episodes=3",
        "data.num_workers=0", "eval.batch_size=2", "eval.amp=none", "device=cpu", f"cache.features={cache}",
    ])  # fmt: skip
    loads: list[str] = []
    load_image = FolderSource.load_image
    monkeypatch.setattr(FolderSource, "load_image", lambda self, i: loads.append(i) or load_image(self, i))
    model = FewShotSegmenter(PixelBackbone(), LeftHalfHead(), head_name="left_half")
    results = evaluate_fold(cfg, model)
    miou, fbiou = EXPECTED[resolution]
    assert results["episodes"] == 3
    assert results["miou"] == pytest.approx(miou, abs=1e-9) and results["fbiou"] == pytest.approx(fbiou, abs=1e-9)
    assert len(loads) == (3 if cache == "auto" else 6)  # cached: each image decoded once; uncached: per episode


def test_score_at_original_resolution_crops_the_padding():
    logits = torch.zeros(2, 8, 8)
    logits[1, :4, :] = 1.0  # foreground over the top half, which holds the whole image for a 20 x 40 label
    logits[1, 4:, :] = 5.0  # padding: must be cropped away, not stretched into the label
    pred = at_original_resolution(logits, (20, 40), keep_aspect=True)
    assert pred.shape == (20, 40) and bool(pred.all())
    logits[1, :4, :] = -1.0
    assert not at_original_resolution(logits, (20, 40), keep_aspect=True).any()
    assert at_original_resolution(logits, (20, 40), keep_aspect=False)[-1].all()  # square: stretched

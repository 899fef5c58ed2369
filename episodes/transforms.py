"""Resizing and training augmentation of one (image, mask) pair, identical geometry for both.

    resize: square       image and mask resized to S x S (HSNet family)
    resize: keep_aspect  long side resized to S, then padded at the bottom / right to S x S with 0 (image) and 255
                         (mask) (PFENet family)
The image is resized bilinearly with antialiasing, the mask by nearest neighbour (pixel-centre aligned, so both
keep the same geometry). Training then applies one affine warp drawn from data.augment to both: horizontal flip,
scale, rotation about the centre and a random S x S crop of the scaled canvas (crop: False anchors it at the top
left instead), bilinear for the image, nearest for the mask; pixels coming from outside are 0 in the image and 255
(void) in the mask. With augmentation off the training output equals the evaluation output. Normalisation belongs
to the backbone: images stay uint8.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.config import AugmentConfig, DataConfig

VOID = 255


def build_transform(data: DataConfig, train: bool) -> EpisodeTransform:
    """The transform of data.resize at data.image_size, with data.augment when `train`."""
    return EpisodeTransform(data.image_size, data.resize, data.augment if train else None)


class EpisodeTransform:
    """(image [H0, W0, 3] uint8, mask [H0, W0] uint8, rng) -> (image uint8 [3, H, W], mask int64 [H, W]) at the model's
    input size.

    `augment` None means evaluation: deterministic, `rng` unused (may be None).
    """

    def __init__(self, size: int, resize: str, augment: AugmentConfig | None = None) -> None:
        if resize not in ("square", "keep_aspect"):
            raise ValueError(f"unknown data.resize {resize!r}; choose from square, keep_aspect")
        if size < 1:
            raise ValueError(f"data.image_size must be at least 1, got {size}")
        self.size, self.resize, self.augment = size, resize, augment

    @property
    def deterministic(self) -> bool:
        """Whether the output is a function of the input alone: evaluation, or training whose augmentation draws
        nothing that moves a pixel (no flip, rescale or rotation, and no random placement of a keep-aspect image on
        the canvas)."""
        aug = self.augment
        if aug is None:
            return True
        random_crop = aug.crop and self.resize == "keep_aspect"
        return not (aug.hflip or tuple(aug.scale) != (1.0, 1.0) or aug.rotate != 0 or random_crop)

    def identity(self) -> dict[str, Any]:
        """Everything the output pixels depend on besides the input (and, when random, the rng): the size, the resize
        mode and, unless deterministic, every augmentation setting. Part of the feature-cache key."""
        identity: dict[str, Any] = {"image_size": self.size, "resize": self.resize}
        if not self.deterministic:
            identity["augment"] = dataclasses.asdict(self.augment)
        return identity

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
            raise ValueError(
                f"expected image [H, W, 3] and mask [H, W] of the same size, got {image.shape} and {mask.shape}"
            )
        img, msk = self._apply(image, mask, rng)
        return img, msk.long()

    def mask_only(self, mask: np.ndarray, rng: np.random.Generator | None = None) -> Tensor:
        """mask [H0, W0] -> uint8 [H, W]: exactly the mask `self(image, mask, rng)` returns, with no image at all
        (the same affine is drawn from `rng`, consuming it alike)."""
        return self._apply(None, mask, rng)[1].to(torch.uint8)

    def _apply(
        self, image: np.ndarray | None, mask: np.ndarray, rng: np.random.Generator | None
    ) -> tuple[Tensor | None, Tensor]:
        h, w = mask.shape
        if self.resize == "square":
            base_h = base_w = self.size
        else:
            scale = self.size / max(h, w)
            base_h, base_w = max(1, round(h * scale)), max(1, round(w * scale))
        img = None if image is None else torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1)[None]
        msk = torch.from_numpy(np.asarray(mask, np.float32))[None, None]  # (1, 1, H, W)
        if (base_h, base_w) != (h, w):
            if img is not None:  # (1, 3, H, W), a copy
                img = F.interpolate(img, (base_h, base_w), mode="bilinear", align_corners=False, antialias=True)
            msk = F.interpolate(msk, (base_h, base_w), mode="nearest-exact")
        matrix = np.eye(3)
        if self.augment is not None:
            if rng is None:
                raise ValueError("a training transform needs an rng (np.random.Generator)")
            matrix = self._draw_affine(rng, base_h, base_w)
        if not np.allclose(matrix, np.eye(3), rtol=0, atol=1e-9):
            img, msk = self._warp(img, msk, matrix, (base_h, base_w))
        elif (base_h, base_w) != (self.size, self.size):  # no warp: the evaluation padding, exactly
            pad = (0, self.size - base_w, 0, self.size - base_h)
            img = None if img is None else F.pad(img, pad, value=0.0)
            msk = F.pad(msk, pad, value=float(VOID))
        img = None if img is None else img[0].round().clamp(0, 255).to(torch.uint8)
        return img, msk[0, 0]

    def _draw_affine(self, rng: np.random.Generator, base_h: int, base_w: int) -> np.ndarray:
        """3x3 matrix taking continuous coordinates in the resized image to the output frame."""
        aug, size = self.augment, self.size
        matrix = np.eye(3)
        if aug.hflip and rng.random() < 0.5:
            matrix = np.array([[-1.0, 0, base_w], [0, 1, 0], [0, 0, 1]]) @ matrix
        low, high = aug.scale
        scale = rng.uniform(low, high) if high > low else low
        matrix = np.diag([scale, scale, 1.0]) @ matrix
        canvas_w, canvas_h = base_w * scale, base_h * scale
        if aug.rotate > 0:
            angle = math.radians(rng.uniform(-aug.rotate, aug.rotate))
            cx, cy, cos, sin = canvas_w / 2, canvas_h / 2, math.cos(angle), math.sin(angle)
            rotate = np.array([[cos, -sin, cx - cos * cx + sin * cy], [sin, cos, cy - sin * cx - cos * cy], [0, 0, 1]])
            matrix = rotate @ matrix
        if aug.crop:  # a random S x S window of the canvas, or the canvas at a random place inside it
            ox = (canvas_w - size) * rng.random()
            oy = (canvas_h - size) * rng.random()
        else:
            ox = oy = 0.0
        return np.array([[1.0, 0, -ox], [0, 1, -oy], [0, 0, 1]]) @ matrix

    def _warp(
        self, img: Tensor | None, msk: Tensor, matrix: np.ndarray, size: tuple[int, int]
    ) -> tuple[Tensor | None, Tensor]:
        """Samples img (1, 3, h, w) (None: mask only) and msk (1, 1, h, w) of `size` (h, w) on the S x S output grid
        through the inverse of `matrix`."""
        h, w = size
        inverse = torch.from_numpy(np.linalg.inv(matrix)[:2]).float()  # output -> input coordinates
        centres = torch.arange(self.size, dtype=torch.float32) + 0.5
        yy, xx = torch.meshgrid(centres, centres, indexing="ij")
        points = torch.stack([xx, yy, torch.ones_like(xx)], dim=-1) @ inverse.T  # (S, S, 2) input pixel coordinates
        grid = (points / torch.tensor([w, h], dtype=torch.float32) * 2 - 1)[None]  # (1, S, S, 2) in [-1, 1]
        if img is not None:
            img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        shifted = F.grid_sample(msk + 1, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        msk = torch.where(shifted == 0, torch.full_like(shifted, VOID), shifted - 1)  # outside -> void
        return img, msk

"""Chest X-ray lungs (Candemir et al. 2014; Jaeger et al. 2014) as the cross-domain target of PATNet and DMTNet.

The Shenzhen and Montgomery radiographs with lung masks, as Kaggle's "chest-xray-masks-and-labels" lays them out
(`Lung Segmentation/`, the `LungSegmentation` folder of PATNet's and DMTNet's data/lung.py):

    CXR_png/<name>.png           radiographs (800; those without a mask are not used)
    masks/<name>_mask.png        Shenzhen lung masks (CHNCXR_*); binary, read as grey >= 128
    masks/<name>.png             Montgomery lung masks (MCUCXR_*), named as their image

One class, "lung"; every image with a mask is in its pool (704 in Kaggle's copy, DMTNet's data/lung.py comment).

What the official code does that may surprise: PATNet's data/lung.py finds a mask's image by cutting the last nine
characters (`_mask.png`) from its name, which turns a Montgomery mask `MCUCXR_0001_0.png` into the non-existent
`MCUCXR_0.png`; DMTNet's data/lung.py keeps Montgomery names whole. This source does what DMTNet does: the image of
`<stem>_mask.png` or `<stem>.png` is `CXR_png/<stem>.png`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from episodes.base import DataError
from episodes.folder import read_binary_mask
from episodes.pascal import file_signature, read_rgb
from episodes.target import TargetSource

CHEST_HELP = (
    "Chest X-ray expects under data.root CXR_png/<name>.png radiographs and masks/<name>_mask.png (Shenzhen) or "
    "masks/<name>.png (Montgomery) lung masks: Kaggle's chest-xray-masks-and-labels 'Lung Segmentation' folder"
)


class ChestXraySource(TargetSource):
    """Lung masks of chest radiographs: one class, one test-only fold (see the module docstring)."""

    name = "chest_xray"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        image_dir, mask_dir = self.root / "CXR_png", self.root / "masks"
        if not image_dir.is_dir() or not mask_dir.is_dir():
            raise DataError(f"{self.root} lacks CXR_png/ or masks/. {CHEST_HELP}")
        self.class_names = {1: "lung"}
        self._images: dict[str, Path] = {}
        self._masks: dict[str, Path] = {}
        for mask in sorted(mask_dir.glob("*.png")):
            stem = mask.stem.removesuffix("_mask")
            image = image_dir / f"{stem}.png"
            if not image.is_file():
                raise DataError(f"mask {mask} has no radiograph {image}; restore it or remove the mask")
            if stem in self._masks:
                raise DataError(f"radiograph {image} has two masks, {self._masks[stem]} and {mask}; remove one")
            self._images[stem], self._masks[stem] = image, mask
        if not self._masks:
            raise DataError(f"mask folder {mask_dir} holds no PNG mask. {CHEST_HELP}")
        self._set_ids(self._masks)

    def __repr__(self) -> str:
        return f"ChestXraySource(root={str(self.root)!r}, images={len(self._ids)})"

    def _mask(self, image_id: str) -> Path:
        return self._masks[self._known(image_id)]

    def load_image(self, image_id: str) -> np.ndarray:
        """The radiograph as RGB [H, W, 3] uint8 (grey repeated, as PIL's convert('RGB') does)."""
        self._mask(image_id)
        return read_rgb(self._images[image_id], CHEST_HELP)

    def load_class_mask(self, image_id: str, class_id: int) -> np.ndarray:
        """Binary lung mask [H, W] uint8 (no void); all 0 for a class other than 1."""
        mask = read_binary_mask(self._mask(image_id), CHEST_HELP)
        return mask if class_id == 1 else np.zeros_like(mask)

    def class_pixels(self, image_id: str) -> dict[int, int]:
        count = int(read_binary_mask(self._mask(image_id), CHEST_HELP).sum())
        return {1: count} if count else {}

    def class_images(self) -> dict[int, list[str]]:
        """{1: every radiograph with a mask}, sorted by name."""
        return {1: list(self._ids)}

    def fingerprint(self, split: str) -> str:
        """Changes with any mask (name, size, mtime)."""
        return hashlib.sha1(file_signature(self._masks[i] for i in self._ids).encode()).hexdigest()

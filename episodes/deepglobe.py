"""Deepglobe land cover (Demir et al., CVPR-W 2018) as the cross-domain target of PATNet and DMTNet.

Six classes, in PATNet's order (slei109/PATNet data/preprocess.py `labelset`; it reads masks with OpenCV, so its
colours are BGR: here they are given in RGB):

    1 agriculture (255, 255, 0)   2 urban (0, 255, 255)   3 rangeland (255, 0, 255)
    4 forest (0, 255, 0)          5 water (0, 0, 255)     6 barren (255, 255, 255)      unknown (0, 0, 0): no class

Three layouts under `root`, recognised on disk:

    patnet  <c>/test/origin/<name>.jpg + <c>/test/groundtruth/<name>.png, c = 1..6 (PATNet's preprocessed download,
            read by slei109/PATNet data/deepglobe.py)
    dmtnet  image/<id>_sat_<ij>.jpg + filter_mask/<c>/<id>_mask_<ij>.png (ChenJiayi68/DMTNet
            data/deepglobe_preprocess.py's output, read by its data/deepglobe.py)
    raw     [train/]<id>_sat.jpg + <id>_mask.png (the DeepGlobe release, e.g. Kaggle's copy): PATNet's preprocessing
            is done here, on the fly: (1) each image and its RGB mask are cut into 6 x 6 tiles (rows int(i H / 6) to
            int((i + 1) H / 6), the same for columns; 408 x 408 for DeepGlobe's 2448 x 2448); (2) a tile is kept when
            its mask holds more than one colour and every colour covers more than 4.8 % of it; (3) class c's mask is
            the tile's pixels of exactly c's colour, and the tile belongs to class c when it has any.

In the patnet and dmtnet layouts the class masks are binary images read as grey >= 128, as both loaders do. A class's
episodes draw from every tile of its folder (patnet, dmtnet) or holding its colour (raw). Image ids are the tile names
`<id>_sat_<ij>`; a tile in several classes is one image.

What the official code does that may surprise (kept, except where a choice is named):
- PATNet's paper reports 5,666 tiles after filtering; its preprocess.py gives about 9,174 (PATNet issues #3, #17,
  #33). The filter divides by 166,464 = 408 x 408 whatever the tile; here by the tile's own pixel count (the same on
  DeepGlobe's images).
- DMTNet's deepglobe_preprocess.py writes water as BGR (0, 0, 255), red in RGB, a colour DeepGlobe does not use: its
  class 5 folder would stay empty. PATNet's water colour (blue) is used here.
- PATNet's tiles are JPEG re-encodings by OpenCV; the raw layout crops the decoded original, so image pixels differ
  slightly from PATNet's files (masks are PNG in both: identical).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from episodes.base import DataError
from episodes.folder import read_binary_mask
from episodes.pascal import file_signature, read_rgb
from episodes.target import TargetSource

CLASSES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("agriculture", (255, 255, 0)),
    ("urban", (0, 255, 255)),
    ("rangeland", (255, 0, 255)),
    ("forest", (0, 255, 0)),
    ("water", (0, 0, 255)),
    ("barren", (255, 255, 255)),
)
GRID = 6  # tiles per side
MIN_SHARE = 0.048  # a kept tile's rarest colour covers more than this share of it
DEEPGLOBE_HELP = (
    "Deepglobe expects under data.root either PATNet's preprocessed tiles (<c>/test/origin/*.jpg and "
    "<c>/test/groundtruth/*.png for c = 1..6), DMTNet's (image/*_sat_<ij>.jpg and filter_mask/<c>/*_mask_<ij>.png), "
    "or the DeepGlobe land-cover release ([train/]<id>_sat.jpg and <id>_mask.png); see episodes/deepglobe.py"
)


def tile_boxes(height: int, width: int, grid: int = GRID) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(suffix "ij", (top, bottom, left, right)) of the grid x grid tiles, as PATNet's preprocess.py cuts them."""
    boxes = []
    for i in range(grid):
        for j in range(grid):
            rows = int(i * height / grid), int((i + 1) * height / grid)
            cols = int(j * width / grid), int((j + 1) * width / grid)
            boxes.append((f"{i}{j}", (*rows, *cols)))
    return boxes


def colour_codes(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W] uint32 codes r << 16 | g << 8 | b."""
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


CODES = tuple(int(colour_codes(np.array(rgb, np.uint8)[None, None])[0, 0]) for _, rgb in CLASSES)


def tile_classes(codes: np.ndarray) -> dict[int, int]:
    """{class id: pixels} of one mask tile [h, w] of colour codes; {} when the 4.8 % filter drops the tile."""
    colours, counts = np.unique(codes, return_counts=True)
    if len(colours) < 2 or counts.min() / codes.size <= MIN_SHARE:
        return {}
    present = dict(zip(colours.tolist(), counts.tolist(), strict=True))
    return {c: present[code] for c, code in enumerate(CODES, 1) if code in present}


def _find_raw(root: Path) -> Path | None:
    for folder in (root / "train", root):
        if folder.is_dir() and any(e.name.endswith("_mask.png") for e in os.scandir(folder)):
            return folder
    return None


class DeepglobeSource(TargetSource):
    """Deepglobe's six land-cover classes in one test-only fold; layout and rules in the module docstring."""

    name = "deepglobe"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"Deepglobe root {self.root} does not exist. {DEEPGLOBE_HELP}")
        self.class_names = {c: name for c, (name, _) in enumerate(CLASSES, 1)}
        self._images: dict[str, Path] = {}  # tile id -> image file (patnet, dmtnet) or source image (raw)
        self._masks: dict[str, dict[int, Path]] = {}  # tile id -> {class: binary mask} (patnet, dmtnet)
        self._boxes: dict[str, tuple[int, int, int, int]] = {}  # raw: tile id -> box in its source image
        self._raw_masks: dict[str, Path] = {}  # raw: tile id -> the source image's RGB mask
        self._memo: tuple[Path, np.ndarray] | None = None  # raw: the last decoded mask (its tiles come in a row)
        raw = _find_raw(self.root)
        if (self.root / "1" / "test" / "origin").is_dir():
            self.layout = "patnet"
            self._scan_binary(lambda c: self.root / str(c) / "test" / "groundtruth", self._patnet_image)
        elif (self.root / "filter_mask").is_dir() and (self.root / "image").is_dir():
            self.layout = "dmtnet"
            self._scan_binary(lambda c: self.root / "filter_mask" / str(c), self._dmtnet_image)
        elif raw is not None:
            self.layout = "raw"
            self._scan_raw(raw)
        else:
            raise DataError(f"{self.root} holds no Deepglobe layout. {DEEPGLOBE_HELP}")
        self._set_ids(self._images)

    def __repr__(self) -> str:
        return f"DeepglobeSource(root={str(self.root)!r}, layout={self.layout!r}, tiles={len(self._images)})"

    # -- layouts ----------------------------------------------------------------------------------------------------

    def _patnet_image(self, c: int, mask: Path) -> tuple[str, Path]:
        return mask.stem, self.root / str(c) / "test" / "origin" / f"{mask.stem}.jpg"

    def _dmtnet_image(self, c: int, mask: Path) -> tuple[str, Path]:
        stem, sep, tile = mask.stem.rpartition("_mask_")
        if not sep:
            raise DataError(f"mask {mask} is not named <id>_mask_<ij>.png (DMTNet's tiles); {DEEPGLOBE_HELP}")
        return f"{stem}_sat_{tile}", self.root / "image" / f"{stem}_sat_{tile}.jpg"

    def _scan_binary(self, mask_dir, image_of) -> None:
        for c in self.class_names:
            folder = mask_dir(c)
            if not folder.is_dir():
                raise DataError(f"class folder {folder} does not exist ({self.layout} layout). {DEEPGLOBE_HELP}")
            for mask in sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png"):
                tile, image = image_of(c, mask)
                if not image.is_file():
                    raise DataError(f"mask {mask} has no image {image}; restore the image or remove the mask")
                self._images.setdefault(tile, image)
                self._masks.setdefault(tile, {})[c] = mask

    def _scan_raw(self, folder: Path) -> None:
        for mask in sorted(folder.glob("*_mask.png")):
            image = mask.with_name(mask.name[: -len("_mask.png")] + "_sat.jpg")
            if not image.is_file():
                raise DataError(f"mask {mask} has no image {image}; restore the image or remove the mask")
            with Image.open(mask) as im:
                width, height = im.size
            for suffix, box in tile_boxes(height, width):
                tile = f"{image.stem}_{suffix}"
                self._images[tile], self._boxes[tile], self._raw_masks[tile] = image, box, mask

    # -- raw tiles --------------------------------------------------------------------------------------------------

    def _raw_codes(self, tile: str) -> np.ndarray:
        path = self._raw_masks[tile]
        if self._memo is None or self._memo[0] != path:
            self._memo = (path, colour_codes(read_rgb(path, DEEPGLOBE_HELP)))
        top, bottom, left, right = self._boxes[tile]
        return self._memo[1][top:bottom, left:right]

    # -- Source protocol (image_ids, fold_classes: TargetSource) -----------------------------------------------------

    def load_image(self, image_id: str) -> np.ndarray:
        """RGB tile [H, W, 3] uint8."""
        image = read_rgb(self._images[self._known(image_id)], DEEPGLOBE_HELP)
        if self.layout != "raw":
            return image
        top, bottom, left, right = self._boxes[image_id]
        return np.ascontiguousarray(image[top:bottom, left:right])

    def load_class_mask(self, image_id: str, class_id: int) -> np.ndarray:
        """Binary mask [H, W] uint8 of `class_id` (1 = the class, 0 = anything else; no void)."""
        self._known(image_id)
        if class_id not in self.class_names:
            raise ValueError(f"Deepglobe class {class_id} does not exist; classes are 1..{len(CLASSES)}")
        if self.layout == "raw":
            return (self._raw_codes(image_id) == CODES[class_id - 1]).astype(np.uint8)
        masks = self._masks[image_id]
        if class_id not in masks:  # the tile is not in this class's folder: no pixel of it
            return np.zeros_like(read_binary_mask(next(iter(masks.values())), DEEPGLOBE_HELP))
        return read_binary_mask(masks[class_id], DEEPGLOBE_HELP)

    def class_pixels(self, image_id: str) -> dict[int, int]:
        """Pixels of each class in the tile: of its colour (raw, {} for a filtered tile), else of its binary masks."""
        self._known(image_id)
        if self.layout == "raw":
            return tile_classes(self._raw_codes(image_id))
        counts = {c: int(read_binary_mask(m, DEEPGLOBE_HELP).sum()) for c, m in self._masks[image_id].items()}
        return {c: n for c, n in sorted(counts.items()) if n}

    def class_images(self) -> dict[int, list[str]] | None:
        """Class id -> the tiles of its folder (patnet, dmtnet); None for raw (tiles holding the colour: the index)."""
        if self.layout == "raw":
            return None
        out: dict[int, list[str]] = {c: [] for c in self.class_names}
        for tile in self._ids:
            for c in sorted(self._masks[tile]):
                out[c].append(tile)
        return out

    def fingerprint(self, split: str) -> str:
        """Changes with any mask file (name, size, mtime) and the layout."""
        files = sorted({m for masks in self._masks.values() for m in masks.values()} | set(self._raw_masks.values()))
        return hashlib.sha1(f"{file_signature(files)}\0layout={self.layout}".encode()).hexdigest()

"""PASCAL VOC 2012 + SBD ("SegmentationClassAug") as a Source, and the file helpers the other sources share.

Layout under `root`::

    JPEGImages/<id>.jpg                    VOC2012 images (VOCtrainval_11-May-2012.tar)
    SegmentationClassAug/<id>.png          class-index masks: 0 background, 1..20 VOC classes, 255 void
    ImageSets/Segmentation/train_aug.txt   split "trn": 10,582 ids (VOC train + SBD, no VOC val)
    ImageSets/Segmentation/val.txt         split "val": VOC's 1,449 val ids

A list line is an id (`2007_000032`) or PFENet's `JPEGImages/<id>.jpg SegmentationClassAug/<id>.png`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from episodes.base import DataError
from episodes.classes import VOC_CLASSES
from episodes.folds import PASCAL_FOLDS, pascal_fold
from episodes.lists import read_id_list

logger = logging.getLogger(__name__)

PASCAL_HELP = (
    "PASCAL-5i expects VOC2012 + SBD under data.root: JPEGImages/<id>.jpg (VOCtrainval_11-May-2012.tar), "
    "SegmentationClassAug/<id>.png (VOC SegmentationClass + SBD masks as class-index PNGs: the usual "
    "SegmentationClassAug archive of DeepLab / PFENet / HSNet), ImageSets/Segmentation/train_aug.txt (the 10,582 "
    "VOC train + SBD ids) and ImageSets/Segmentation/val.txt (VOC's 1,449 val ids); other lists via "
    "data.train_list / data.val_list"
)
SPLITS = ("trn", "val")
LABEL_MODES = ("P", "L")


EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how a photo is turned for display; 1 = as stored


@contextmanager
def _open_image(path: Path, hint: str = "") -> Iterator[Image.Image]:
    """The image at `path`, opened (header read, pixels not yet decoded); DataError naming a missing or bad file."""
    if not path.is_file():
        raise DataError(f"image {path} does not exist" + (f". {hint}" if hint else ""))
    try:
        with Image.open(path) as im:
            yield im
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"image {path} cannot be read ({err}); replace the file with a valid image") from err


def read_rgb(path: Path, hint: str = "") -> np.ndarray:
    """RGB image [H, W, 3] uint8 of the pixels as stored; a missing or unreadable file raises DataError naming it.

    An EXIF orientation tag is not applied, for every dataset source: masks and annotations are drawn on the stored
    pixels (VOC's and SBD's PNGs, COCO's polygons with the json's height and width, FSS-1000's PNGs), and HSNet reads
    all of them this way (PIL's Image.open(...).convert('RGB'), no exif_transpose). PFENet reads with cv2.imread,
    which applies the tag, then refuses an image whose shape differs from its label's, so a 90-degree tag would
    stop it. A photo whose mask follows its displayed orientation is caught by check_mask_size, which names the tag.
    (Photos without masks, such as tools/zero_shot.py's inputs, are read by their own code.)
    """
    with _open_image(path, hint) as im:
        return np.asarray(im.convert("RGB"))


def image_size(path: Path, hint: str = "") -> tuple[int, int]:
    """(height, width) of the stored pixels, from the image's header alone (nothing is decoded)."""
    with _open_image(path, hint) as im:
        return im.height, im.width


def check_mask_size(mask: np.ndarray, mask_path: Path, image_path: Path, hint: str = "") -> np.ndarray:
    """`mask` [H, W] when its image has that size (read from the image's header) or is not there (load_image reports
    a missing image); else DataError naming both files and sizes, and the image's EXIF orientation when the mask
    seems drawn on the turned photo."""
    if not image_path.is_file():
        return mask
    size = image_size(image_path, hint)
    if mask.shape[:2] == size:
        return mask
    with _open_image(image_path) as im:
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    rotated = ""
    if orientation in (5, 6, 7, 8) and mask.shape[:2] == size[::-1]:
        rotated = (
            f"; the image carries EXIF orientation {orientation} (turned 90 degrees for display) and the mask matches "
            "the turned photo: images are read as stored, so rotate the image's pixels (e.g. exiftran -ai) or the mask"
        )
    raise DataError(
        f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is {size[1]}x{size[0]} "
        f"(width x height){rotated or '; a mask must be the size of its image: re-export it at that size'}"
    )


def open_label(path: Path, hint: str = "") -> Image.Image:
    """A single-channel label PNG ("P" or "L"), loaded; DataError naming the file when missing, corrupt or RGB."""
    if not path.is_file():
        raise DataError(f"mask {path} does not exist" + (f". {hint}" if hint else ""))
    try:
        im = Image.open(path)
        im.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"mask {path} cannot be read ({err}); replace the file with a valid PNG") from err
    if im.mode not in LABEL_MODES:
        raise DataError(
            f"mask {path} has mode {im.mode!r}, not a class-index image ({' or '.join(LABEL_MODES)}); "
            "convert colour masks to 8-bit class indices (0 background, 255 void)"
        )
    return im


def file_signature(paths: Iterable[Path]) -> str:
    """sha1 of each file's name, size and mtime: changes when any of them is replaced, edited or touched."""
    digest = hashlib.sha1()
    for path in paths:
        try:
            st = os.stat(path)
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def resolve_under(root: Path, path: str | Path) -> Path:
    """`path` itself when absolute (or ~), else relative to the dataset root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else root / path


class PascalSource:
    """PASCAL VOC 2012 + SBD masks (SegmentationClassAug) with PASCAL-5i folds.

    Args:
        root: the VOC2012 folder (see the module docstring for its layout).
        train_list: id list of split "trn"; "" = ImageSets/Segmentation/train_aug.txt. Relative paths are under root.
        val_list: id list of split "val"; "" = ImageSets/Segmentation/val.txt.
    """

    name = "pascal"
    parallel_scan = True  # class_pixels only reads one PNG: MaskIndex may scan in worker processes
    num_classes = len(VOC_CLASSES)
    num_folds = PASCAL_FOLDS

    def __init__(self, root: str | Path, train_list: str = "", val_list: str = "") -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"PASCAL root {self.root} does not exist. {PASCAL_HELP}")
        self.class_names = {i + 1: name for i, name in enumerate(VOC_CLASSES)}
        self.lists = {
            "trn": resolve_under(self.root, train_list or "ImageSets/Segmentation/train_aug.txt"),
            "val": resolve_under(self.root, val_list or "ImageSets/Segmentation/val.txt"),
        }
        self.image_dir = self.root / "JPEGImages"
        self.mask_dir = self.root / "SegmentationClassAug"
        self._ids: dict[str, list[str]] = {}

    def __repr__(self) -> str:
        return f"PascalSource(root={str(self.root)!r}, lists={ {k: str(v) for k, v in self.lists.items()} })"

    def list_path(self, split: str) -> Path:
        if split not in self.lists:
            raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
        return self.lists[split]

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        return self.mask_dir / f"{image_id}.png"

    def image_ids(self, split: str) -> list[str]:
        """Ids of `split` in list order; each must have its mask, else DataError naming the list line."""
        if split not in self._ids:
            path = self.list_path(split)
            if not path.is_file():
                raise DataError(f"id list {path} (split {split!r}) does not exist. {PASCAL_HELP}")
            if not self.mask_dir.is_dir():
                raise DataError(f"mask folder {self.mask_dir} does not exist. {PASCAL_HELP}")
            present = set(os.listdir(self.mask_dir))
            ids = []
            for line_no, image_id in read_id_list(path):
                if f"{image_id}.png" not in present:
                    raise DataError(
                        f"{path}, line {line_no}: id {image_id!r} has no mask {self.mask_path(image_id)}; "
                        "fix or remove the line, or add the mask"
                    )
                ids.append(image_id)
            self._ids[split] = ids
        return list(self._ids[split])

    def load_image(self, image_id: str) -> np.ndarray:
        """RGB image [H, W, 3] uint8."""
        return read_rgb(self.image_path(image_id), PASCAL_HELP)

    def load_label(self, image_id: str) -> np.ndarray:
        """The full class-index mask [H, W] uint8 (0 background, 1..20, 255 void)."""
        with open_label(self.mask_path(image_id), PASCAL_HELP) as im:
            return np.asarray(im)

    def load_class_mask(self, image_id: str, class_id: int) -> np.ndarray:
        """Binary mask [H, W] uint8 of `class_id`: other classes become 0, void stays 255. A mask of another size than
        its image raises DataError naming both (check_mask_size)."""
        label = self.load_label(image_id)
        check_mask_size(label, self.mask_path(image_id), self.image_path(image_id), PASCAL_HELP)
        mask = (label == class_id).astype(np.uint8)
        mask[label == 255] = 255
        return mask

    def class_pixels(self, image_id: str) -> dict[int, int]:
        """Pixel count of every VOC class present in the mask (from the PNG's histogram: no array is built)."""
        path = self.mask_path(image_id)
        with open_label(path, PASCAL_HELP) as im:
            hist = im.histogram()
        stray = [v for v in range(self.num_classes + 1, 255) if hist[v]]
        if stray:
            raise DataError(f"mask {path} holds values {stray} outside 0..{self.num_classes} and 255 (void)")
        return {c: hist[c] for c in range(1, self.num_classes + 1) if hist[c]}

    def fold_classes(self, fold: int) -> tuple[list[int], list[int]]:
        """PASCAL-5i: novel = 5f+1 .. 5f+5."""
        return pascal_fold(fold)

    def fingerprint(self, split: str) -> str:
        """Changes with the list file or any of its masks (name, size, mtime)."""
        ids = self.image_ids(split)
        return file_signature([self.list_path(split), *(self.mask_path(i) for i in ids)])

    def identity(self) -> dict[str, Any]:
        """The image folder: image id `x` is `<JPEGImages>/x.jpg` (lists and masks do not change pixels)."""
        return {"source": self.name, "images": str(self.image_dir.resolve())}

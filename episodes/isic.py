"""ISIC2018 skin lesions (Codella et al. 2019; Tschandl et al. 2018) as the cross-domain target of PATNet and DMTNet.

The images and lesion masks are those of ISIC 2018 Task 1 (training set: 2,594 images); each image's class is its
diagnosis from the class table slei109/PATNet ships as data/isic/class_id.csv (`ID,Class` lines: nevus, melanoma,
seborrheic_keratosis; DMTNet's data/isic.py counts 1,867 / 519 / 208). Classes, in DMTNet's
data/isic_preprocess.py order: 1 nevus, 2 melanoma, 3 seborrheic keratosis.

Layouts under `root` (PATNet's and DMTNet's data/isic.py read the first):

    sorted  ISIC2018_Task1-2_Training_Input/<c>/<id>.jpg, c = 1, 2, 3 (the images sorted into class folders)
    flat    ISIC2018_Task1-2_Training_Input/<id>.jpg (the ISIC download) and class_id.csv (PATNet's file)
    both    ISIC2018_Task1_Training_GroundTruth/<id>_segmentation.png (binary lesion masks, read as grey >= 128)

The mask is the lesion whatever the class: the episode's class only decides which images are its query and supports.
A class's episodes draw from every image of the class.

What the official code does that may surprise: DMTNet's isic_preprocess.py reads the test inputs
(ISIC2018_Task1-2_Test_Input) and spells the third class 'seborrheic keratosis' while class_id.csv writes
'seborrheic_keratosis', so as written it sorts no image into class 3; both loaders read the training inputs and masks.
Both spellings are accepted here.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np

from episodes.base import DataError
from episodes.folder import read_binary_mask
from episodes.pascal import file_signature, read_rgb
from episodes.target import TargetSource

CLASSES = ("nevus", "melanoma", "seborrheic keratosis")
IMAGES = "ISIC2018_Task1-2_Training_Input"
MASKS = "ISIC2018_Task1_Training_GroundTruth"
CLASS_TABLE = "class_id.csv"
ISIC_HELP = (
    f"ISIC2018 expects under data.root {IMAGES}/<c>/<id>.jpg (c = 1 nevus, 2 melanoma, 3 seborrheic keratosis) or "
    f"{IMAGES}/<id>.jpg with PATNet's data/isic/{CLASS_TABLE} beside it, and {MASKS}/<id>_segmentation.png"
)


def read_class_table(path: Path) -> list[tuple[int, str, int]]:
    """(line number, image id, class id) of each row of PATNet's class_id.csv (`ID,Class`)."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"class table {path} cannot be read ({err})") from err
    names = {name: c for c, name in enumerate(CLASSES, 1)} | {"seborrheic_keratosis": 3}
    out = []
    for line_no, row in enumerate(rows, 1):
        if not row or (line_no == 1 and row[0].strip().lower() == "id"):
            continue
        if len(row) != 2 or row[1].strip().lower() not in names:
            raise DataError(f"{path}, line {line_no}: {row!r} is not `<image id>,<class>` with class in {CLASSES}")
        out.append((line_no, row[0].strip(), names[row[1].strip().lower()]))
    return out


class IsicSource(TargetSource):
    """ISIC2018's three diagnosis classes over lesion masks, in one test-only fold (see the module docstring)."""

    name = "isic"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        image_dir = self.root / IMAGES
        if not image_dir.is_dir():
            raise DataError(f"ISIC2018 image folder {image_dir} does not exist. {ISIC_HELP}")
        self.class_names = {c: name for c, name in enumerate(CLASSES, 1)}
        self._images: dict[str, Path] = {}
        self._class_of: dict[str, int] = {}
        self._signature_files: list[Path] = []
        if (image_dir / "1").is_dir():
            self.layout = "sorted"
            for c in self.class_names:
                folder = image_dir / str(c)
                if not folder.is_dir():
                    raise DataError(f"class folder {folder} does not exist. {ISIC_HELP}")
                for image in sorted(folder.glob("*.jpg")):
                    self._add(image.stem, image, c, f"{folder} and another class folder")
        else:
            self.layout = "flat"
            table = self.root / CLASS_TABLE
            if not table.is_file():
                raise DataError(f"class table {table} does not exist: copy PATNet's data/isic/{CLASS_TABLE} there")
            self._signature_files.append(table)
            for line_no, image_id, c in read_class_table(table):
                image = image_dir / f"{image_id}.jpg"
                if not image.is_file():
                    raise DataError(f"{table}, line {line_no}: image {image} does not exist; {ISIC_HELP}")
                self._add(image_id, image, c, f"{table} twice")
        self._set_ids(self._images)

    def _add(self, image_id: str, image: Path, class_id: int, where: str) -> None:
        if image_id in self._images:
            raise DataError(f"image {image_id!r} is listed in {where}; each image has one class")
        mask = self.mask_path(image_id)
        if not mask.is_file():
            raise DataError(f"image {image} has no lesion mask {mask}; {ISIC_HELP}")
        self._images[image_id], self._class_of[image_id] = image, class_id

    def __repr__(self) -> str:
        return f"IsicSource(root={str(self.root)!r}, layout={self.layout!r}, images={len(self._images)})"

    def mask_path(self, image_id: str) -> Path:
        return self.root / MASKS / f"{image_id}_segmentation.png"

    def load_image(self, image_id: str) -> np.ndarray:
        """RGB image [H, W, 3] uint8."""
        return read_rgb(self._images[self._known(image_id)], ISIC_HELP)

    def load_class_mask(self, image_id: str, class_id: int) -> np.ndarray:
        """The lesion mask [H, W] uint8 when `class_id` is the image's diagnosis, else all 0 (no void)."""
        mask = read_binary_mask(self.mask_path(self._known(image_id)), ISIC_HELP)
        return mask if self._class_of[image_id] == class_id else np.zeros_like(mask)

    def class_pixels(self, image_id: str) -> dict[int, int]:
        """{diagnosis class: lesion pixels}."""
        count = int(read_binary_mask(self.mask_path(self._known(image_id)), ISIC_HELP).sum())
        return {self._class_of[image_id]: count} if count else {}

    def class_images(self) -> dict[int, list[str]]:
        """Class id -> every image of that diagnosis, sorted by id."""
        out: dict[int, list[str]] = {c: [] for c in self.class_names}
        for image_id in self._ids:
            out[self._class_of[image_id]].append(image_id)
        return out

    def fingerprint(self, split: str) -> str:
        """Changes with the class table or any mask (name, size, mtime)."""
        files = [*self._signature_files, *(self.mask_path(i) for i in self._ids)]
        return hashlib.sha1(f"{file_signature(files)}\0layout={self.layout}".encode()).hexdigest()

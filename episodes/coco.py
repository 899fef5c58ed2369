"""COCO (2014 by default) as a Source: class masks rendered from the official instances json, no pre-rendered PNGs.

Layout under `root` (each path can be moved with the constructor's arguments / the `data.coco.*` keys)::

    annotations/instances_train2014.json   split "trn"
    annotations/instances_val2014.json     split "val"
    train2014/<file_name>                  images named by the json's `file_name`
    val2014/<file_name>

Image ids are the json's file names without extension (`COCO_val2014_000000429717`), in json order. Class ids
1..80 are the COCO category ids ascending; other categories (panoptic "stuff") are ignored. A json is read on
first use of its split, never at import or construction.

The class mask of (image, class) is the union of the class's instances, rendered with pycocotools from polygons,
uncompressed or compressed RLE exactly as `COCO.annToMask` renders each one. Crowd regions (`iscrowd=1`) of the
class follow `crowd`:

- `ignore` (default): crowd pixels not covered by a non-crowd instance of the class are void (255): neither
  scored nor trained on, since a crowd box mixes the class with background.
- `foreground`: crowd regions are part of the class (pixel counts include them).
- `background`: crowd regions are background (0), like every other pixel outside the non-crowd instances.

Pixel counts for the mask index are the areas of these masks (void excluded), computed on RLEs without decoding.
Instances of other classes are background, also where they overlap the class.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
from pycocotools import mask as mask_utils

from episodes.base import DataError
from episodes.classes import COCO_CLASS_OF_CATEGORY, COCO_CLASSES
from episodes.folds import COCO_FOLDS, COCO_SPLITS, coco_fold
from episodes.lists import read_id_list
from episodes.pascal import SPLITS, file_signature, read_rgb, resolve_under
from fewshot.config import CocoCrowd

logger = logging.getLogger(__name__)

COCO_HELP = (
    "COCO-20i expects COCO 2014 under data.root: annotations/instances_train2014.json and "
    "annotations/instances_val2014.json (annotations_trainval2014.zip), train2014/ and val2014/ images (train2014.zip, "
    "val2014.zip from cocodataset.org); other locations via data.coco.train_json, data.coco.val_json, "
    "data.coco.train_images and data.coco.val_images"
)
CROWD_RULES = get_args(CocoCrowd)


@dataclass
class _Image:
    coco_id: int
    file_name: str
    height: int
    width: int
    instances: list[tuple[int, bool, object]] = field(default_factory=list)  # (class id, is crowd, segmentation)


def _to_rle(segmentation: object, height: int, width: int) -> dict:
    """One instance's segmentation (polygons, uncompressed or compressed RLE) as a compressed RLE, like annToRLE."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation  # already compressed


def _decode(rle: dict) -> np.ndarray:
    """[H, W] uint8 of one RLE; silences pycocotools' numpy-2 `__array__` DeprecationWarning (harmless)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return mask_utils.decode(rle)


def _union(rles: list[dict]) -> dict | None:
    return mask_utils.merge(rles) if rles else None


def _check_annotations(path: Path, dataset: dict, images: dict[int, _Image]) -> None:
    """DataError naming `path` and what is missing when its annotations cannot give a single class mask: no
    `annotations` list (an image-info json such as image_info_test2014.json), none at all, an `image_id` that no image
    record has (the images and annotations do not belong together), or no segmentation of the 80 COCO classes."""
    if "annotations" not in dataset or not isinstance(dataset["annotations"], list):
        raise DataError(
            f"COCO annotation file {path} has no 'annotations' list (keys: {sorted(dataset)}): it is not an instances "
            f"json; use annotations/instances_<split>2014.json. {COCO_HELP}"
        )
    annotations = dataset["annotations"]
    if not annotations:
        raise DataError(f"COCO annotation file {path} holds no annotations (an empty 'annotations' list)")
    stray = sorted({ann["image_id"] for ann in annotations if ann["image_id"] not in images}, key=str)
    if stray:
        count = sum(ann["image_id"] not in images for ann in annotations)
        raise DataError(
            f"COCO annotation file {path}: {count} of {len(annotations)} annotations have an image_id that no entry "
            f"of its {len(images)} 'images' has (e.g. {stray[:5]}); the images and annotations lists do not belong "
            "together: use the official json, or keep each annotation's image in 'images'"
        )
    if not any(ann.get("segmentation") and ann["category_id"] in COCO_CLASS_OF_CATEGORY for ann in annotations):
        raise DataError(
            f"COCO annotation file {path}: none of its {len(annotations)} annotations is a segmentation of one of "
            "the 80 COCO-20i categories (instances json expected, not a panoptic or stuff one)"
        )


class CocoSource:
    """COCO instances json(s) with COCO-20i folds; see the module docstring for layout and crowd rules.

    Args:
        root: the COCO folder.
        crowd: ignore | foreground | background.
        coco_split: fold convention, interleaved | consecutive.
        train_json, val_json: instances json of split "trn" / "val"; "" = annotations/instances_{train,val}2014.json.
        train_images, val_images: image folders; "" = train2014 / val2014. Relative paths are under root.
        train_list, val_list: optional id lists restricting a split (ids or file names, one per line).
    """

    name = "coco"
    parallel_scan = False  # counts come from the in-memory json: a worker process would have to reload it
    num_folds = COCO_FOLDS

    def __init__(
        self,
        root: str | Path,
        crowd: str = "ignore",
        coco_split: str = "interleaved",
        train_json: str = "",
        val_json: str = "",
        train_images: str = "",
        val_images: str = "",
        train_list: str = "",
        val_list: str = "",
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"COCO root {self.root} does not exist. {COCO_HELP}")
        if crowd not in CROWD_RULES:
            raise ValueError(f"unknown crowd rule {crowd!r}; choose from {', '.join(CROWD_RULES)}")
        if coco_split not in COCO_SPLITS:
            raise ValueError(f"unknown COCO-20i split {coco_split!r}; choose from {', '.join(COCO_SPLITS)}")
        self.crowd = crowd
        self.coco_split = coco_split
        self.class_names = {i + 1: name for i, name in enumerate(COCO_CLASSES)}
        self.jsons = {
            "trn": resolve_under(self.root, train_json or "annotations/instances_train2014.json"),
            "val": resolve_under(self.root, val_json or "annotations/instances_val2014.json"),
        }
        self.image_dirs = {
            "trn": resolve_under(self.root, train_images or "train2014"),
            "val": resolve_under(self.root, val_images or "val2014"),
        }
        self.lists = {
            "trn": resolve_under(self.root, train_list) if train_list else None,
            "val": resolve_under(self.root, val_list) if val_list else None,
        }
        self._images: dict[str, dict[str, _Image]] = {}  # split -> image id -> record, loaded lazily
        self._ids: dict[str, list[str]] = {}

    def __repr__(self) -> str:
        jsons = {k: str(v) for k, v in self.jsons.items()}
        return f"CocoSource(root={str(self.root)!r}, crowd={self.crowd!r}, jsons={jsons})"

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")

    def _load(self, split: str) -> dict[str, _Image]:
        if split in self._images:
            return self._images[split]
        path = self.jsons[split]
        if not path.is_file():
            raise DataError(f"COCO annotation file {path} (split {split!r}) does not exist. {COCO_HELP}")
        logger.info("reading %s", path)
        try:
            with open(path) as f:
                dataset = json.load(f)
            images: dict[str, _Image] = {}
            by_coco_id: dict[int, _Image] = {}
            for info in dataset["images"]:
                image_id = Path(info["file_name"]).stem
                if image_id in images:
                    raise DataError(f"{path}: two images share the file name stem {image_id!r}")
                record = _Image(int(info["id"]), info["file_name"], int(info["height"]), int(info["width"]))
                images[image_id] = by_coco_id[record.coco_id] = record
            _check_annotations(path, dataset, by_coco_id)
            for ann in dataset["annotations"]:
                class_id = COCO_CLASS_OF_CATEGORY.get(ann["category_id"])
                if class_id is not None and ann.get("segmentation"):
                    record = by_coco_id[ann["image_id"]]
                    record.instances.append((class_id, bool(ann.get("iscrowd", 0)), ann["segmentation"]))
            for cat in dataset.get("categories", []):
                class_id = COCO_CLASS_OF_CATEGORY.get(cat.get("id"))
                if class_id is not None and cat.get("name") != COCO_CLASSES[class_id - 1]:
                    logger.warning(
                        "%s names category %s %r; this project calls it %r",
                        path,
                        cat.get("id"),
                        cat.get("name"),
                        COCO_CLASSES[class_id - 1],
                    )
        except DataError:
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path} is not a COCO instances json ({type(err).__name__}: {err})") from err
        self._images[split] = images
        return images

    def _record(self, image_id: str) -> tuple[str, _Image]:
        """(split, record) of an image id, reading a split's json only when the id is not in one already read."""
        for split in SPLITS:
            if image_id in self._images.get(split, {}):
                return split, self._images[split][image_id]
        for split in SPLITS:
            if split not in self._images and self.jsons[split].is_file() and image_id in self._load(split):
                return split, self._images[split][image_id]
        raise DataError(f"COCO image id {image_id!r} is in neither {self.jsons['trn']} nor {self.jsons['val']}")

    def image_ids(self, split: str) -> list[str]:
        """Ids of `split`: the json's images in order, or the id list's order when one is given."""
        self._check_split(split)
        if split not in self._ids:
            images = self._load(split)
            if self.lists[split] is None:
                self._ids[split] = list(images)
            else:
                path = self.lists[split]
                if not path.is_file():
                    raise DataError(f"id list {path} (split {split!r}) does not exist; fix data.train_list/val_list")
                for line_no, image_id in read_id_list(path):
                    if image_id not in images:
                        raise DataError(
                            f"{path}, line {line_no}: image {image_id!r} is not in {self.jsons[split]}; "
                            "fix or remove the line"
                        )
                self._ids[split] = [i for _, i in read_id_list(path)]
        return list(self._ids[split])

    def image_path(self, image_id: str) -> Path:
        split, record = self._record(image_id)
        return self.image_dirs[split] / record.file_name

    def load_image(self, image_id: str) -> np.ndarray:
        """RGB image [H, W, 3] uint8, of the json's height and width."""
        split, record = self._record(image_id)
        path = self.image_dirs[split] / record.file_name
        image = read_rgb(path, COCO_HELP)
        if image.shape[:2] != (record.height, record.width):
            raise DataError(
                f"image {path} is {image.shape[1]}x{image.shape[0]} but {self.jsons[split]} says "
                f"{record.width}x{record.height}; the image and the annotation file do not match"
            )
        return image

    def _class_rles(self, record: _Image, class_id: int) -> tuple[dict | None, dict | None]:
        """(union of the non-crowd instances, union of the crowd instances) of a class, as RLEs (None if none)."""
        plain, crowd = [], []
        for c, is_crowd, seg in record.instances:
            if c == class_id:
                (crowd if is_crowd else plain).append(_to_rle(seg, record.height, record.width))
        return _union(plain), _union(crowd)

    def load_class_mask(self, image_id: str, class_id: int) -> np.ndarray:
        """Binary mask [H, W] uint8 of `class_id`: union of its instances, crowd regions by the crowd rule."""
        _, record = self._record(image_id)
        plain, crowd = self._class_rles(record, class_id)
        mask = np.zeros((record.height, record.width), np.uint8)
        if plain is not None:
            mask |= _decode(plain)
        if crowd is not None and self.crowd != "background":
            crowd_mask = _decode(crowd).astype(bool)
            mask[crowd_mask & (mask == 0)] = 1 if self.crowd == "foreground" else 255
        return mask

    def class_pixels(self, image_id: str) -> dict[int, int]:
        """Foreground pixel count of each class in the image under the crowd rule (from RLE areas)."""
        _, record = self._record(image_id)
        counts = {}
        for class_id in sorted({c for c, _, _ in record.instances}):
            plain, crowd = self._class_rles(record, class_id)
            if self.crowd == "foreground":
                plain = _union([r for r in (plain, crowd) if r is not None])
            area = int(mask_utils.area(plain)) if plain is not None else 0
            if area:
                counts[class_id] = area
        return counts

    def fold_classes(self, fold: int) -> tuple[list[int], list[int]]:
        """COCO-20i under this source's `coco_split` (interleaved or consecutive)."""
        return coco_fold(fold, self.coco_split)

    def fingerprint(self, split: str) -> str:
        """Changes with the json, the id list (if any) or the crowd rule; reading it does not load the json."""
        self._check_split(split)
        files = [self.jsons[split]] + ([self.lists[split]] if self.lists[split] else [])
        return hashlib.sha1(f"{file_signature(files)}\0crowd={self.crowd}".encode()).hexdigest()

    def identity(self) -> dict[str, Any]:
        """Each split's image folder and the json that maps its ids to file names (crowd rule, folds and lists do not
        change pixels)."""
        return {
            "source": self.name,
            "images": {split: str(path.resolve()) for split, path in self.image_dirs.items()},
            "annotations": {split: str(path.resolve()) for split, path in self.jsons.items()},
        }

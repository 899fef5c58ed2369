"""What every dataset source gives the episode machinery, and the episode record itself.

A source knows one dataset on disk (PASCAL VOC + SBD, COCO 2014, a folder of images and masks, the synthetic set, the
cross-domain targets Deepglobe, ISIC2018, Chest X-ray and FSS-1000). Class ids are 1-based and global to the dataset
(PASCAL 1..20 in VOC order, COCO 1..80 = category ids ascending); 0 is background and 255 is void in every mask
handed out. A source owns its folds: how many there are and which classes each tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # image files, lower case


class DataError(ValueError):
    """Missing or malformed data on disk; the message names the file and says how to fix it."""


@dataclass(frozen=True)
class Episode:
    """One few-shot episode: segment `class_id` in `query` given `supports` (never the query; distinct, except that
    HSNet's sampler, data.sampler=hsnet, draws them independently)."""

    query: str
    supports: tuple[str, ...]
    class_id: int

    def to_json(self) -> dict:
        return {"query": self.query, "supports": list(self.supports), "class_id": self.class_id}

    @classmethod
    def from_json(cls, data: dict) -> Episode:
        return cls(str(data["query"]), tuple(str(s) for s in data["supports"]), int(data["class_id"]))


class Source(Protocol):
    """A dataset on disk. Implementations: PascalSource, CocoSource, FolderSource, DeepglobeSource, IsicSource,
    ChestXraySource (the sources of `episodes.sources.SOURCES`).

    A source may also define `class_images() -> dict[int, list[str]] | None`: the images each class's episodes draw
    from when the benchmark fixes them by layout (a class folder, a class table), rather than by mask pixels; the
    list conventions of data.lists then do not apply (`episodes.lists.eval_pairs`).
    """

    name: str  # the data.dataset value: "pascal", "coco", "folder", "deepglobe", ...
    root: Path
    class_names: dict[int, str]  # 1-based class id -> name
    num_folds: int  # folds 0 .. num_folds - 1 (PASCAL-5i and COCO-20i 4, a cross-domain target 1)

    def image_ids(self, split: str) -> list[str]:
        """Image ids of a split ("trn" or "val"), in list order."""

    def load_image(self, image_id: str) -> np.ndarray:
        """RGB image [H, W, 3] uint8; a missing or corrupt file raises DataError naming it."""

    def load_class_mask(self, image_id: str, class_id: int) -> np.ndarray:
        """Binary mask of one class [H, W] uint8: 1 = class, 0 = anything else, 255 = void."""

    def class_pixels(self, image_id: str) -> dict[int, int]:
        """Pixel count of every class present in the image's mask (no void, no background); for the mask index."""

    def fold_classes(self, fold: int) -> tuple[list[int], list[int]]:
        """(base class ids, novel class ids) of a fold; an invalid fold raises ValueError naming the dataset and
        listing the valid folds (episodes.folds.check_fold)."""

    def fingerprint(self, split: str) -> str:
        """Changes whenever the masks or annotations behind `split` change (sizes and mtimes); keys the index cache."""

    def identity(self) -> dict[str, Any]:
        """JSON data naming where the pixels of every image id come from (image folders, and whatever maps an id to
        its file): two sources with equal identities give each id the same image. Keys the feature cache, which
        trusts a disk entry by id, so every setting that moves or changes an image belongs here."""

"""data.dataset -> the Source that reads it: `SOURCES[name](data)`, or `build_source(data)`.

In-domain: pascal, coco, folder, synthetic. The cross-domain targets of PATNet and DMTNet, one fold each: deepglobe,
isic, chest_xray (one file each) and fss1000 (the FSS-1000 folder layout, episodes/folder.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from episodes.base import Source
from episodes.chest_xray import ChestXraySource
from episodes.coco import CocoSource
from episodes.deepglobe import DeepglobeSource
from episodes.folder import FolderSource, Fss1000Source
from episodes.isic import IsicSource
from episodes.pascal import PascalSource
from fewshot.config import DataConfig


class SyntheticSource(PascalSource):
    """The generated dataset (episodes.synthetic): PASCAL layout, its own class names."""

    name = "synthetic"

    def __init__(self, root: str | Path, train_list: str = "", val_list: str = "") -> None:
        from episodes.synthetic import CLASS_NAMES

        super().__init__(root, train_list, val_list)
        self.class_names = dict(CLASS_NAMES)

    def identity(self) -> dict[str, Any]:
        """The image folder plus the generation record (synthetic.json: generator version, images, size, seed), so
        data regenerated in place with other parameters is another source."""
        from episodes.synthetic import read_marker

        return {**super().identity(), "generated": read_marker(self.root)}


def _pascal(data: DataConfig) -> Source:
    return PascalSource(data.root, data.train_list, data.val_list)


def _coco(data: DataConfig) -> Source:
    coco = data.coco
    return CocoSource(
        data.root,
        crowd=coco.crowd,
        coco_split=coco.split,
        train_json=coco.train_json,
        val_json=coco.val_json,
        train_images=coco.train_images,
        val_images=coco.val_images,
        train_list=data.train_list,
        val_list=data.val_list,
    )


def _folder(data: DataConfig) -> Source:
    return FolderSource(
        data.root,
        data.list_dir,
        data.train_list,
        data.val_list,
        binary=data.folder.binary,
        min_images=_least_images(data),
        folds=data.folder.folds,
    )


def _least_images(data: DataConfig) -> int:
    """The images a class needs for a test episode: the query and shots distinct supports, or one to draw from."""
    return 2 if data.support_draw == "independent" else data.shots + 1


def _synthetic(data: DataConfig) -> Source:
    """Generates the data at data.root first unless a complete set with these parameters is already there."""
    from episodes.synthetic import generate

    syn = data.synthetic
    generate(data.root, images=syn.images, size=syn.size, seed=syn.seed)
    return SyntheticSource(data.root, data.train_list, data.val_list)


SOURCES: dict[str, Callable[[DataConfig], Source]] = {
    "pascal": _pascal,
    "coco": _coco,
    "folder": _folder,
    "synthetic": _synthetic,
    "deepglobe": lambda data: DeepglobeSource(data.root),
    "isic": lambda data: IsicSource(data.root),
    "chest_xray": lambda data: ChestXraySource(data.root),
    "fss1000": lambda data: Fss1000Source(data.root, data.fss1000.splits, data.fss1000.classes, _least_images(data)),
}


def build_source(data: DataConfig) -> Source:
    """The Source of `data.dataset` over `data.root`, with the data.* keys that concern it."""
    try:
        builder = SOURCES[data.dataset]
    except KeyError:
        raise KeyError(f"unknown dataset data.dataset={data.dataset!r}; choose from {sorted(SOURCES)}") from None
    return builder(data)

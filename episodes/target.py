"""What the cross-domain targets (Deepglobe, ISIC2018, Chest X-ray) share: a test-only dataset in one fold.

Every class is novel and none is base (training happens on another dataset); both splits hold the same images; the
images of each class's episodes are fixed by the benchmark (`class_images`), not by data.lists.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from episodes.base import DataError
from episodes.folds import all_novel, check_fold
from episodes.pascal import SPLITS


class TargetSource:
    """Base of the test-only sources; a subclass sets name, root and class_names, and calls `_set_ids`."""

    name: str
    root: Path
    class_names: dict[int, str]
    num_folds = 1
    fixed_pairs = True  # a class's images are fixed by the benchmark, not by data.lists
    parallel_scan = True  # class_pixels reads one file

    def _set_ids(self, ids: Iterable[str]) -> None:
        self._ids = sorted(ids)
        self._id_set = frozenset(self._ids)

    def _known(self, image_id: str) -> str:
        """`image_id`, or DataError naming the dataset when it has no such image."""
        if image_id not in self._id_set:
            raise DataError(f"image id {image_id!r} is not in the {self.name} dataset {self.root}")
        return image_id

    def image_ids(self, split: str) -> list[str]:
        """Every image (a test-only set: both splits are the same), sorted."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
        return list(self._ids)

    def identity(self) -> dict[str, Any]:
        """The root and, for a source that reads several layouts, the one found: they place every image (a subclass
        whose images move with other settings adds those). Part of the feature-cache key."""
        return {"source": self.name, "root": str(self.root.resolve()), "layout": getattr(self, "layout", "")}

    def fold_classes(self, fold: int) -> tuple[list[int], list[int]]:
        """The one fold: every class novel, no base class."""
        check_fold(fold, self.num_folds, self.name)
        return all_novel(len(self.class_names))

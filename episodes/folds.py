"""Class folds: which classes are novel (tested) and which are base (trained on) in each fold of a dataset.

A dataset's folds belong to its Source (`source.num_folds`, `source.fold_classes(fold)`); this module holds the
published splits the sources use and the one fold check they share:

- PASCAL-5i: 4 folds; fold f holds the novel classes 5f+1 .. 5f+5 of VOC's 20.
- COCO-20i, interleaved (HSNet, PFENet/BAM `use_split_coco`, FPTrans; the default): 4 folds, fold f = {4k + f + 1}.
- COCO-20i, consecutive (PANet and older tables): fold f = 20f+1 .. 20f+20.
- `block_fold` cuts any number of classes into N contiguous blocks the PASCAL-5i way (folder datasets).
- A cross-domain target (Deepglobe, ISIC, Chest X-ray, FSS-1000) has one fold: every class novel, none base.
"""

from __future__ import annotations

from typing import get_args

from fewshot.config import CocoSplit

PASCAL_FOLDS = 4  # PASCAL-5i: 20 classes, 5 per fold
COCO_FOLDS = 4  # COCO-20i: 80 classes, 20 per fold
COCO_SPLITS = get_args(CocoSplit)


def check_fold(fold: object, num_folds: int, dataset: str) -> None:
    """Raises ValueError naming `dataset` and its valid folds unless `fold` is one of 0 .. num_folds - 1."""
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < num_folds:
        valid = ", ".join(map(str, range(num_folds)))
        raise ValueError(
            f"data.fold={fold!r} does not exist for {dataset}: it has {num_folds} fold(s), valid folds are {valid}"
        )


def all_novel(num_classes: int) -> tuple[list[int], list[int]]:
    """The one fold of a test-only (cross-domain) dataset: no base class, classes 1..num_classes novel."""
    return [], list(range(1, num_classes + 1))


def _split(all_classes: range, novel: list[int]) -> tuple[list[int], list[int]]:
    novel_set = set(novel)
    return [c for c in all_classes if c not in novel_set], sorted(novel)


def pascal_fold(fold: int) -> tuple[list[int], list[int]]:
    """(base, novel) class ids of PASCAL-5i fold `fold`: novel = 5f+1 .. 5f+5, base = the other 15."""
    check_fold(fold, PASCAL_FOLDS, "PASCAL-5i")
    return _split(range(1, 21), list(range(5 * fold + 1, 5 * fold + 6)))


def coco_fold(fold: int, split: str = "interleaved") -> tuple[list[int], list[int]]:
    """(base, novel) class ids of COCO-20i fold `fold` (ids 1..80 = COCO category ids ascending).

    Args:
        fold: 0..3.
        split: "interleaved" (novel = {4k + f + 1}) or "consecutive" (novel = 20f+1 .. 20f+20).
    """
    check_fold(fold, COCO_FOLDS, "COCO-20i")
    if split == "interleaved":
        novel = [4 * k + fold + 1 for k in range(20)]
    elif split == "consecutive":
        novel = list(range(20 * fold + 1, 20 * fold + 21))
    else:
        raise ValueError(f"unknown COCO-20i split {split!r}; choose from {', '.join(COCO_SPLITS)}")
    return _split(range(1, 81), novel)


def block_fold(num_classes: int, fold: int, num_folds: int = 4) -> tuple[list[int], list[int]]:
    """(base, novel) when classes 1..num_classes are cut into `num_folds` contiguous, near-equal blocks.

    Class i (1-based) is novel in fold (i - 1) * num_folds // num_classes: PASCAL-5i for 20 classes and 4 folds.
    Needs at least `num_folds` classes; one fold makes every class novel.
    """
    if num_folds < 1 or num_classes < num_folds:
        raise ValueError(f"{num_classes} classes cannot be cut into {num_folds} folds; at least {num_folds} are needed")
    check_fold(fold, num_folds, f"{num_classes} classes in {num_folds} blocks")
    classes = range(1, num_classes + 1)
    return _split(classes, [c for c in classes if (c - 1) * num_folds // num_classes == fold])

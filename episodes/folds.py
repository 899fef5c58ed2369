"""Class folds: which classes are novel (tested) and which are base (trained on) in each fold.

- PASCAL-5i: fold f holds the novel classes 5f+1 .. 5f+5 of VOC's 20.
- COCO-20i, interleaved (HSNet, PFENet/BAM `use_split_coco`, FPTrans; the default): fold f = {4k + f + 1, k = 0..19}.
- COCO-20i, consecutive (PANet and older tables): fold f = 20f+1 .. 20f+20.
- `block_fold` cuts any number of classes into 4 contiguous blocks the PASCAL-5i way (used for folders).
"""

from __future__ import annotations

from typing import get_args

from fewshot.config import CocoSplit

FOLDS = (0, 1, 2, 3)
COCO_SPLITS = get_args(CocoSplit)


def _check_fold(fold: int) -> None:
    if fold not in FOLDS:
        raise ValueError(f"fold {fold!r} does not exist; valid folds are 0, 1, 2, 3")


def _split(all_classes: range, novel: list[int]) -> tuple[list[int], list[int]]:
    novel_set = set(novel)
    return [c for c in all_classes if c not in novel_set], sorted(novel)


def pascal_fold(fold: int) -> tuple[list[int], list[int]]:
    """(base, novel) class ids of PASCAL-5i fold `fold`: novel = 5f+1 .. 5f+5, base = the other 15."""
    _check_fold(fold)
    return _split(range(1, 21), list(range(5 * fold + 1, 5 * fold + 6)))


def coco_fold(fold: int, split: str = "interleaved") -> tuple[list[int], list[int]]:
    """(base, novel) class ids of COCO-20i fold `fold` (ids 1..80 = COCO category ids ascending).

    Args:
        fold: 0..3.
        split: "interleaved" (novel = {4k + f + 1}) or "consecutive" (novel = 20f+1 .. 20f+20).
    """
    _check_fold(fold)
    if split == "interleaved":
        novel = [4 * k + fold + 1 for k in range(20)]
    elif split == "consecutive":
        novel = list(range(20 * fold + 1, 20 * fold + 21))
    else:
        raise ValueError(f"unknown COCO-20i split {split!r}; choose from {', '.join(COCO_SPLITS)}")
    return _split(range(1, 81), novel)


def block_fold(num_classes: int, fold: int) -> tuple[list[int], list[int]]:
    """(base, novel) when classes 1..num_classes are cut into 4 contiguous, near-equal blocks (PASCAL-5i for 20).

    Class i (1-based) is novel in fold (i - 1) * 4 // num_classes. Needs at least 4 classes.
    """
    _check_fold(fold)
    if num_classes < 4:
        raise ValueError(f"{num_classes} classes cannot be cut into 4 folds; at least 4 are needed")
    classes = range(1, num_classes + 1)
    return _split(classes, [c for c in classes if (c - 1) * 4 // num_classes == fold])

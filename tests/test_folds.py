"""Fold definitions (PASCAL-5i, COCO-20i both conventions, folder blocks) and the class tables."""

from __future__ import annotations

import json

import pytest

from episodes.classes import COCO_CATEGORY_IDS, COCO_CLASS_OF_CATEGORY, COCO_CLASSES, VOC_CLASSES
from episodes.folds import block_fold, coco_fold, pascal_fold

COCO_FOLD0_NAMES = [  # PROTOCOL.md: interleaved fold 0
    "person", "airplane", "boat", "parking meter", "dog", "elephant", "backpack", "suitcase", "sports ball",
    "skateboard", "wine glass", "spoon", "sandwich", "hot dog", "chair", "dining table", "mouse", "microwave",
    "refrigerator", "scissors",
]  # fmt: skip


def _check_partition(fold_fn, num_classes: int, novel_size: int) -> None:
    novels = []
    for fold in range(4):
        base, novel = fold_fn(fold)
        assert len(novel) == novel_size and not set(base) & set(novel)
        assert sorted(base + novel) == list(range(1, num_classes + 1))
        assert base == sorted(base) and novel == sorted(novel)
        novels += novel
    assert sorted(novels) == list(range(1, num_classes + 1))  # every class is novel in exactly one fold


def test_pascal_folds():
    _check_partition(pascal_fold, 20, 5)
    assert pascal_fold(0)[1] == [1, 2, 3, 4, 5]
    assert pascal_fold(3)[1] == [16, 17, 18, 19, 20]
    assert [VOC_CLASSES[c - 1] for c in pascal_fold(1)[1]] == ["bus", "car", "cat", "chair", "cow"]


@pytest.mark.parametrize("split", ["interleaved", "consecutive"])
def test_coco_folds_partition(split):
    _check_partition(lambda f: coco_fold(f, split), 80, 20)


def test_coco_fold_conventions():
    assert [COCO_CLASSES[c - 1] for c in coco_fold(0)[1]] == COCO_FOLD0_NAMES
    assert coco_fold(2)[1][:3] == [3, 7, 11]
    assert coco_fold(1, "consecutive")[1] == list(range(21, 41))
    assert coco_fold(0) == coco_fold(0, "interleaved")


@pytest.mark.parametrize("fn", [pascal_fold, coco_fold, lambda f: block_fold(10, f)])
@pytest.mark.parametrize("fold", [-1, 4, "0"])
def test_bad_fold(fn, fold):
    with pytest.raises(ValueError, match="valid folds are 0, 1, 2, 3"):
        fn(fold)


def test_bad_coco_split():
    with pytest.raises(ValueError, match="interleaved, consecutive"):
        coco_fold(0, "random")


def test_block_fold():
    assert [block_fold(20, f) for f in range(4)] == [pascal_fold(f) for f in range(4)]
    _check_partition(lambda f: block_fold(80, f), 80, 20)
    sizes = [len(block_fold(11, f)[1]) for f in range(4)]
    assert sum(sizes) == 11 and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="at least 4"):
        block_fold(3, 0)


def test_class_tables():
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"
    assert len(COCO_CATEGORY_IDS) == len(COCO_CLASSES) == 80
    assert list(COCO_CATEGORY_IDS) == sorted(COCO_CATEGORY_IDS) and COCO_CATEGORY_IDS[-1] == 90
    assert COCO_CLASS_OF_CATEGORY[1] == 1 and COCO_CLASS_OF_CATEGORY[90] == 80 and 12 not in COCO_CLASS_OF_CATEGORY


@pytest.mark.slow
def test_coco_tables_match_official_categories(shared_data):
    categories = json.loads((shared_data / "coco_sample_icevision" / "annotations.json").read_text())["categories"]
    official = sorted((c["id"], c["name"]) for c in categories)
    assert official == list(zip(COCO_CATEGORY_IDS, COCO_CLASSES, strict=True))

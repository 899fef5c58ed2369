"""MaskIndex: scan, cache, invalidation, read-only roots, parallel scan; the real 12,031 masks."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from PIL import Image

import episodes.index as index_module
from episodes.base import DataError
from episodes.index import MaskIndex, default_cache_dir
from episodes.pascal import PascalSource

# SOURCE.md of voc2012_segclassaug: images whose mask holds class c, over all 12,031 masks
REAL_IMAGES_PER_CLASS = dict(enumerate(
    [676, 565, 801, 533, 750, 459, 1213, 1119, 1204, 335, 603, 1305, 523, 558, 4344, 572, 356, 581, 584, 622], 1
))  # fmt: skip


def write_masks(root, count=12, seed=0) -> dict[str, np.ndarray]:
    """A VOC layout of random masks (a few classes, some void) with every id in both lists; returns the labels."""
    rng = np.random.default_rng(seed)
    (root / "SegmentationClassAug").mkdir(parents=True)
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    labels = {}
    for k in range(count):
        classes = rng.choice(np.arange(1, 21), size=int(rng.integers(0, 4)), replace=False)
        label = rng.choice(np.array([0, 255, *classes], np.uint8), size=(9, 11))
        labels[f"im{k:03d}"] = label
        Image.fromarray(label).save(root / "SegmentationClassAug" / f"im{k:03d}.png")
    for split in ("train_aug", "val"):
        (root / f"ImageSets/Segmentation/{split}.txt").write_text("\n".join(labels) + "\n")
    return labels


def expected_counts(label: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(label, return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts, strict=True) if v not in (0, 255)}


def test_build_counts_every_class(tmp_path):
    labels = write_masks(tmp_path / "voc")
    index = MaskIndex.build(PascalSource(tmp_path / "voc"), "trn")
    assert index.image_ids == list(labels) and len(index) == 12
    for image_id, label in labels.items():
        assert index.classes(image_id) == expected_counts(label)
    some_class = next(c for label in labels.values() for c in expected_counts(label))
    assert index.images_with(some_class) == [i for i, lab in labels.items() if (lab == some_class).any()]
    assert index.images_with(some_class, min_pixels=10**6) == []
    with pytest.raises(KeyError, match="nope"):
        index.classes("nope")


def test_parallel_scan_equals_serial(tmp_path, monkeypatch):
    write_masks(tmp_path / "voc", count=40)
    source = PascalSource(tmp_path / "voc")
    monkeypatch.setattr(index_module, "PARALLEL_MIN_IMAGES", 0)
    parallel = MaskIndex.build(source, "trn", workers=2)
    serial = MaskIndex.build(source, "trn", workers=1)
    assert parallel.image_ids == serial.image_ids
    assert all(parallel.classes(i) == serial.classes(i) for i in serial.image_ids)


def test_cache_is_reused_then_invalidated(tmp_path, monkeypatch):
    labels = write_masks(tmp_path / "voc")
    cache = tmp_path / "cache"
    first = MaskIndex.load_or_build(PascalSource(tmp_path / "voc"), "trn", cache)
    assert len(list(cache.glob("maskindex-pascal-trn-*.json"))) == 1

    def no_scan(self, image_id):
        raise AssertionError("the cached index should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(PascalSource, "class_pixels", no_scan)
        again = MaskIndex.load_or_build(PascalSource(tmp_path / "voc"), "trn", cache)
    assert again.image_ids == first.image_ids and again.fingerprint == first.fingerprint
    assert all(again.classes(i) == first.classes(i) for i in labels)

    changed = labels["im003"].copy()
    changed[:] = 7
    Image.fromarray(changed).save(tmp_path / "voc/SegmentationClassAug/im003.png")
    st = os.stat(tmp_path / "voc/SegmentationClassAug/im003.png")
    os.utime(tmp_path / "voc/SegmentationClassAug/im003.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rebuilt = MaskIndex.load_or_build(PascalSource(tmp_path / "voc"), "trn", cache)
    assert rebuilt.classes("im003") == {7: 99} and rebuilt.fingerprint != first.fingerprint


def test_corrupt_cache_is_rebuilt(tmp_path, caplog):
    write_masks(tmp_path / "voc")
    source = PascalSource(tmp_path / "voc")
    path = MaskIndex.cache_path(source, "trn", source.fingerprint("trn"), tmp_path / "cache")
    path.parent.mkdir()
    path.write_text("{truncated")
    with pytest.raises(DataError, match="delete it to rebuild"):
        MaskIndex.load(path)
    with caplog.at_level(logging.WARNING, logger="episodes.index"):
        index = MaskIndex.load_or_build(source, "trn", tmp_path / "cache")
    assert len(index) == 12 and "unreadable" in caplog.text
    assert MaskIndex.load(path).image_ids == index.image_ids


def test_default_cache_dir_and_read_only_root(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    write_masks(tmp_path / "voc")
    assert default_cache_dir(tmp_path / "voc") == tmp_path / "voc/.fewshot_cache"
    MaskIndex.load_or_build(PascalSource(tmp_path / "voc"), "val")
    assert list((tmp_path / "voc/.fewshot_cache").glob("maskindex-pascal-val-*.json"))

    write_masks(tmp_path / "shared")
    os.chmod(tmp_path / "shared", 0o555)  # read-only, as ../shared is (root ignores the bits: they are checked)
    try:
        assert default_cache_dir(tmp_path / "shared") == tmp_path / "user_cache/fewshot"
        MaskIndex.load_or_build(PascalSource(tmp_path / "shared"), "trn")
    finally:
        os.chmod(tmp_path / "shared", 0o755)
    assert list((tmp_path / "user_cache/fewshot").glob("maskindex-pascal-trn-*.json"))
    assert not (tmp_path / "shared/.fewshot_cache").exists()


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache folder per pytest session: real-data indexes are scanned once for all test files."""
    return tmp_path_factory.getbasetemp() / "fewshot_real_cache"


@pytest.mark.slow
def test_real_masks_class_table(shared_data, shared_cache):
    root = shared_data / "voc2012_segclassaug"
    source = PascalSource(root, train_list=str(root / "train_aug_list_from_repo.txt"),
                          val_list=str(shared_data / "splits/pfenet/pascal/val.txt"))  # fmt: skip
    indexes = [MaskIndex.load_or_build(source, split, shared_cache) for split in ("trn", "val")]
    assert [len(i) for i in indexes] == [10582, 1449]
    per_class = {c: sum(len(i.images_with(c)) for i in indexes) for c in range(1, 21)}
    assert per_class == REAL_IMAGES_PER_CLASS

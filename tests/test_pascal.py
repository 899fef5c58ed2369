"""PascalSource on a generated VOC2012 + SBD layout, and on the real SegmentationClassAug masks."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

from episodes.base import DataError
from episodes.pascal import PascalSource, read_rgb


def _label(value_boxes: dict[int, tuple[int, int, int, int]], shape=(24, 32)) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    for value, (y0, y1, x0, x1) in value_boxes.items():
        label[y0:y1, x0:x1] = value
    return label


LABELS = {
    "2007_000001": _label({15: (0, 10, 0, 10), 255: (10, 12, 0, 10), 3: (20, 24, 20, 32)}),  # person 100, bird 48
    "2008_000002": _label({7: (0, 24, 0, 16)}),  # car 384
    "2009_000003": _label({}),  # background only
}


def write_voc(root, labels=LABELS, val=("2009_000003",)):
    """VOC layout: palette PNG masks, JPEG images, train_aug (plain ids) and val (PFENet style) lists."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for image_id, label in labels.items():
        mask = Image.fromarray(label, mode="P")
        mask.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        mask.save(root / "SegmentationClassAug" / f"{image_id}.png")
        Image.fromarray(np.full((*label.shape, 3), 90, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
    trn = [i for i in labels if i not in val]
    (root / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(trn) + "\n")
    lines = [f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png" for i in val]
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def voc(tmp_path):
    return PascalSource(write_voc(tmp_path / "VOC2012"))


def test_lists_and_classes(voc):
    assert voc.image_ids("trn") == ["2007_000001", "2008_000002"]
    assert voc.image_ids("val") == ["2009_000003"]  # PFENet's "JPEGImages/<id>.jpg SegmentationClassAug/<id>.png"
    assert voc.class_names[1] == "aeroplane" and voc.class_names[15] == "person" and len(voc.class_names) == 20
    assert voc.class_pixels("2007_000001") == {15: 100, 3: 48}
    assert voc.class_pixels("2008_000002") == {7: 384}
    assert voc.class_pixels("2009_000003") == {}
    assert voc.fold_classes(2) == ([*range(1, 11), *range(16, 21)], [11, 12, 13, 14, 15])


def test_class_mask_keeps_void_and_hides_other_classes(voc):
    label = LABELS["2007_000001"]
    mask = voc.load_class_mask("2007_000001", 15)
    assert mask.dtype == np.uint8 and mask.shape == label.shape
    assert np.array_equal(mask == 1, label == 15)
    assert np.array_equal(mask == 255, label == 255)
    assert not mask[label == 3].any()  # bird pixels are background in the person mask
    image = voc.load_image("2007_000001")
    assert image.shape == (24, 32, 3) and image.dtype == np.uint8


def test_custom_lists_relative_to_root(tmp_path):
    root = write_voc(tmp_path / "VOC2012")
    (root / "mine.txt").write_text("# my list\n2008_000002\n\n2008_000002.jpg\n2007_000001\n")
    source = PascalSource(root, train_list="mine.txt", val_list=str(root / "ImageSets/Segmentation/train_aug.txt"))
    assert source.image_ids("trn") == ["2008_000002", "2007_000001"]  # comments, blanks and repeats skipped
    assert source.image_ids("val") == ["2007_000001", "2008_000002"]


def test_missing_data_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere.*SegmentationClassAug"):
        PascalSource(tmp_path / "nowhere")
    root = write_voc(tmp_path / "VOC2012")
    with pytest.raises(DataError, match="missing.txt"):
        PascalSource(root, train_list="missing.txt").image_ids("trn")
    (root / "bad.txt").write_text("2007_000001\n2010_999999\n")
    with pytest.raises(DataError, match=r"bad.txt, line 2.*2010_999999"):
        PascalSource(root, train_list="bad.txt").image_ids("trn")
    source = PascalSource(root)
    (root / "JPEGImages" / "2008_000002.jpg").unlink()
    with pytest.raises(DataError, match=r"JPEGImages/2008_000002.jpg does not exist.*VOCtrainval"):
        source.load_image("2008_000002")
    with pytest.raises(ValueError, match="trn, val"):
        source.image_ids("test")


def test_bad_masks(tmp_path):
    root = write_voc(tmp_path / "VOC2012")
    source = PascalSource(root)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "SegmentationClassAug/2008_000002.png")
    with pytest.raises(DataError, match="2008_000002.png has mode 'RGB'"):
        source.class_pixels("2008_000002")
    Image.fromarray(_label({42: (0, 2, 0, 2)})).save(root / "SegmentationClassAug/2008_000002.png")
    with pytest.raises(DataError, match=r"values \[42\]"):
        source.class_pixels("2008_000002")
    (root / "JPEGImages/2007_000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot be read"):
        read_rgb(root / "JPEGImages/2007_000001.jpg")


def _save_mask(root, image_id: str, label: np.ndarray) -> None:
    Image.fromarray(label, mode="P").save(root / "SegmentationClassAug" / f"{image_id}.png")


@pytest.mark.parametrize("shape", [(12, 16), (30, 40)])  # smaller, larger than the 24 x 32 image
def test_a_mask_of_another_size_than_its_image_is_refused_naming_both(tmp_path, shape):
    root = write_voc(tmp_path / "VOC2012")
    _save_mask(root, "2008_000002", _label({7: (0, 8, 0, 8)}, shape))
    message = (
        f"mask {root}/SegmentationClassAug/2008_000002.png is {shape[1]}x{shape[0]} but its image "
        f"{root}/JPEGImages/2008_000002.jpg is 32x24"
    )
    with pytest.raises(DataError, match=re.escape(message)):
        PascalSource(root).load_class_mask("2008_000002", 7)


def test_the_size_check_reads_the_image_header_only(voc, monkeypatch):
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.format) or real_load(im))
    voc.load_class_mask("2007_000001", 15)
    assert set(decoded) == {"PNG"}  # the mask; the JPEG is opened for its size, never decoded
    voc.load_image("2007_000001")
    assert "JPEG" in decoded  # the check would see a decode


def _rotated_photo(root, image_id: str, orientation: int) -> np.ndarray:
    """Overwrites the JPEG of `image_id` (24 x 32 stored pixels) with an EXIF orientation tag; returns its pixels."""
    pixels = np.zeros((24, 32, 3), np.uint8)
    pixels[:8, :8] = 250  # a bright top-left corner of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = root / "JPEGImages" / f"{image_id}.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=100)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_exif_orientation_is_not_applied_and_a_mask_of_the_turned_photo_is_named(tmp_path):
    root = write_voc(tmp_path / "VOC2012")
    stored = _rotated_photo(root, "2008_000002", orientation=6)
    source = PascalSource(root)
    image = source.load_image("2008_000002")
    assert image.shape == (24, 32, 3) and np.array_equal(image, stored)  # the stored pixels, as the mask was drawn
    assert image[:8, :8].min() > 200
    assert source.load_class_mask("2008_000002", 7).shape == (24, 32)
    _save_mask(root, "2008_000002", _label({7: (0, 8, 0, 8)}, (32, 24)))  # drawn on the photo as displayed
    with pytest.raises(DataError, match="is 24x32 but its image .* is 32x24 .*EXIF orientation 6"):
        source.load_class_mask("2008_000002", 7)


def test_an_empty_list_is_named(tmp_path):
    root = write_voc(tmp_path / "VOC2012")
    (root / "ImageSets/Segmentation/val.txt").write_text("# no ids yet\n\n")
    with pytest.raises(DataError, match=r"id list .*val.txt is empty: it holds no image id"):
        PascalSource(root).image_ids("val")


def test_fingerprint_follows_masks_and_list(tmp_path):
    root = write_voc(tmp_path / "VOC2012")
    before = PascalSource(root).fingerprint("trn")
    assert PascalSource(root).fingerprint("trn") == before
    assert PascalSource(root).fingerprint("val") != before
    mask = root / "SegmentationClassAug/2008_000002.png"
    st = mask.stat()
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = PascalSource(root).fingerprint("trn")
    assert touched != before
    (root / "ImageSets/Segmentation/train_aug.txt").write_text("2007_000001\n")
    assert PascalSource(root).fingerprint("trn") != touched


@pytest.mark.slow
def test_real_segclassaug_masks(shared_data):
    root = shared_data / "voc2012_segclassaug"
    source = PascalSource(root, train_list=str(root / "train_aug_list_from_repo.txt"),
                          val_list=str(shared_data / "splits/pfenet/pascal/val.txt"))  # fmt: skip
    assert len(source.image_ids("trn")) == 10582 and len(source.image_ids("val")) == 1449
    assert not set(source.image_ids("trn")) & set(source.image_ids("val"))
    official = np.asarray(Image.open(shared_data / "voc2012_jpeg_icevision/SegmentationClass/2007_000063.png"))
    counts = source.class_pixels("2007_000063")  # the official VOC mask: dog (12) and chair (9), void border
    assert set(counts) == {9, 12} and counts[12] == int((official == 12).sum())
    mask = source.load_class_mask("2007_000063", 12)
    assert np.array_equal(mask == 1, official == 12) and np.array_equal(mask == 255, official == 255)

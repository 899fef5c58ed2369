"""CocoSource: class masks rendered from instances json equal pycocotools' own per-instance annToMask union."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from episodes.base import DataError
from episodes.classes import COCO_CLASS_OF_CATEGORY
from episodes.coco import CocoSource
from episodes.index import MaskIndex

# pycocotools' annToMask (the reference here) trips numpy 2's __array__(copy=) deprecation
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's iscrowd format: run lengths over the column-major pixels, starting with a background run."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"counts": ([0] + runs) if flat[0] else runs, "size": list(mask.shape)}


def write_coco(root, split="val2014"):
    """Two images: person (polygons + an uncompressed-RLE crowd), toothbrush (compressed RLE), a stuff class."""
    (root / "annotations").mkdir(parents=True)
    (root / split).mkdir()
    crowd = np.zeros((20, 30), np.uint8)
    crowd[2:12, 8:25] = 1
    brush = np.zeros((20, 30), np.uint8)
    brush[15:19, 1:6] = 1
    compressed = mask_utils.encode(np.asfortranarray(brush))
    compressed["counts"] = compressed["counts"].decode()
    anns = [
        {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 10, 1, 10, 9, 1, 9]]},
        {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 0,
         "segmentation": [[20, 2, 28, 2, 24, 10], [2, 14, 6, 14, 4, 18]]},  # two polygons of one instance
        {"id": 3, "image_id": 7, "category_id": 1, "iscrowd": 1, "segmentation": _uncompressed_rle(crowd)},
        {"id": 4, "image_id": 7, "category_id": 90, "iscrowd": 0, "segmentation": compressed},
        {"id": 5, "image_id": 7, "category_id": 92, "iscrowd": 0, "segmentation": [[0, 0, 29, 0, 29, 19]]},
    ]  # fmt: skip
    images = [
        {"id": 7, "file_name": f"COCO_{split}_000000000007.jpg", "height": 20, "width": 30},
        {"id": 3, "file_name": f"COCO_{split}_000000000003.jpg", "height": 8, "width": 8},
    ]
    categories = [{"id": 1, "name": "person"}, {"id": 90, "name": "toothbrush"}, {"id": 92, "name": "banner"}]
    name = "instances_train2014.json" if split == "train2014" else "instances_val2014.json"
    (root / "annotations" / name).write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories})
    )
    for info in images:
        Image.new("RGB", (info["width"], info["height"])).save(root / split / info["file_name"])
    return root


def expected_mask(coco: COCO, coco_image_id: int, class_id: int, crowd: str) -> np.ndarray:
    """The union of pycocotools' annToMask over the class's instances, under a crowd rule."""
    info = coco.imgs[coco_image_id]
    plain = np.zeros((info["height"], info["width"]), bool)
    crowd_px = plain.copy()
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=coco_image_id)):
        if COCO_CLASS_OF_CATEGORY.get(ann["category_id"]) == class_id:
            target = crowd_px if ann["iscrowd"] else plain
            target |= coco.annToMask(ann).astype(bool)
    out = plain.astype(np.uint8)
    if crowd == "foreground":
        out[crowd_px] = 1
    elif crowd == "ignore":
        out[crowd_px & ~plain] = 255
    return out


def load_coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return COCO(str(path))


def check_against_pycocotools(source: CocoSource, coco: COCO, crowd: str) -> int:
    """Compares every (image, class) mask and pixel count; returns the number of pairs checked."""
    checked = 0
    for coco_id, info in coco.imgs.items():
        image_id = info["file_name"].rsplit(".", 1)[0]
        classes = {COCO_CLASS_OF_CATEGORY.get(a["category_id"]) for a in coco.imgToAnns[coco_id]} - {None}
        counts = source.class_pixels(image_id)
        for class_id in classes:
            expected = expected_mask(coco, coco_id, class_id, crowd)
            np.testing.assert_array_equal(source.load_class_mask(image_id, class_id), expected)
            assert counts.get(class_id, 0) == int((expected == 1).sum())
            checked += 1
        assert set(counts) <= classes
    return checked


@pytest.mark.parametrize("crowd", ["ignore", "foreground", "background"])
def test_masks_equal_pycocotools_union(tmp_path, crowd):
    root = write_coco(tmp_path / "coco")
    source = CocoSource(root, crowd=crowd)
    assert source.image_ids("val") == ["COCO_val2014_000000000007", "COCO_val2014_000000000003"]
    assert check_against_pycocotools(source, load_coco(root / "annotations/instances_val2014.json"), crowd) == 2
    assert set(source.class_pixels("COCO_val2014_000000000007")) == {1, 80}  # person, toothbrush; stuff ignored
    assert source.class_pixels("COCO_val2014_000000000003") == {}
    person = source.load_class_mask("COCO_val2014_000000000007", 1)
    assert ((person == 255).any()) == (crowd == "ignore")
    assert source.load_image("COCO_val2014_000000000007").shape == (20, 30, 3)


def test_lazy_json_and_fingerprint(tmp_path):
    root = write_coco(tmp_path / "coco")
    json_path = root / "annotations/instances_val2014.json"
    text = json_path.read_text()
    json_path.write_text("not json")
    source = CocoSource(root)  # construction reads nothing
    fingerprint = source.fingerprint("val")  # nor does the fingerprint
    with pytest.raises(DataError, match="instances_val2014.json is not a COCO instances json"):
        source.image_ids("val")
    json_path.write_text(text)
    fresh = CocoSource(root)
    assert fresh.fingerprint("val") != fingerprint
    assert CocoSource(root, crowd="foreground").fingerprint("val") != fresh.fingerprint("val")  # counts differ
    assert len(fresh.image_ids("val")) == 2


def test_folds_lists_and_errors(tmp_path):
    root = write_coco(tmp_path / "coco")
    assert CocoSource(root).fold_classes(1)[1][:2] == [2, 6]
    assert CocoSource(root, coco_split="consecutive").fold_classes(1)[1][:2] == [21, 22]
    (root / "ids.txt").write_text("val2014/COCO_val2014_000000000003.jpg\n")
    assert CocoSource(root, val_list="ids.txt").image_ids("val") == ["COCO_val2014_000000000003"]
    (root / "bad.txt").write_text("COCO_val2014_000000000003\nCOCO_val2014_000000000999\n")
    with pytest.raises(DataError, match=r"bad.txt, line 2.*000999"):
        CocoSource(root, val_list="bad.txt").image_ids("val")
    with pytest.raises(DataError, match=r"instances_train2014.json.*does not exist.*train2014.zip"):
        CocoSource(root).image_ids("trn")
    with pytest.raises(DataError, match="nowhere"):
        CocoSource(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="ignore, foreground, background"):
        CocoSource(root, crowd="skip")
    with pytest.raises(DataError, match="000042"):
        CocoSource(root).class_pixels("COCO_val2014_000000000042")


def _rewrite_json(root, edit) -> str:
    path = root / "annotations" / "instances_val2014.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("annotations"), r"has no 'annotations' list \(keys: \['categories', 'images'\]\)"),
        (lambda d: d.update(annotations=[]), "holds no annotations"),
        (lambda d: d["images"].pop(0), r"5 of 5 annotations have an image_id that no entry of its 1 'images' has"),
        (lambda d: d["images"].pop(0), r"its 1 'images' has \(e\.g\. \[7\]\); the images and annotations lists"),
        (lambda d: d.update(annotations=d["annotations"][-1:]), "none of its 1 annotations is a segmentation"),
    ],
)
def test_a_json_that_cannot_give_a_mask_is_refused_naming_it(tmp_path, edit, message):
    root = write_coco(tmp_path / "coco")
    path = _rewrite_json(root, edit)
    with pytest.raises(DataError, match=rf"COCO annotation file {path}(: | ).*{message}"):
        CocoSource(root).image_ids("val")


def test_a_json_of_two_images_with_one_stem_stays_named(tmp_path):
    root = write_coco(tmp_path / "coco")
    _rewrite_json(root, lambda d: d["images"].append({**d["images"][0], "id": 99}))
    with pytest.raises(DataError, match=r"two images share the file name stem 'COCO_val2014_000000000007'$"):
        CocoSource(root).image_ids("val")


@pytest.mark.slow
def test_an_image_info_json_without_annotations_is_refused(shared_data):
    root = shared_data / "coco_sample_panopticapi" / "sample_data"
    with pytest.raises(DataError, match=r"images_info_examples.json has no 'annotations' list"):
        CocoSource(root, val_json="images_info_examples.json", val_images="input_images").image_ids("val")


def test_split_of_an_image_and_index(tmp_path):
    root = write_coco(tmp_path / "coco")
    write_coco(tmp_path / "train_side", split="train2014")
    source = CocoSource(root, train_json=str(tmp_path / "train_side/annotations/instances_train2014.json"),
                        train_images=str(tmp_path / "train_side/train2014"))  # fmt: skip
    assert source.load_image("COCO_train2014_000000000003").shape == (8, 8, 3)
    index = MaskIndex.load_or_build(source, "trn", tmp_path / "cache")
    assert index.image_ids == source.image_ids("trn")
    assert index.classes("COCO_train2014_000000000007") == source.class_pixels("COCO_train2014_000000000007")


@pytest.mark.slow
@pytest.mark.parametrize("crowd", ["ignore", "foreground", "background"])
@pytest.mark.parametrize(
    "sample, json_name, images, pairs",
    [
        ("coco_sample_icevision", "annotations.json", "images", 9),
        ("coco_sample_panopticapi/sample_data", "panoptic_coco_detection_format.json", "input_images", 5),
    ],
)
def test_real_samples_equal_pycocotools(shared_data, crowd, sample, json_name, images, pairs):
    root = shared_data / sample
    source = CocoSource(root, crowd=crowd, val_json=json_name, val_images=images)
    assert check_against_pycocotools(source, load_coco(root / json_name), crowd) == pairs
    for image_id in source.image_ids("val"):
        assert source.load_image(image_id).ndim == 3  # sizes checked against the json

"""The cross-domain sources (episodes/deepglobe.py, isic.py, chest_xray.py, folder.py's fss1000) on hand-made data in
the official layouts, and on the real Weizmann horses and CamVid masks where they fit a layout."""

from __future__ import annotations

import numpy as np
import pytest
from cdfss_data import (
    DEEPGLOBE_RGB,
    deepglobe_raw_mask,
    make_chest_xray,
    make_deepglobe_binary,
    make_deepglobe_raw,
    make_fss1000,
    make_isic,
    save,
)
from PIL import Image

from episodes import lists
from episodes.base import DataError
from episodes.chest_xray import ChestXraySource
from episodes.deepglobe import CLASSES, DeepglobeSource, tile_boxes
from episodes.folder import Fss1000Source
from episodes.isic import IsicSource
from fewshot.config import DataConfig


def pairs(source, root) -> dict[int, list[str]]:
    return lists.eval_pairs(source, DataConfig(dataset=source.name, root=str(root), cache_dir=str(root / "cache")))


# --------------------------------------------------------------------------------------------------------------------
# Deepglobe


def test_deepglobe_classes_are_patnets_labelset():
    assert [name for name, _ in CLASSES] == ["agriculture", "urban", "rangeland", "forest", "water", "barren"]
    assert {c: rgb for c, (_, rgb) in enumerate(CLASSES, 1)} == DEEPGLOBE_RGB


def test_tile_boxes_cut_as_patnet():
    boxes = dict(tile_boxes(50, 62))
    assert len(boxes) == 36
    assert boxes["00"] == (0, 8, 0, 10) and boxes["01"] == (0, 8, 10, 20)  # int(1 * 62 / 6) = 10
    assert boxes["55"] == (41, 50, 51, 62)  # int(5 * 50 / 6) = 41, int(5 * 62 / 6) = 51
    assert dict(tile_boxes(2448, 2448))["12"] == (408, 816, 816, 1224)


def test_deepglobe_raw_tiles_filter_and_decode_exactly(tmp_path):
    root = make_deepglobe_raw(tmp_path / "dg", images=2)
    source = DeepglobeSource(root)
    assert source.layout == "raw" and len(source.image_ids("val")) == 2 * 36
    mask = deepglobe_raw_mask()
    expected = {"00": {1: 50, 5: 50}, "03": {2: 50}, "04": {3: 95, 6: 5}}  # 01, 02, the all-unknown ones: dropped
    for image in ("100_sat", "101_sat"):
        counts = {ij: source.class_pixels(f"{image}_{ij}") for ij in (f"{i}{j}" for i in range(6) for j in range(6))}
        assert {ij: c for ij, c in counts.items() if c} == expected
    tile = mask[0:10, 0:10]
    for c in range(1, 7):
        want = np.all(tile == DEEPGLOBE_RGB[c], axis=-1).astype(np.uint8)
        assert np.array_equal(source.load_class_mask("100_sat_00", c), want)
    assert source.load_class_mask("100_sat_03", 2).sum() == 50 and source.load_class_mask("100_sat_04", 6).sum() == 5
    full = np.asarray(Image.open(root / "train" / "100_sat.jpg").convert("RGB"))
    assert np.array_equal(source.load_image("100_sat_23"), full[20:30, 30:40])
    assert pairs(source, tmp_path) == {1: ["100_sat_00", "101_sat_00"], 2: ["100_sat_03", "101_sat_03"],
                                       3: ["100_sat_04", "101_sat_04"], 4: [], 5: ["100_sat_00", "101_sat_00"],
                                       6: ["100_sat_04", "101_sat_04"]}  # fmt: skip


@pytest.mark.parametrize("layout", ["patnet", "dmtnet"])
def test_deepglobe_binary_layouts(tmp_path, layout):
    truth = make_deepglobe_binary(tmp_path / layout, layout)
    source = DeepglobeSource(tmp_path / layout)
    assert source.layout == layout and source.image_ids("trn") == sorted(truth)
    for tile, classes in truth.items():
        assert source.class_pixels(tile) == {c: int(m.sum()) for c, m in sorted(classes.items())}
        for c in range(1, 7):
            want = classes.get(c, np.zeros_like(next(iter(classes.values()))))
            assert np.array_equal(source.load_class_mask(tile, c), want.astype(np.uint8))
        assert source.load_image(tile).shape == (24, 24, 3)
    expected = {c: sorted(t for t, classes in truth.items() if c in classes) for c in range(1, 7)}
    assert pairs(source, tmp_path) == expected  # every tile of the class folder, whatever data.lists says


def test_deepglobe_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no Deepglobe layout"):
        DeepglobeSource(tmp_path / "empty")
    make_deepglobe_binary(tmp_path / "d", "dmtnet")
    next((tmp_path / "d" / "image").iterdir()).unlink()
    with pytest.raises(DataError, match="has no image"):
        DeepglobeSource(tmp_path / "d")


# --------------------------------------------------------------------------------------------------------------------
# ISIC2018, Chest X-ray


@pytest.mark.parametrize("layout", ["sorted", "flat"])
def test_isic_layouts(tmp_path, layout):
    truth = make_isic(tmp_path / "ISIC", layout)
    source = IsicSource(tmp_path / "ISIC")
    assert source.layout == layout and source.class_names == {1: "nevus", 2: "melanoma", 3: "seborrheic keratosis"}
    for image_id, (c, lesion) in truth.items():
        assert np.array_equal(source.load_class_mask(image_id, c), lesion.astype(np.uint8))
        other = c % 3 + 1
        assert source.load_class_mask(image_id, other).sum() == 0  # the lesion belongs to the image's diagnosis only
        assert source.class_pixels(image_id) == {c: int(lesion.sum())}
    assert pairs(source, tmp_path) == {c: sorted(i for i, (k, _) in truth.items() if k == c) for c in (1, 2, 3)}


def test_isic_errors(tmp_path):
    make_isic(tmp_path / "flat", "flat")
    table = tmp_path / "flat" / "class_id.csv"
    table.write_text(table.read_text() + "ISIC_0099999,nevus\n")
    with pytest.raises(DataError, match=r"class_id.csv, line 12: image .*ISIC_0099999.jpg does not exist"):
        IsicSource(tmp_path / "flat")
    table.write_text("ID,Class\nISIC_0000000,basal cell carcinoma\n")
    with pytest.raises(DataError, match="line 2"):
        IsicSource(tmp_path / "flat")
    table.unlink()
    with pytest.raises(DataError, match="copy PATNet's data/isic/class_id.csv there"):
        IsicSource(tmp_path / "flat")
    make_isic(tmp_path / "sorted", "sorted")
    next((tmp_path / "sorted" / "ISIC2018_Task1_Training_GroundTruth").iterdir()).unlink()
    with pytest.raises(DataError, match="has no lesion mask"):
        IsicSource(tmp_path / "sorted")


def test_chest_xray_shenzhen_and_montgomery_names(tmp_path):
    truth = make_chest_xray(tmp_path / "lung")
    source = ChestXraySource(tmp_path / "lung")
    assert source.image_ids("val") == sorted(truth) and "CHNCXR_0999_1" not in source.image_ids("val")
    for name, lungs in truth.items():
        assert np.array_equal(source.load_class_mask(name, 1), lungs.astype(np.uint8))
        assert source.load_image(name).shape == (20, 20, 3)  # grey radiographs come back as RGB
    assert pairs(source, tmp_path) == {1: sorted(truth)}
    save(np.zeros((4, 4), np.uint8), tmp_path / "lung" / "masks" / "CHNCXR_0500_0_mask.png")
    with pytest.raises(DataError, match="has no radiograph .*CHNCXR_0500_0.png"):
        ChestXraySource(tmp_path / "lung")


# --------------------------------------------------------------------------------------------------------------------
# FSS-1000


def test_fss1000_one_fold_of_hsnet_test_classes(tmp_path):
    classes = make_fss1000(tmp_path / "FSS-1000", tmp_path / "splits", {"trn": 3, "val": 2, "test": 2})
    source = Fss1000Source(tmp_path / "FSS-1000", str(tmp_path / "splits"))
    ids = {name: c for c, name in source.class_names.items()}
    base, novel = source.fold_classes(0)
    assert source.num_folds == 1 and novel == sorted(ids[n] for n in classes["test"])
    assert base == sorted(ids[n] for n in classes["trn"])
    got = pairs(source, tmp_path)
    assert {source.class_names[c]: len(v) for c, v in got.items()} == {n: 10 for n in classes["test"]}
    assert got[novel[0]][:3] == [f"{classes['test'][0]}/{n}" for n in ("1", "10", "2")]  # file order, as HSNet globs
    trained = lists.train_pairs(source, DataConfig(dataset="fss1000", root=str(tmp_path), lists="hsnet"))
    assert {source.class_names[c]: len(v) for c, v in trained.items()} == {n: 10 for n in classes["trn"]}  # HSNet's
    val = Fss1000Source(tmp_path / "FSS-1000", str(tmp_path / "splits"), classes="val")
    assert val.fold_classes(0)[1] == sorted(ids[n] for n in classes["val"])
    with pytest.raises(ValueError, match="data.fss1000.splits"):
        Fss1000Source(tmp_path / "FSS-1000", "")


# --------------------------------------------------------------------------------------------------------------------
# Real data in ../shared/data, laid out as a target's files (links, never copies into the repo).


@pytest.mark.slow
def test_weizmann_horses_as_chest_xray_and_isic(shared_data, tmp_path):
    horses = sorted((shared_data / "weizmann_horse" / "figure_ground").glob("*.jpg"))[:40]
    lung = tmp_path / "lung"
    (lung / "CXR_png").mkdir(parents=True)
    (lung / "masks").mkdir()
    for mask in horses:
        (lung / "CXR_png" / f"{mask.stem}.png").symlink_to(shared_data / "weizmann_horse" / "gray" / mask.name)
        (lung / "masks" / f"{mask.stem}_mask.png").symlink_to(mask)  # a JPEG under a .png name: read by content
    source = ChestXraySource(lung)
    assert source.image_ids("val") == [m.stem for m in horses]
    for mask in horses[:10]:
        grey = np.asarray(Image.open(mask).convert("L"))
        want = (grey >= 128).astype(np.uint8)  # JPEG noise around the edge falls either side of 128
        got = source.load_class_mask(mask.stem, 1)
        assert np.array_equal(got, want) and 0.05 < got.mean() < 0.6
        assert source.load_image(mask.stem).shape[:2] == grey.shape


@pytest.mark.slow
def test_camvid_labels_as_deepglobe_colours(shared_data, tmp_path):
    """CamVid's class-index masks painted in Deepglobe's colours: tiles, the 4.8 % filter and the colour decoding
    agree with a direct computation on the label image."""
    camvid = shared_data / "camvid_segnet"
    paint = {3: DEEPGLOBE_RGB[1], 1: DEEPGLOBE_RGB[2], 4: DEEPGLOBE_RGB[3], 5: DEEPGLOBE_RGB[4], 0: DEEPGLOBE_RGB[5]}
    names = sorted(p.name for p in (camvid / "valannot").glob("*.png"))[:3]
    root = tmp_path / "dg" / "train"
    for k, name in enumerate(names):
        label = np.asarray(Image.open(camvid / "valannot" / name))
        rgb = np.zeros((*label.shape, 3), np.uint8)  # other CamVid classes: unknown (black)
        for value, colour in paint.items():
            rgb[label == value] = colour
        save(rgb, root / f"{k}_mask.png")
        (root / f"{k}_sat.jpg").symlink_to(camvid / "val" / name)  # a PNG under a .jpg name: read by content
    source = DeepglobeSource(tmp_path / "dg")
    kept_tiles = 0
    for k, name in enumerate(names):
        label = np.asarray(Image.open(camvid / "valannot" / name))
        for ij, (top, bottom, left, right) in tile_boxes(*label.shape):
            tile = label[top:bottom, left:right]
            painted = np.where(np.isin(tile, list(paint)), tile, -1)  # unpainted classes share one colour
            values, counts = np.unique(painted, return_counts=True)
            kept = len(values) > 1 and counts.min() / tile.size > 0.048
            by_class = {c: int((tile == v).sum()) for v, c in ((3, 1), (1, 2), (4, 3), (5, 4), (0, 5))}
            want = {c: n for c, n in sorted(by_class.items()) if n} if kept else {}
            assert source.class_pixels(f"{k}_sat_{ij}") == want
            kept_tiles += bool(want)
            if kept and want:
                c = next(iter(want))
                v = {1: 3, 2: 1, 3: 4, 4: 5, 5: 0}[c]
                assert np.array_equal(source.load_class_mask(f"{k}_sat_{ij}", c), (tile == v).astype(np.uint8))
    assert 0 < kept_tiles < 3 * 36  # the filter keeps some tiles and drops others

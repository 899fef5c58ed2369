"""FolderSource: FSS-1000 layout and the generic images/ + masks/ + classes.txt layout."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from episodes.base import DataError
from episodes.folder import FolderSource
from episodes.index import MaskIndex

FSS_CLASSES = ["zebra", "apple", "mug", "kite", "owl"]


def write_fss(root, classes=FSS_CLASSES, images=2, side=16):
    """<class>/<n>.jpg + <n>.png with RGB 0/255 masks (as FSS-1000 ships them); image n covers (n + 2) rows."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for n in range(1, images + 1):
            Image.new("RGB", (side, side), (40, 80, 120)).save(root / name / f"{n}.jpg")
            mask = np.zeros((side, side, 3), np.uint8)
            mask[: n + 2] = 255
            mask[side - 1, 0] = 100  # below the 128 threshold: background
            Image.fromarray(mask).save(root / name / f"{n}.png")
    return root


def test_fss_layout_without_splits(tmp_path):
    source = FolderSource(write_fss(tmp_path / "fss"))
    assert source.layout == "fss"
    assert source.class_names == {1: "apple", 2: "kite", 3: "mug", 4: "owl", 5: "zebra"}  # sorted folders
    assert (
        source.image_ids("trn") == source.image_ids("val") == [f"{c}/{n}" for c in sorted(FSS_CLASSES) for n in (1, 2)]
    )
    assert source.class_pixels("mug/2") == {3: 4 * 16}
    assert source.load_class_mask("mug/2", 3).sum() == 64 and not source.load_class_mask("mug/2", 1).any()
    assert source.load_image("owl/1").shape == (16, 16, 3)
    folds = [source.fold_classes(f) for f in range(4)]
    assert sorted(c for _, novel in folds for c in novel) == [1, 2, 3, 4, 5]
    assert folds[0] == ([3, 4, 5], [1, 2])


def test_fss_class_split_files(tmp_path):
    source_root = write_fss(tmp_path / "fss")
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "trn.txt").write_text("zebra\napple\nmug\n")
    (splits / "val.txt").write_text("kite\n")
    (splits / "test.txt").write_text("owl\n")
    source = FolderSource(source_root, list_dir=str(splits))
    assert source.fold_classes(0) == ([1, 3, 5], [4])  # test classes (the benchmark)
    assert source.fold_classes(1) == ([1, 3, 5], [2])  # val classes
    with pytest.raises(ValueError, match="valid folds are 0, 1"):
        source.fold_classes(2)
    assert source.image_ids("trn") == ["apple/1", "apple/2", "mug/1", "mug/2", "zebra/1", "zebra/2"]
    assert source.image_ids("val") == ["kite/1", "kite/2", "owl/1", "owl/2"]
    (splits / "test.txt").write_text("owl\nwalrus\n")
    with pytest.raises(DataError, match=r"test.txt, line 2: class 'walrus'"):
        FolderSource(source_root, list_dir=str(splits))


def write_generic(root, classes="cat\ndog\nbird\nfish\ncar\n", size=(6, 8)):
    """images/ + masks/ (values 0..5 plus 9 and 255) + classes.txt."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text(classes)
    for k in range(3):
        label = np.zeros(size, np.uint8)
        label[0, : k + 1] = 1
        label[1, :2] = 5
        label[2, :3] = 9  # not in classes.txt: void
        label[3, 0] = 255
        Image.fromarray(label).save(root / "masks" / f"img{k}.png")
        Image.new("RGB", size[::-1]).save(root / "images" / f"img{k}.jpg")
    return root


def test_fss_files_without_partner_are_reported_and_short_class_folders_refused(tmp_path, caplog):
    root = write_fss(tmp_path / "fss", images=3)
    Image.new("RGB", (16, 16)).save(root / "owl" / "9.jpg")  # an image without its mask
    Image.new("L", (16, 16)).save(root / "owl" / "8.png")  # a mask without its image
    for n in (1, 2, 3):  # a class folder whose masks are not PNG
        (root / "mug" / f"{n}.png").rename(root / "mug" / f"{n}.bmp")
    with caplog.at_level("WARNING"), pytest.raises(DataError) as err:
        FolderSource(root)
    assert caplog.text.count("without a partner") == 1  # one warning, counts and examples
    assert "8 file(s) without a partner are left out" in caplog.text
    assert "4 image(s) without a .png mask (e.g. mug/1.jpg, mug/2.jpg, mug/3.jpg)" in caplog.text
    assert "1 mask(s) without a .jpg image (e.g. owl/8.png)" in caplog.text
    assert "3 file(s) of another format (e.g. mug/1.bmp, mug/2.bmp, mug/3.bmp)" in caplog.text
    assert f"1 class folder(s) hold fewer than shots + 1 = 2 image/mask pairs (<n>.jpg beside its <n>.png mask): " \
           f"{root / 'mug'} (0)" in str(err.value)  # fmt: skip
    shutil.rmtree(root / "mug")
    assert FolderSource(root).class_names == {1: "apple", 2: "kite", 3: "owl", 4: "zebra"}
    with pytest.raises(DataError, match=r"fewer than shots \+ 1 = 4 image/mask pairs"):
        FolderSource(root, min_images=4)


def test_the_shots_of_the_config_set_the_fewest_pairs_of_a_class_folder(tmp_path):
    from episodes.sources import build_source
    from fewshot.config import DataConfig

    root = write_fss(tmp_path / "fss", images=3)
    assert len(build_source(DataConfig(dataset="folder", root=str(root), shots=2)).class_names) == 5
    with pytest.raises(DataError, match=r"5 class folder\(s\) hold fewer than shots \+ 1 = 4"):
        build_source(DataConfig(dataset="folder", root=str(root), shots=3))


def test_a_mask_of_another_size_is_named_in_both_layouts(tmp_path):
    root = write_fss(tmp_path / "fss")
    Image.new("L", (8, 8)).save(root / "owl" / "1.png")
    with pytest.raises(DataError, match=r"mask .*owl/1.png is 8x8 but its image .*owl/1.jpg is 16x16"):
        FolderSource(root).load_class_mask("owl/1", 4)
    generic = write_generic(tmp_path / "mine")
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(generic / "masks" / "img1.png")
    with pytest.raises(DataError, match=r"mask .*img1.png is 3x3 but its image .*img1.\w+ is"):
        FolderSource(generic).load_class_mask("img1", 1)


def test_generic_masks_without_images_are_reported(tmp_path, caplog):
    root = write_generic(tmp_path / "mine")
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(root / "masks" / "img9.png")
    with caplog.at_level("WARNING"):
        assert FolderSource(root).image_ids("val") == ["img0", "img1", "img2"]
    assert "1 mask(s) in" in caplog.text and "have no image in" in caplog.text and "['img9']" in caplog.text


def test_an_empty_class_split_file_is_named(tmp_path):
    root = write_fss(tmp_path / "fss")
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "trn.txt").write_text("\n")
    (splits / "test.txt").write_text("owl\n")
    with pytest.raises(DataError, match=r"class split file .*trn.txt is empty"):
        FolderSource(root, list_dir=str(splits))


def test_generic_layout(tmp_path):
    source = FolderSource(write_generic(tmp_path / "mine"))
    assert source.layout == "generic" and source.class_names[5] == "car"
    assert source.image_ids("trn") == source.image_ids("val") == ["img0", "img1", "img2"]
    assert source.class_pixels("img2") == {1: 3, 5: 2}
    mask = source.load_class_mask("img2", 5)
    assert mask[1, :2].tolist() == [1, 1] and (mask[2, :3] == 255).all() and mask[3, 0] == 255 and mask[0, 0] == 0
    assert source.fold_classes(0) == ([3, 4, 5], [1, 2])
    (tmp_path / "mine/val.txt").write_text("masks/img2.png\nimg0\n")
    assert FolderSource(tmp_path / "mine", val_list="val.txt").image_ids("val") == ["img2", "img0"]
    (tmp_path / "mine/val.txt").write_text("img2\nimg7\n")
    with pytest.raises(DataError, match=r"val.txt, line 2: 'img7'"):
        FolderSource(tmp_path / "mine", val_list="val.txt")


def test_generic_valued_classes_and_single_fold(tmp_path):
    root = write_generic(tmp_path / "valued", classes="5 car\n9 tree\n")
    source = FolderSource(root)
    assert source.class_names == {1: "car", 2: "tree"}
    assert source.class_pixels("img0") == {1: 2, 2: 3}  # value 1 is not listed: void
    assert source.load_class_mask("img0", 2)[2, :3].tolist() == [1, 1, 1]
    assert source.load_class_mask("img0", 2)[0, 0] == 255
    assert source.fold_classes(0) == ([], [1, 2])  # fewer than 4 classes: one test-only fold
    with pytest.raises(ValueError, match="valid folds are 0$"):
        source.fold_classes(1)
    (root / "classes.txt").write_text("5 car\ntree\n")
    with pytest.raises(DataError, match="mixes"):
        FolderSource(root)


def test_generic_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        FolderSource(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither images/"):
        FolderSource(tmp_path / "empty")
    root = write_generic(tmp_path / "mine")
    (root / "masks/img1.png").unlink()
    with pytest.raises(DataError, match="img1"):
        FolderSource(root)
    root = write_generic(tmp_path / "noclasses")
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match="classes.txt does not exist"):
        FolderSource(root)


@pytest.mark.slow
def test_weizmann_horse_binary(shared_data, tmp_path):
    root = tmp_path / "horses"  # the generic layout, linked to the real files (read in place)
    root.mkdir()
    (root / "images").symlink_to(shared_data / "weizmann_horse/gray")
    (root / "masks").symlink_to(shared_data / "weizmann_horse/figure_ground")
    (root / "classes.txt").write_text("horse\n")
    source = FolderSource(root, binary=True)
    ids = source.image_ids("val")
    assert len(ids) == 328 and ids[0] == "horse001"
    index = MaskIndex.load_or_build(source, "val", tmp_path / "cache")
    fractions = []
    for image_id in ids[::41]:
        mask = source.load_class_mask(image_id, 1)
        assert mask.shape == source.load_image(image_id).shape[:2] and set(np.unique(mask)) <= {0, 1}
        assert index.classes(image_id) == {1: int(mask.sum())}
        fractions.append(mask.mean())
    assert 0.1 < np.mean(fractions) < 0.45  # SOURCE.md: mean foreground fraction 0.25
    assert source.fold_classes(0) == ([], [1])


@pytest.mark.slow
def test_camvid_valued_classes(shared_data, tmp_path):
    camvid = shared_data / "camvid_segnet"
    root = tmp_path / "camvid"
    root.mkdir()
    (root / "images").symlink_to(camvid / "val")
    (root / "masks").symlink_to(camvid / "valannot")
    names = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
             "Bicyclist"]  # fmt: skip
    (root / "classes.txt").write_text("".join(f"{v} {n}\n" for v, n in enumerate(names)))  # 11 unlabelled: void
    source = FolderSource(root, val_list=str(camvid / "val.txt"))
    ids = source.image_ids("val")
    assert len(ids) == 101 and ids[0] == "0016E5_07959"
    label = np.asarray(Image.open(camvid / "valannot/0016E5_07959.png"))
    counts = source.class_pixels("0016E5_07959")
    assert counts == {v + 1: int((label == v).sum()) for v in range(11) if (label == v).any()}
    road = source.load_class_mask("0016E5_07959", 4)
    assert np.array_equal(road == 1, label == 3) and np.array_equal(road == 255, label == 11)
    assert [source.fold_classes(f)[1] for f in (0, 3)] == [[1, 2, 3], [10, 11]]


@pytest.mark.slow
def test_hsnet_fss_class_splits(shared_data, tmp_path):
    split_dir = shared_data / "splits/hsnet/fss"
    names = {k: split_dir.joinpath(f"{k}.txt").read_text().split() for k in ("trn", "val", "test")}
    every = [n for k in ("trn", "val", "test") for n in names[k]]
    assert len(set(every)) == 1000
    write_fss(tmp_path / "fss", classes=sorted(set(every)), images=1, side=8)  # one tiny image per class
    source = FolderSource(tmp_path / "fss", list_dir=str(split_dir), min_images=1)  # splits only: no episode drawn
    base, novel = source.fold_classes(0)
    assert len(base) == 520 and len(novel) == 240 and len(source.fold_classes(1)[1]) == 240
    assert {source.class_names[c] for c in novel} == set(names["test"])
    assert len(source.image_ids("trn")) == 520 and len(source.image_ids("val")) == 480

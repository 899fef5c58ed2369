"""List conventions (pfenet, bam, hsnet), novel_in_train, build_source; the published counts on the real masks."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import pytest

from episodes import lists
from episodes.base import DataError
from episodes.coco import CocoSource
from episodes.folder import FolderSource
from episodes.folds import coco_fold, pascal_fold
from episodes.index import MaskIndex
from episodes.pascal import PascalSource
from episodes.sources import SOURCES, SyntheticSource, build_source
from fewshot.config import CocoConfig, DataConfig


class DictSource:
    """An in-memory source: split -> image id -> {class: pixel count}."""

    name = "dict"
    parallel_scan = False
    num_folds = 4

    def __init__(self, root: Path, splits: dict[str, dict[str, dict[int, int]]], fold_fn=pascal_fold) -> None:
        self.root, self.splits, self.fold_fn = root, splits, fold_fn
        self.class_names = {c: f"class{c}" for c in range(1, 81)}

    def image_ids(self, split):
        return list(self.splits[split])

    def class_pixels(self, image_id):
        return next(s[image_id] for s in self.splits.values() if image_id in s)

    def fold_classes(self, fold):
        return self.fold_fn(fold)

    def fingerprint(self, split):
        return hashlib.sha1(json.dumps(self.splits[split], sort_keys=True).encode()).hexdigest()

    def load_image(self, image_id):  # not needed by the lists
        raise NotImplementedError

    load_class_mask = load_image


SPLITS = {
    "val": {"v1": {1: 5000, 7: 10}, "v2": {1: 2047, 2: 2048}, "v3": {16: 9000}, "v4": {2: 3000}},
    "trn": {"t1": {6: 4000}, "t2": {6: 4000, 3: 1}, "t3": {6: 100, 16: 5000}, "t4": {}, "t5": {20: 2048}},
}


@pytest.fixture
def source(tmp_path):
    return DictSource(tmp_path, SPLITS)


def data(tmp_path, **kw) -> DataConfig:
    return DataConfig(dataset="pascal", root=str(tmp_path), cache_dir=str(tmp_path / "cache"), **kw)


def test_pfenet_threshold_pairs(source, tmp_path):
    assert lists.eval_pairs(source, data(tmp_path)) == {1: ["v1"], 2: ["v2", "v4"], 3: [], 4: [], 5: []}
    assert lists.eval_pairs(source, data(tmp_path, min_pixels=1))[1] == ["v1", "v2"]
    assert lists.eval_pairs(source, data(tmp_path, fold=3)) == {16: ["v3"], 17: [], 18: [], 19: [], 20: []}
    assert lists.eval_pairs(source, data(tmp_path, split="trn", fold=3))[16] == ["t3"]
    train = lists.train_pairs(source, data(tmp_path))
    assert list(train) == pascal_fold(0)[0] and train[6] == ["t1", "t2"] and train[16] == ["t3"]
    assert train[20] == ["t5"]


def test_novel_in_train_and_bam(source, tmp_path):
    dropped = lists.train_pairs(source, data(tmp_path, novel_in_train="drop"))
    assert dropped[6] == ["t1"]  # t2 holds one pixel of novel class 3
    assert lists.train_pairs(source, data(tmp_path, lists="bam")) == dropped  # bam always drops
    assert lists.eval_pairs(source, data(tmp_path, lists="bam")) == lists.eval_pairs(source, data(tmp_path))
    with pytest.raises(ValueError, match="pfenet, bam, hsnet"):
        lists.eval_pairs(source, data(tmp_path, lists="oslsm"))
    with pytest.raises(ValueError, match="background, drop"):
        lists.train_pairs(source, data(tmp_path, novel_in_train="keep"))


def write_hsnet(list_dir: Path) -> Path:
    (list_dir / "val").mkdir(parents=True)
    (list_dir / "trn").mkdir()
    (list_dir / "val/fold0.txt").write_text("v2__02\nv1__01\nv2__01\nv2__02\n")
    for fold, lines in enumerate(["t2__03\n", "t1__06\nt2__06\nt3__07\n", "t4__11\n", "t3__16\n"]):
        (list_dir / f"trn/fold{fold}.txt").write_text(lines)
    return list_dir


def test_hsnet_files(source, tmp_path):
    cfg = data(tmp_path, lists="hsnet", list_dir=str(write_hsnet(tmp_path / "hsnet")))
    assert lists.eval_pairs(source, cfg) == {1: ["v1", "v2"], 2: ["v2"], 3: [], 4: [], 5: []}  # file order, once
    train = lists.train_pairs(source, cfg)  # fold 0 trains on trn/fold1..3
    assert train[6] == ["t1", "t2"] and train[7] == ["t3"] and train[11] == ["t4"] and train[16] == ["t3"]
    assert "t2" not in train.get(3, [])
    dropped = lists.train_pairs(source, data(tmp_path, lists="hsnet", list_dir=cfg.list_dir, novel_in_train="drop"))
    assert dropped[6] == ["t1"] and dropped[16] == ["t3"]
    assert lists.eval_pairs(source, data(tmp_path, lists="hsnet", list_dir=cfg.list_dir, split="trn", fold=1)) == {
        6: ["t1", "t2"], 7: ["t3"], 8: [], 9: [], 10: []}  # fmt: skip


def test_hsnet_errors(source, tmp_path):
    list_dir = write_hsnet(tmp_path / "hsnet")
    with pytest.raises(ValueError, match="set data.list_dir"):
        lists.eval_pairs(source, data(tmp_path, lists="hsnet"))
    with pytest.raises(DataError, match=r"val/fold1.txt.*do not exist"):
        lists.eval_pairs(source, data(tmp_path, lists="hsnet", list_dir=str(list_dir), fold=1))
    (list_dir / "val/fold0.txt").write_text("v1__01\nv2-02\n")
    with pytest.raises(DataError, match=r"fold0.txt, line 2: 'v2-02'"):
        lists.eval_pairs(source, data(tmp_path, lists="hsnet", list_dir=str(list_dir)))
    (list_dir / "val/fold0.txt").write_text("v1__01\nv2__07\n")
    with pytest.raises(DataError, match=r"entry 2: class 7 is not a novel class of fold 0"):
        lists.eval_pairs(source, data(tmp_path, lists="hsnet", list_dir=str(list_dir)))
    (list_dir / "val/fold0.txt").write_text("v9__01\n")
    with pytest.raises(DataError, match=r"image 'v9' is not in the dict 'val' id list"):
        lists.eval_pairs(source, data(tmp_path, lists="hsnet", list_dir=str(list_dir)))


def test_hsnet_coco_json(tmp_path):
    base, novel = coco_fold(2)
    files = {
        "val": {str(c - 1): [f"val2014/COCO_val2014_{c:012d}.jpg"] for c in novel} | {str(base[0] - 1): []},
        "trn": {str(c - 1): [f"train2014/COCO_train2014_{c:012d}.jpg"] for c in base} | {str(novel[0] - 1): []},
    }
    for split, table in files.items():  # as HSNet's pickles: every class a key, the other folds' lists empty
        (tmp_path / "hsnet" / split).mkdir(parents=True)
        with gzip.open(tmp_path / f"hsnet/{split}/fold2.json.gz", "wt") as f:
            json.dump(table, f)
    splits = {"val": {f"COCO_val2014_{c:012d}": {c: 9999} for c in novel},
              "trn": {f"COCO_train2014_{c:012d}": {c: 9999} for c in base}}  # fmt: skip
    source = DictSource(tmp_path, splits, fold_fn=coco_fold)
    cfg = data(tmp_path, lists="hsnet", list_dir=str(tmp_path / "hsnet"), fold=2)
    assert lists.eval_pairs(source, cfg) == {c: [f"COCO_val2014_{c:012d}"] for c in novel}
    assert lists.train_pairs(source, cfg) == {c: [f"COCO_train2014_{c:012d}"] for c in base}  # fold2 file, no other


def test_hsnet_coco_pickles_are_read_without_running_code(tmp_path):
    """HSNet ships its COCO lists as pickles ({int: [paths]}): read as they are, and a pickle naming any callable,
    the only way a pickle runs code, is refused."""
    _, novel = coco_fold(1)
    (tmp_path / "hsnet/val").mkdir(parents=True)
    table = {c - 1: [f"val2014/COCO_val2014_{c:012d}.jpg", f"val2014/COCO_val2014_{c + 100:012d}.jpg"] for c in novel}
    (tmp_path / "hsnet/val/fold1.pkl").write_bytes(pickle.dumps(table))
    splits = {"val": {Path(p).stem: {} for paths in table.values() for p in paths}, "trn": {}}
    source = DictSource(tmp_path, splits, fold_fn=coco_fold)
    cfg = data(tmp_path, lists="hsnet", list_dir=str(tmp_path / "hsnet"), fold=1)
    assert lists.eval_pairs(source, cfg) == {c: [Path(p).stem for p in table[c - 1]] for c in novel}
    assert lists.read_hsnet_entries(tmp_path / "hsnet", "val", 1, 4)[:2] == [(Path(p).stem, 2) for p in table[1]]
    (tmp_path / "hsnet/val/fold1.pkl").write_bytes(pickle.dumps({0: [os.getcwd]}))
    with pytest.raises(DataError, match=r"fold1.pkl cannot be read \(it names \w+\.getcwd; an HSNet list holds"):
        lists.eval_pairs(source, cfg)


def test_build_source(tmp_path):
    with pytest.raises(KeyError, match=re.escape(f"choose from {sorted(SOURCES)}")):
        build_source(DataConfig(dataset="voc"))
    cfg = DataConfig(dataset="synthetic", root=str(tmp_path / "syn"))
    cfg.synthetic.images, cfg.synthetic.size = 10, 32
    source = build_source(cfg)  # generates the data: PASCAL layout, synthetic class names
    assert isinstance(source, SyntheticSource) and source.name == "synthetic"
    assert source.class_names[1] != "aeroplane" and len(source.class_names) == 20
    assert len(source.image_ids("trn")) + len(source.image_ids("val")) == 10
    assert build_source(cfg).image_ids("val") == source.image_ids("val")  # second call reuses the data
    pairs = lists.eval_pairs(source, DataConfig(dataset="synthetic", root=cfg.root, min_pixels=1))
    assert sorted(pairs) == [1, 2, 3, 4, 5] and all(set(v) <= set(source.image_ids("val")) for v in pairs.values())
    pascal = build_source(DataConfig(dataset="pascal", root=cfg.root, val_list="ImageSets/Segmentation/train_aug.txt"))
    assert isinstance(pascal, PascalSource) and pascal.image_ids("val") == source.image_ids("trn")
    coco_cfg = CocoConfig(crowd="background", split="consecutive")
    coco = build_source(DataConfig(dataset="coco", root=cfg.root, coco=coco_cfg))
    assert isinstance(coco, CocoSource) and coco.crowd == "background" and coco.fold_classes(0)[1] == [*range(1, 21)]
    (tmp_path / "fss/a").mkdir(parents=True)
    for name in ("1.jpg", "1.png", "2.jpg", "2.png"):  # shots + 1 = 2 pairs, the fewest a class folder may hold
        (tmp_path / "fss/a" / name).write_bytes(b"")
    assert isinstance(build_source(DataConfig(dataset="folder", root=str(tmp_path / "fss"))), FolderSource)


# ------------------------------------------------------------------------------------------------------------------
# The published counts, on the real masks and lists in ../shared/data.


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """The same folder as test_index's: the real masks are scanned once per pytest session."""
    return tmp_path_factory.getbasetemp() / "fewshot_real_cache"


def real_pascal(shared_data, train_list: str) -> PascalSource:
    return PascalSource(shared_data / "voc2012_segclassaug", train_list=str(shared_data / train_list),
                        val_list=str(shared_data / "splits/pfenet/pascal/val.txt"))  # fmt: skip


def count(pairs: dict[int, list[str]]) -> int:
    return sum(len(v) for v in pairs.values())


@pytest.mark.slow
def test_real_pfenet_and_hsnet_val_pairs(shared_data, shared_cache):
    source = real_pascal(shared_data, "voc2012_segclassaug/train_aug_list_from_repo.txt")
    hsnet_dir = str(shared_data / "splits/hsnet/pascal")
    pfenet, hsnet, pool = [], [], []
    for fold in range(4):
        pfenet.append(count(lists.eval_pairs(source, DataConfig(fold=fold, cache_dir=str(shared_cache)))))
        cfg = DataConfig(fold=fold, lists="hsnet", list_dir=hsnet_dir, cache_dir=str(shared_cache))
        hsnet_pairs = lists.eval_pairs(source, cfg)
        hsnet.append(count(hsnet_pairs))
        index = MaskIndex.load_or_build(source, "val", shared_cache)
        assert all(c in index.classes(i) for c, ids in hsnet_pairs.items() for i in ids)  # a subset of present pairs
        pool.append(count(lists.train_pairs(source, cfg)))
    assert pfenet == [365, 467, 734, 357]
    assert hsnet == [346, 451, 725, 346]
    lines = [2286, 3425, 5883, 2086]  # trn/fold{k}.txt, no repeated pairs: fold f trains on the other three
    assert pool == [sum(lines) - n for n in lines]


@pytest.mark.slow
def test_real_bam_training_pool(shared_data, shared_cache):
    source = real_pascal(shared_data, "splits/pfenet/pascal/voc_sbd_merge_noduplicate.txt")
    assert len(source.image_ids("trn")) == 5953
    pools = []
    for fold in range(4):
        pairs = lists.train_pairs(source, DataConfig(fold=fold, lists="bam", cache_dir=str(shared_cache)))
        pools.append(len({i for ids in pairs.values() for i in ids}))
    assert pools == [4208, 3726, 2752, 4510]


@pytest.mark.slow
def test_real_hsnet_coco_lists(shared_data, tmp_path):
    list_dir = shared_data / "splits/hsnet/coco"
    with gzip.open(list_dir / "val/fold0.json.gz", "rt") as f:
        table = json.load(f)
    ids = {Path(p).stem for paths in table.values() for p in paths}
    source = DictSource(tmp_path, {"val": dict.fromkeys(ids, {}), "trn": {}}, fold_fn=coco_fold)
    pairs = lists.eval_pairs(source, DataConfig(lists="hsnet", list_dir=str(list_dir), cache_dir=str(tmp_path)))
    assert sorted(pairs) == coco_fold(0)[1]  # HSNet's 0-based class index k is class id k + 1, interleaved
    assert count(pairs) == 35783 and len({i for v in pairs.values() for i in v}) == 26052
    assert pairs[1][0] == "COCO_val2014_000000429717"

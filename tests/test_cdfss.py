"""Folds belong to the source; the cross-domain benchmark of PATNet and DMTNet end to end (configs, sampling, training
on one dataset and testing on another, the protocol record, the table in the published layout)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from cdfss_data import make_chest_xray, make_deepglobe_binary, make_fss1000, make_isic

import episodes
from episodes.chest_xray import ChestXraySource
from episodes.coco import CocoSource
from episodes.deepglobe import DeepglobeSource
from episodes.folder import FolderSource, Fss1000Source
from episodes.isic import IsicSource
from episodes.pascal import PascalSource
from episodes.sampler import make_test_episodes
from fewshot import table_formats, tables
from fewshot.config import DataConfig, load_config
from fewshot.provenance import query_order
from tools import make_table, test_fold, train_fold

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("deepglobe", "isic", "chest_xray", "fss1000")


def generic_folder(root: Path, classes: int) -> Path:
    from cdfss_data import save

    for i in range(4):
        save(np.full((8, 8, 3), 99, np.uint8), root / "images" / f"im{i}.png")
        save(np.full((8, 8), i % classes + 1, np.uint8), root / "masks" / f"im{i}.png")
    (root / "classes.txt").write_text("\n".join(f"c{k}" for k in range(classes)) + "\n")
    return root


# --------------------------------------------------------------------------------------------------------------------
# Folds belong to the source.


def test_fold_counts_come_from_the_sources(tmp_path):
    (tmp_path / "voc").mkdir()
    assert PascalSource(tmp_path / "voc").num_folds == 4 and CocoSource(tmp_path / "voc").num_folds == 4
    assert FolderSource(generic_folder(tmp_path / "f5", 5)).num_folds == 4  # the PASCAL-5i default
    assert FolderSource(generic_folder(tmp_path / "f5b", 5), folds=2).num_folds == 2
    assert FolderSource(generic_folder(tmp_path / "f5c", 5), folds=2).fold_classes(1) == ([1, 2, 3], [4, 5])
    assert FolderSource(generic_folder(tmp_path / "f3", 3)).num_folds == 1  # fewer classes than folds: test-only
    make_fss1000(tmp_path / "fss", tmp_path / "splits", {"trn": 2, "val": 1, "test": 1}, images=3)
    assert FolderSource(tmp_path / "fss", str(tmp_path / "splits")).num_folds == 2  # test and val classes
    make_deepglobe_binary(tmp_path / "dg", "patnet")
    make_isic(tmp_path / "isic", "sorted")
    make_chest_xray(tmp_path / "lung")
    targets = [DeepglobeSource(tmp_path / "dg"), IsicSource(tmp_path / "isic"), ChestXraySource(tmp_path / "lung"),
               Fss1000Source(tmp_path / "fss", str(tmp_path / "splits"))]  # fmt: skip
    assert [s.num_folds for s in targets] == [1, 1, 1, 1]
    assert [len(s.fold_classes(0)[1]) for s in targets] == [6, 3, 1, 1]
    assert all(s.fold_classes(0)[0] == [] for s in targets[:3])  # test-only: no base class


def test_out_of_range_fold_is_refused_naming_the_valid_ones(tmp_path):
    (tmp_path / "voc").mkdir()
    with pytest.raises(ValueError, match=r"data.fold=4 does not exist for PASCAL-5i: .* valid folds are 0, 1, 2, 3"):
        PascalSource(tmp_path / "voc").fold_classes(4)
    make_isic(tmp_path / "isic", "sorted")
    with pytest.raises(ValueError, match=r"fold=1 does not exist for isic: it has 1 fold\(s\), valid folds are 0$"):
        IsicSource(tmp_path / "isic").fold_classes(1)
    with pytest.raises(ValueError, match=r"folder dataset .*f5.*valid folds are 0, 1$"):
        FolderSource(generic_folder(tmp_path / "f5", 5), folds=2).fold_classes(2)
    target = DataConfig(dataset="pascal", root=str(tmp_path / "voc"), fold=1)
    target.target.dataset, target.target.root = "isic", str(tmp_path / "isic")
    with pytest.raises(ValueError, match=r"does not exist for isic.*valid folds are 0"):
        episodes.validate_fold(target)  # data.fold is the evaluated (target) dataset's fold
    target.fold = 0
    episodes.validate_fold(target)


def test_training_refuses_a_bad_fold_before_writing_the_run_dir(tmp_path, capsys):
    make_isic(tmp_path / "isic", "sorted")
    run_dir = tmp_path / "run"
    overrides = [f"data.root={tmp_path / 'syn'}", "data.synthetic.images=10", "data.synthetic.size=32",
                 "data.target.dataset=isic", f"data.target.root={tmp_path / 'isic'}", "data.fold=2",
                 f"run.dir={run_dir}", "device=cpu"]  # fmt: skip
    assert train_fold.main([str(REPO / "configs" / "demo.yaml"), *overrides]) == 2
    assert not run_dir.exists()


# --------------------------------------------------------------------------------------------------------------------
# Sampling as published.


def test_class_cycle_gives_every_class_its_share():
    pairs = {1: ["a", "b", "c"], 2: ["d", "e"], 3: ["f", "g", "h", "i"]}
    eps = make_test_episodes(pairs, 1200, 1, 0, "class_cycle")
    assert [e.class_id for e in eps[:6]] == [1, 2, 3, 1, 2, 3]  # episode n is of class n mod C (PATNet)
    assert Counter(e.class_id for e in eps) == {1: 400, 2: 400, 3: 400}
    assert all(e.query in pairs[e.class_id] and e.query not in e.supports for e in eps)
    assert len({e.query for e in eps if e.class_id == 3}) == 4  # the query is drawn among the class's images


def test_independent_support_draws_repeat_but_never_take_the_query():
    pairs = {1: [f"i{k}" for k in range(4)]}
    independent = make_test_episodes(pairs, 300, 5, 0, "walk", support_draw="independent")
    assert all(e.query not in e.supports and len(e.supports) == 5 for e in independent)
    assert all(len(set(e.supports)) < 5 for e in independent)  # 5 draws from 3 images always repeat one
    distinct = make_test_episodes({1: [f"i{k}" for k in range(9)]}, 50, 5, 0, "walk")
    assert all(len(set(e.supports)) == 5 for e in distinct)
    with pytest.raises(ValueError, match="support_draw"):
        make_test_episodes(pairs, 1, 1, 0, "walk", support_draw="replace")


def test_configs_hold_the_published_protocol():
    """configs/cdfss_*.yaml against the numbers of PATNet's and DMTNet's loaders (see README, Data)."""
    published = {"deepglobe": 1200, "isic": 1200, "chest_xray": 1200, "fss1000": 2400}
    for target, count in published.items():
        cfg = load_config(REPO / "configs" / f"cdfss_{target}_transformer_resnet50.yaml")
        data = cfg.data
        assert (data.dataset, data.target.dataset, data.fold, data.episodes) == ("pascal", target, 0, count)
        assert data.seeds == [0, 1, 2, 3, 4] and data.support_draw == "independent"
        assert (data.image_size, data.resize, data.eval_resolution) == (400, "square", "resized")
        backbone = cfg.model.backbone
        assert (data.lists, backbone.name, backbone.pretrained) == ("hsnet", "timm:resnet50", "tv_in1k")
        assert query_order(target) == ("walk" if target == "fss1000" else "class_cycle")
    train = load_config(REPO / "configs" / "cdfss_pascal_transformer_resnet50.yaml")
    assert (train.data.target.dataset, train.data.fss1000.classes, train.train.val_episodes) == ("fss1000", "val", 2400)
    fss = load_config(REPO / "configs" / "cdfss_fss1000_transformer_resnet50.yaml")
    assert fss.data.fss1000.classes == "test" and fss.data.fss1000.splits


def test_published_fold_counts_are_the_sources(tmp_path):
    counts = yaml.safe_load((REPO / "configs" / "published.yaml").read_text())["num_folds"]
    make_fss1000(tmp_path / "fss", tmp_path / "splits", {"trn": 1, "val": 1, "test": 1}, images=2)
    sources = {"pascal": PascalSource, "coco": CocoSource, "deepglobe": DeepglobeSource, "isic": IsicSource,
               "chest_xray": ChestXraySource}  # fmt: skip
    assert {d: sources[d].num_folds for d in sources} == {d: counts[d] for d in sources}
    assert counts["fss1000"] == Fss1000Source(tmp_path / "fss", str(tmp_path / "splits")).num_folds
    cdfss = [p for p in tables.load_published(REPO / "configs" / "published.yaml") if p.dataset in TARGETS]
    assert {p.name for p in cdfss} == {"PATNet", "DMTNet"} and all(len(p.folds) == 1 for p in cdfss)
    assert {(p.dataset, p.protocol["episodes"]) for p in cdfss} == {("deepglobe", 1200), ("isic", 1200),
                                                                   ("chest_xray", 1200), ("fss1000", 2400)}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# End to end on fixture data: train on one dataset (the synthetic VOC-layout set), test on the four targets.


@pytest.fixture(scope="module")
def cross_domain(tmp_path_factory):
    root = tmp_path_factory.mktemp("cdfss")
    make_deepglobe_binary(root / "Deepglobe", "patnet")
    make_isic(root / "ISIC", "flat")
    make_chest_xray(root / "LungSegmentation")
    make_fss1000(root / "FSS-1000", root / "splits", {"trn": 2, "val": 2, "test": 2}, images=4)
    config = root / "cdfss.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": "synthetic", "root": str(root / "syn"), "image_size": 32, "num_workers": 0,
                 "min_pixels": 16, "episodes": 6, "seeds": [0, 1],
                 "support_draw": "independent", "synthetic": {"images": 40, "size": 32},
                 "target": {"dataset": "fss1000", "root": str(root / "FSS-1000")},
                 "fss1000": {"splits": str(root / "splits"), "classes": "val"}},
        "model": {"backbone": {"name": "timm:vit_tiny_patch16_224", "pretrained": "none", "layers": [1, 2]}},
        "train": {"max_iters": 2, "batch_size": 2, "val_every": 2, "val_episodes": 4, "checkpoint_every": 2,
                  "amp": "none"},
        "eval": {"amp": "none"}, "cache": {"features": "off"}, "run": {"dir": str(root / "run")}, "device": "cpu",
    }))  # fmt: skip
    assert train_fold.main([str(config)]) == 0
    roots = {"deepglobe": "Deepglobe", "isic": "ISIC", "chest_xray": "LungSegmentation", "fss1000": "FSS-1000"}
    for target, folder in roots.items():
        overrides = [f"data.target.dataset={target}", f"data.target.root={root / folder}", "data.fss1000.classes=test"]
        out = root / "results" / target
        args = [str(config), *overrides, "--checkpoint", str(root / "run" / "best.safetensors"), "--shots", "1", "5"]
        assert test_fold.main([*args, "--out", str(out)]) == 0
    return root, config


def test_cross_domain_runs_record_both_datasets(cross_domain):
    root, config = cross_domain
    for target in TARGETS:
        for shots in (1, 5):
            results = json.loads((root / "results" / target / f"fold0_{shots}shot.json").read_text())
            proto = results["protocol"]
            assert (proto["dataset"], proto["num_folds"], proto["fold"]) == (target, 1, 0)
            assert (proto["trained_dataset"], proto["trained_fold"]) == ("synthetic", "all")  # every class trained
            assert proto["query_order"] == query_order(target) and proto["support_draw"] == "independent"
            assert 0.0 <= results["miou"] <= 100.0 and len(results["seeds"]) == 2
    trained = json.loads((root / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert trained["split"] == "val_untrained"  # validated on FSS-1000's val classes, not on the training set
    cfg = load_config(config, ["data.target.dataset=deepglobe", f"data.target.root={root / 'Deepglobe'}"])
    dataset = episodes.build_test_dataset(cfg.data)
    assert [e.class_id for e in dataset.episodes] == [1, 2, 3, 4, 5, 6]  # class_cycle over Deepglobe's six
    assert dataset.source.name == "deepglobe"


def test_cross_domain_table_in_the_published_layout(cross_domain, capsys):
    root, _ = cross_domain
    published = REPO / "configs" / "published.yaml"
    args = [str(root / "results"), "--published", str(published), "--published-only", "PATNet", "DMTNet"]
    assert make_table.main(args) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| Method"))
    names = ["Deepglobe", "ISIC2018", "Chest X-ray", "FSS-1000", "mean"]
    assert header.split(" | ")[1:6] == [f"1-shot {n}" for n in names] and "FB-IoU" not in header
    row = next(line for line in out.splitlines() if line.startswith("| prototype_vit_tiny"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    values = [float(c) for c in cells[:4]]
    assert float(cells[4]) == pytest.approx(sum(values) / 4, abs=0.06)  # the mean of the four targets
    assert "query_order=class_cycle|class_cycle|class_cycle|walk" in out  # per column; the common episodes=6 once
    assert "episodes=6," in out and "episodes=1200\\|1200\\|1200\\|2400]" in out  # the published row's own counts


# --------------------------------------------------------------------------------------------------------------------
# Tables by hand-made results files: one-fold datasets, a benchmark, two and four folds.


def write(root: Path, method: str, dataset: str, fold: int, shots: int, miou: float, num_folds: int, **proto) -> None:
    protocol = {"dataset": dataset, "fold": fold, "num_folds": num_folds, "shots": shots, "ways": 1, "split": "val",
                "lists": "hsnet", "episodes": 1200, "seeds": [0], "min_pixels": 2048, "coco_split": "interleaved",
                "novel_in_train": "background", "resize": "square", "image_size": 400, "eval_resolution": "resized",
                "pretrained": "tv_in1k", "backbone": "timm:resnet50", "head": "transformer", "model": method,
                **proto}  # fmt: skip
    path = root / method / dataset / f"fold{fold}_{shots}shot.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"miou": miou, "fbiou": miou + 10, "method": method, "protocol": protocol}))


def rows(text: str) -> dict[str, dict[str, str]]:
    out, header = {}, []
    for line in text.splitlines():
        if line.startswith("| Method"):
            header = [c.strip() for c in line.strip("|").split("|")]
        elif line.startswith("| ") and header:
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = dict(zip(header, cells, strict=True))
    return out


def test_benchmark_mean_needs_every_target_and_episodes_may_differ(tmp_path):
    numbers = {"deepglobe": 40.0, "isic": 50.0, "chest_xray": 70.0, "fss1000": 81.0}
    for dataset, miou in numbers.items():
        episodes_of = 2400 if dataset == "fss1000" else 1200
        write(tmp_path, "m", dataset, 0, 1, miou, 1, episodes=episodes_of, trained_dataset="pascal")
        if dataset != "chest_xray":
            write(tmp_path, "m", dataset, 0, 5, miou + 1, 1, episodes=episodes_of, trained_dataset="pascal")
    built = tables.build_tables([tables.load_result(p) for p in tables.find_results([tmp_path])])
    assert [t.key for t in built] == ["cdfss"]
    row = rows(table_formats.render(built))["m"]
    assert [row[f"1-shot {n}"] for n in ("Deepglobe", "ISIC2018", "Chest X-ray", "FSS-1000")] == [
        "40.0", "50.0", "70.0", "81.0"]  # fmt: skip
    assert row["1-shot mean"] == "60.2" and row["5-shot mean"] == "-" and row["5-shot Chest X-ray"] == "-"
    assert built[0].per_column["episodes"] == ["1200", "1200", "1200", "2400"]
    write(tmp_path, "m", "isic", 0, 1, 50.0, 1, image_size=384, trained_dataset="pascal")
    with pytest.raises(tables.TableError, match="differing fields: image_size"):
        tables.build_tables([tables.load_result(p) for p in tables.find_results([tmp_path])])
    write(tmp_path, "m", "isic", 0, 1, 50.0, 1, support_draw="independent", trained_dataset="pascal")
    with pytest.raises(tables.TableError, match="support_draw: distinct .*; independent"):  # absent = distinct
        tables.build_tables([tables.load_result(p) for p in tables.find_results([tmp_path])])
    write(tmp_path, "m", "isic", 0, 1, 50.0, 1, episodes=2400, trained_dataset="pascal")
    with pytest.raises(tables.TableError, match=r"\(ISIC2018\) table; differing fields: episodes"):
        tables.build_tables([tables.load_result(p) for p in tables.find_results([tmp_path])])


def test_one_fold_dataset_cell_is_its_number(tmp_path):
    write(tmp_path, "m", "folder", 0, 1, 44.4, 1)
    built = tables.build_tables([tables.load_result(p) for p in tables.find_results([tmp_path])])
    text = table_formats.render(built)
    assert rows(text)["m"] == {"Method": "m", "1-shot mIoU": "44.4", "1-shot FB-IoU": "54.4"}
    assert "mean of" not in text.splitlines()[0]
    csv_text = table_formats.render(built, "csv")
    assert "1shot_miou" in csv_text.splitlines()[0] and ",44.4,54.4," in csv_text


def test_two_and_four_fold_means(tmp_path):
    write(tmp_path / "two", "m", "folder", 0, 1, 30.0, 2)
    built = tables.build_tables([tables.load_result(p) for p in tables.find_results([tmp_path / "two"])])
    assert rows(table_formats.render(built))["m"]["1-shot mean"] == "-"  # fold 1 missing
    write(tmp_path / "two", "m", "folder", 1, 1, 40.0, 2)
    built = tables.build_tables([tables.load_result(p) for p in tables.find_results([tmp_path / "two"])])
    row = rows(table_formats.render(built))["m"]
    assert (row["1-shot fold 1"], row["1-shot mean"]) == ("40.0", "35.0") and "1-shot fold 2" not in row
    for fold in range(3):
        write(tmp_path / "four", "m", "pascal", fold, 1, 50.0 + fold, 4)
    four = [tables.load_result(p) for p in tables.find_results([tmp_path / "four"])]
    assert rows(table_formats.render(tables.build_tables(four)))["m"]["1-shot mean"] == "-"
    write(tmp_path / "four", "m", "pascal", 3, 1, 53.0, 4)
    four = [tables.load_result(p) for p in tables.find_results([tmp_path / "four"])]
    assert rows(table_formats.render(tables.build_tables(four)))["m"]["1-shot mean"] == "51.5"


def test_results_must_record_their_fold_count(tmp_path):
    write(tmp_path, "m", "pascal", 4, 1, 50.0, 4)
    with pytest.raises(tables.TableError, match="protocol.fold=4 does not exist for 4 fold"):
        tables.load_result(next(tmp_path.rglob("*.json")))
    path = next(tmp_path.rglob("*.json"))
    data = json.loads(path.read_text())
    del data["protocol"]["num_folds"]
    path.write_text(json.dumps(data))
    with pytest.raises(tables.TableError, match="missing protocol.num_folds"):
        tables.load_result(path)

"""Zero-shot benchmarks: the eight dataset readers on MMSegmentation-layout fixtures, their label rules, the
whole-dataset IoU against an independent recomputation, bad input, the tool and the eight-column table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.zeroshot.benchmarks import BENCHMARKS, BenchmarkDataset, BenchmarkError, SemanticIoU, get_benchmark
from fewshot.zeroshot.benchmarks.datasets import coco_object_from_stuff, reduce_zero_label
from fewshot.zeroshot.benchmarks.table import build_rows, render

rng = np.random.default_rng(0)


def write_pair(root: Path, image: str, label: str, values: np.ndarray, palette: bool = False) -> None:
    (root / image).parent.mkdir(parents=True, exist_ok=True)
    (root / label).parent.mkdir(parents=True, exist_ok=True)
    h, w = values.shape
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / image)
    png = Image.fromarray(values.astype(np.uint8))
    if palette:  # VOC stores palette PNGs: the pixel values are the class ids
        png = png.convert("P")
        png.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    png.save(root / label)


def make_layout(root: Path, name: str, labels: list[np.ndarray]) -> Path:
    """A benchmark's folder with one image per label, in its MMSegmentation layout."""
    b = get_benchmark(name)
    ids = [f"city{i % 2}/img{i}" if name == "cityscapes" else f"img{i}" for i in range(len(labels))]
    for i, values in zip(ids, labels, strict=True):
        write_pair(root, f"{b.image_dir}/{i}{b.image_suffix}", f"{b.label_dir}/{i}{b.label_suffix}", values, True)
    if b.split_file:
        (root / b.split_file).parent.mkdir(parents=True, exist_ok=True)
        (root / b.split_file).write_text("\n".join(ids) + "\n")
    return root


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_each_benchmark_reads_its_layout(tmp_path, name):
    b = get_benchmark(name)
    top = b.num_classes - 1 + (1 if b.reduce_zero else 0)  # the largest stored class id
    labels = [np.array([[0, 1, top], [255, 1, 0]]), np.array([[top, top], [0, 255], [1, 1]])]
    data = BenchmarkDataset(name, make_layout(tmp_path, name, labels))
    assert len(data) == 2 and len(b.class_names()) == b.num_classes
    for (image, label, _), stored in zip(data, labels, strict=True):
        assert image.dtype == torch.uint8 and image.shape == (3, *stored.shape)
        want = b.convert(stored) if b.convert else stored
        want = reduce_zero_label(want) if b.reduce_zero else want
        assert torch.equal(label, torch.from_numpy(want))
    if name == "cityscapes":  # labels are found in every city folder
        assert [i for i, _, _ in data.items] == ["city0/img0", "city1/img1"]


def test_label_rules_by_hand():
    stored = np.array([0, 1, 20, 255])
    assert reduce_zero_label(stored).tolist() == [255, 0, 19, 255]
    stuff = np.array([0, 79, 80, 170, 255])  # person, toothbrush, banner, wood, unlabelled
    assert coco_object_from_stuff(stuff).tolist() == [1, 80, 0, 0, 0]  # GroupViT: unlabelled becomes background


def test_coco_object_reads_converted_labels_as_stored(tmp_path):
    root = make_layout(tmp_path, "coco_stuff", [np.array([[0, 90]])])
    converted = np.array([[7, 0]])
    Image.fromarray(converted.astype(np.uint8)).save(root / "annotations/val2017/img0_instanceTrainIds.png")
    _, label, _ = BenchmarkDataset("coco_object", root)[0]
    assert label.tolist() == converted.tolist()


def test_bad_input_names_the_file(tmp_path):
    with pytest.raises(KeyError, match="did you mean 'voc21'"):
        get_benchmark("voc12")
    assert get_benchmark("PC59").name == "context59" and get_benchmark("ade").name == "ade20k"
    with pytest.raises(BenchmarkError, match=r"JPEGImages does not exist; voc21 expects"):
        BenchmarkDataset("voc21", tmp_path)
    root = make_layout(tmp_path / "voc", "voc21", [np.array([[0, 1]]), np.array([[2, 3]])])
    (root / "JPEGImages/img1.jpg").unlink()
    with pytest.raises(BenchmarkError, match=r"image .*img1.jpg for label .*img1.png does not exist"):
        BenchmarkDataset("voc21", root)
    root = make_layout(tmp_path / "bad", "voc21", [np.array([[0, 21]])])
    with pytest.raises(BenchmarkError, match=r"img0.png holds values \[21\] outside voc21's classes 0..20"):
        BenchmarkDataset("voc21", root)[0]
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    with pytest.raises(BenchmarkError, match=r"names.txt has 2 classes, but voc20 has 20"):
        get_benchmark("voc20").class_names(names)
    (tmp_path / "voc/ImageSets/Segmentation/val.txt").write_text("\n")
    with pytest.raises(BenchmarkError, match="val.txt is empty"):
        BenchmarkDataset("voc21", tmp_path / "voc")


def reference_miou(preds: list[np.ndarray], labels: list[np.ndarray], n: int) -> tuple[float, list[float]]:
    """The standard metric from a summed confusion matrix (void 255 left out), nan-mean over classes."""
    confusion = np.zeros((n, n))
    for p, t in zip(preds, labels, strict=True):
        keep = t != 255
        np.add.at(confusion, (t[keep], p[keep]), 1)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return float(np.nanmean(iou) * 100), (iou * 100).tolist()


def test_metric_equals_an_independent_recomputation():
    n = 6
    labels = [rng.integers(0, 4, (7, 9)), rng.integers(0, 4, (5, 5))]  # classes 4 and 5 never labelled
    labels[0][0, :4] = 255
    preds = [rng.integers(0, 5, t.shape) for t in labels]  # class 4 predicted though absent: IoU 0; class 5: none
    metric = SemanticIoU([f"c{i}" for i in range(n)])
    for p, t in zip(preds, labels, strict=True):
        metric.update(torch.from_numpy(p), torch.from_numpy(t))
    got = metric.compute()
    miou, iou = reference_miou(preds, labels, n)
    assert got["miou"] == pytest.approx(miou)
    assert got["iou/c4"] == 0.0 and got["iou/c5"] is None
    assert [got[f"iou/c{i}"] for i in range(5)] == pytest.approx(iou[:5])
    assert metric.absent_classes() == ["c4", "c5"]


def test_metric_by_hand_with_void_and_reduced_zero():
    """VOC20-style: stored 0 becomes void. Each class: intersection 1, union 3 -> mIoU 33.3."""
    label = torch.from_numpy(reduce_zero_label(np.array([[0, 1, 1], [2, 2, 0]])))  # [[255, 0, 0], [1, 1, 255]]
    pred = torch.tensor([[1, 0, 1], [1, 0, 0]])  # the void pixels' predictions do not count
    metric = SemanticIoU(["a", "b"])
    metric.update(pred, label)
    assert metric.compute()["miou"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="outside 0..1"):
        metric.update(torch.tensor([[2]]), torch.tensor([[0]]))


def fake_results(tmp_path: Path, preset: str, bench: str, miou: float, limit: bool = False) -> Path:
    method = preset.split("/")[0]
    record = {
        "metrics": {"miou": miou},
        "protocol": {"task": "zero_shot_benchmark", "benchmark": bench, "preset": preset, "limit": limit,
                     "settings": {"method": method}, "backbone": "open_clip:ViT-B-16", "pretrained": "openai"},
    }  # fmt: skip
    path = tmp_path / preset.replace("/", "_") / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    return path


def test_table_has_eight_columns_and_an_average(tmp_path):
    benches = ["voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k"]
    paths = [fake_results(tmp_path, f"naclip/{b}", b, 10.0 * (i + 1)) for i, b in enumerate(benches)]
    paths.append(fake_results(tmp_path, "sclip/voc21", "voc21", 59.1, limit=True))
    text = render(build_rows(paths))
    assert "| VOC21 | PC60 | Object | VOC20 | PC59 | Stuff | City | ADE | Average |" in text
    assert "| naclip (ViT-B-16) | 10.0 | 20.0 | 30.0 | 40.0 | 50.0 | 60.0 | 70.0 | 80.0 | 45.0 |" in text
    assert "| sclip (ViT-B-16) | 59.1† | - |" in text and "ran on part of the benchmark" in text
    with pytest.raises(ValueError, match="two results for naclip"):
        build_rows([paths[0], paths[0]])


def test_tool_runs_a_benchmark_and_records_the_preset(tmp_path, tiny_clip):
    from tools import make_table, zero_shot_benchmark

    labels = [rng.integers(0, 21, (40, 52)), rng.integers(0, 21, (36, 36))]
    root = make_layout(tmp_path / "voc", "voc21", labels)
    out = tmp_path / "run"
    argv = ["--benchmark", "voc21", "--root", str(root), "--method", "naclip", "--out", str(out), "--set",
            "short_side=64", "--pamr", "off", "zeroshot.pretrained=none", f"zeroshot.backbone=open_clip:{tiny_clip}",
            "device=cpu"]  # fmt: skip
    assert zero_shot_benchmark.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    protocol = results["protocol"]
    assert protocol["preset"] == "naclip/voc21" and protocol["benchmark"] == "voc21" and protocol["images"] == 2
    assert protocol["settings"]["pamr_steps"] == 0 and protocol["settings"]["window"] == 0
    assert protocol["settings"]["short_side"] == 64 and protocol["pretrained"] == "none"
    assert 0.0 <= results["metrics"]["miou"] <= 100.0 and len([k for k in results["metrics"] if "/" in k]) == 21
    assert {"iou/background", "iou/diningtable", "iou/tvmonitor"} <= results["metrics"].keys()
    assert make_table.main(["--zero-shot", str(out)]) == 0
    assert zero_shot_benchmark.main([*argv[:6], "--out", str(out), "--set", "windwo=0", "device=cpu"]) == 2
    assert zero_shot_benchmark.main(["--benchmark", "vco21", "--root", str(root), "--out", str(out)]) == 2


@pytest.mark.slow
def test_real_voc_masks_read_as_voc21_and_voc20(tmp_path, shared_data):
    """Real VOC masks (SegmentationClassAug, 0..20 and 255) in the VOC layout: VOC20 is VOC21 with 0 made void."""
    masks = sorted((shared_data / "voc2012_segclassaug/SegmentationClassAug").glob("*.png"))[:12]
    root = tmp_path / "VOC2012"
    for mask in masks:
        label = np.asarray(Image.open(mask))
        write_pair(root, f"JPEGImages/{mask.stem}.jpg", f"SegmentationClass/{mask.name}", label)
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(m.stem for m in masks))
    voc21, voc20 = BenchmarkDataset("voc21", root), BenchmarkDataset("voc20", root)
    for (_, label21, _), (_, label20, _) in zip(voc21, voc20, strict=True):
        assert label21.max() <= 255 and set(label21.unique().tolist()) <= set(range(21)) | {255}
        want = torch.where((label21 == 0) | (label21 == 255), 255, label21 - 1)
        assert torch.equal(label20, want)


@pytest.mark.integration
def test_two_process_benchmark_equals_one_process(tmp_path):
    """Under torchrun each process takes every second image; the summed counts give the single process's IoU."""
    import os
    import subprocess
    import sys

    from tools import zero_shot_benchmark

    root = make_layout(tmp_path / "voc", "voc21", [rng.integers(0, 21, (40, 52)) for _ in range(3)])
    args = ["--benchmark", "voc21", "--root", str(root), "--method", "sclip", "--set", "short_side=64", "--set",
            "window=64", "--set", "stride=32", "--set", "templates='single'", "zeroshot.pretrained=none",
            "zeroshot.backbone=open_clip:ViT-S-32", "device=cpu"]  # fmt: skip
    assert zero_shot_benchmark.main([*args, "--out", str(tmp_path / "one")]) == 0
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(repo / "tools/zero_shot_benchmark.py"), *args, "--out", str(tmp_path / "two")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["protocol"]["world_size"] == 2 and two["protocol"]["images"] == 3
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, abs=1e-9), key


def test_published_rows_and_their_averages(tmp_path, capsys):
    from fewshot.zeroshot.benchmarks.table import load_published
    from tools import make_table

    published = Path(__file__).resolve().parents[1] / "fewshot/zeroshot/benchmarks/published.yaml"
    assert make_table.main(["--zero-shot", "--published", str(published)]) == 0
    assert "| NACLIP [published] | 58.9 |" in capsys.readouterr().out
    rows = load_published(published)
    text = render(rows)
    assert "| SCLIP [published] | 59.1 | 30.4 | 30.5 | 80.4 | 34.2 | 22.4 | 32.2 | 16.1 | 38.2 |" in text
    assert "| ProxyCLIP (DINO B/8) [published] |" in text and "42.3 |" in text  # the appendix's averages
    assert "NACLIP + PAMR [published] | 64.1" in text and "| 42.5 |" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods:\n  - name: X\n    miou: {voc12: 50}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: X: benchmarks \['voc12'\] unknown"):
        load_published(bad)


@pytest.mark.slow
def test_real_coco_images_as_coco_stuff_and_coco_object(tmp_path, shared_data):
    """Real COCO val2017 images with their instance masks drawn as COCO-Stuff trainIds (things 0..79, a stuff id
    elsewhere, void on crowds): COCO-Stuff reads them as stored, COCO-Object as thing + 1 and 0 elsewhere."""
    from pycocotools import mask as coco_mask

    from episodes.classes import COCO_CATEGORY_IDS

    source = shared_data / "coco_sample_icevision"
    data = json.loads((source / "annotations.json").read_text())
    root = tmp_path / "coco_stuff164k"
    (root / "images/val2017").mkdir(parents=True)
    (root / "annotations/val2017").mkdir(parents=True)
    for image in data["images"]:
        h, w = image["height"], image["width"]
        label = np.full((h, w), 120, np.uint8)  # a stuff class everywhere
        for ann in (a for a in data["annotations"] if a["image_id"] == image["id"]):
            seg = ann["segmentation"]
            rle = coco_mask.frPyObjects(seg, h, w) if isinstance(seg, list) else seg
            rle = coco_mask.merge(rle) if isinstance(rle, list) else rle
            if isinstance(rle.get("counts"), list):
                rle = coco_mask.frPyObjects(rle, h, w)
            label[coco_mask.decode(rle) > 0] = 255 if ann["iscrowd"] else COCO_CATEGORY_IDS.index(ann["category_id"])
        stem = Path(image["file_name"]).stem
        (root / "images/val2017" / image["file_name"]).symlink_to(source / "images" / image["file_name"])
        Image.fromarray(label).save(root / f"annotations/val2017/{stem}_labelTrainIds.png")
    stuff, objects = BenchmarkDataset("coco_stuff", root), BenchmarkDataset("coco_object", root)
    assert len(stuff) == len(data["images"]) == 6
    thing_pixels = 0
    for (image, stored, _), (_, label, _) in zip(stuff, objects, strict=True):
        assert image.shape[1:] == stored.shape
        things = stored < 80
        assert torch.equal(label[things], stored[things] + 1)
        assert (label[~things] == 0).all()  # stuff and void both become background
        thing_pixels += int(things.sum())
    assert thing_pixels > 0

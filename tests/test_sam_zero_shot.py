"""zeroshot.refine=sam: each class's zero-shot mask refined by SAM, in tools/zero_shot.py's images and --eval modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.sam.refine import refine_labels
from tests.test_sam_refine import ObjectSam
from tools import zero_shot

REPO = Path(__file__).resolve().parents[1]
SAM = ["zeroshot.sam.pretrained=none", "zeroshot.sam.preset=tiny256", "zeroshot.sam.image_size=256"]


def test_oracle_sam_makes_every_class_exact():
    objects = torch.zeros(2, 40, 40, dtype=torch.bool)
    objects[0, 2:20, 2:18] = True
    objects[1, 22:38, 20:38] = True
    scores = torch.zeros(3, 40, 40)  # background 0; each class wins on its object's core only
    scores[1, 6:14, 5:12] = 2.0
    scores[2, 26:34, 25:33] = 2.0
    labels = refine_labels(ObjectSam(objects), torch.zeros(1), scores, accept_iou=0.1)
    expected = torch.zeros(40, 40, dtype=torch.long)
    expected[objects[0]], expected[objects[1]] = 1, 2
    assert torch.equal(labels, expected)


def settings(tiny_clip: str) -> list[str]:
    return [f"zeroshot.backbone=open_clip:{tiny_clip}", "zeroshot.pretrained=none", "zeroshot.templates=single",
            "zeroshot.short_side=64", "zeroshot.window=48", "zeroshot.stride=32", "device=cpu", *SAM]  # fmt: skip


SAM2 = ["zeroshot.sam.name=sam2.1_hiera_t", "zeroshot.sam.preset=sam2_tiny128", "zeroshot.sam.image_size=128"]


@pytest.mark.parametrize("sam", [[], SAM2], ids=["sam", "sam2"])
def test_images_with_refine(tiny_clip, tmp_path, sam):
    path = tmp_path / "one.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "out"
    argv = ["--image", str(path), "--prompts", "cat,dog", "--refine", "sam", *settings(tiny_clip), *sam]
    assert zero_shot.main([*argv, "--out", str(out)]) == 0
    record = json.loads((out / "one.json").read_text())
    assert record["model"].endswith("+refine:sam") and record["refine"] == "sam"
    assert record["sam"]["preset"] == ("sam2_tiny128" if sam else "tiny256") and record["sam"]["pretrained"] == "none"
    assert set(np.unique(np.array(Image.open(out / "one.png")))) <= {0, 1, 2}


def test_eval_with_refine(tiny_clip, tmp_path):
    out = tmp_path / "eval"
    data = [f"data.root={tmp_path / 'synthetic'}", "data.synthetic.images=120", "data.synthetic.size=64",
            "data.image_size=64", "data.min_pixels=64", "data.episodes=4", "data.num_workers=0",
            "eval.batch_size=2"]  # fmt: skip
    argv = ["--eval", str(REPO / "configs/zeroshot_demo.yaml"), *data, *settings(tiny_clip), "--refine", "sam"]
    assert zero_shot.main([*argv, "--out", str(out)]) == 0
    protocol = json.loads((out / "results.json").read_text())["protocol"]
    assert protocol["refine"] == "sam" and protocol["shots"] == 0 and protocol["model"].endswith("+refine:sam")

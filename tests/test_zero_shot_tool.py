"""tools/zero_shot.py end to end on generated images and synthetic episodes, with a tiny random open_clip model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fewshot.backbones.open_clip
from fewshot.config import ZeroShotConfig
from fewshot.zeroshot import DenseCLIP, ZeroShotSegmenter
from tools import zero_shot

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def settings(tiny_clip) -> list[str]:
    return [
        f"zeroshot.backbone=open_clip:{tiny_clip}",
        "zeroshot.pretrained=none",
        "zeroshot.templates=single",
        "zeroshot.short_side=64",
        "zeroshot.window=48",
        "zeroshot.stride=32",
        "device=cpu",
    ]


def write_image(path, height: int, width: int, seed: int) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    return image


def test_images_and_folder(settings, tmp_path):
    single = tmp_path / "one.png"
    first = write_image(single, 40, 70, 0)
    folder = tmp_path / "folder"
    folder.mkdir()
    write_image(folder / "two.jpg", 90, 50, 1)
    write_image(folder / "one.png", 33, 33, 2)  # same stem as the single image: written as one-2
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    torch.manual_seed(0)
    rc = zero_shot.main(
        ["--image", str(single), str(folder), *settings, "--prompts", "cat, sofa|couch", "--out", str(out)]
    )
    assert rc == 0
    sizes = {"one": (40, 70), "two": (90, 50), "one-2": (33, 33)}
    assert {p.name for p in out.iterdir()} == {f"{s}{x}" for s in sizes for x in (".png", "_overlay.png", ".json")}
    for stem, (h, w) in sizes.items():
        labels = Image.open(out / f"{stem}.png")
        assert labels.mode == "P" and labels.size == (w, h)
        assert set(np.unique(np.array(labels))) <= {0, 1, 2}
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == (w, h)
        record = json.loads((out / f"{stem}.json").read_text())
        assert record["size"] == [h, w] and record["prompts"] == ["cat", "sofa,couch"]
        assert record["labels"] == {"0": "background", "1": "cat", "2": "sofa,couch"}
        assert sum(a["pixels"] for a in record["areas"].values()) == h * w
        counts = np.bincount(np.array(labels).ravel(), minlength=3)
        assert [record["areas"][n]["pixels"] for n in ("background", "cat", "sofa,couch")] == counts.tolist()
        assert record["pretrained"] == "none" and "meaningless" in record["warnings"][0]

    assert np.array_equal(np.array(Image.open(out / "one.png")), predict(settings, [["cat"], ["sofa", "couch"]], first))


def predict(settings: list[str], classes: list[list[str]], image: np.ndarray) -> np.ndarray:
    """The labels the tool's segmenter gives `image` [H, W, 3]: the same random weights (seed 0), built directly."""
    torch.manual_seed(0)
    backbone = settings[0].split("=")[1]
    cfg = ZeroShotConfig(backbone, "none", templates="single", short_side=64, window=48, stride=32)
    segmenter = ZeroShotSegmenter.from_config(cfg, classes, DenseCLIP.from_config(cfg))
    with torch.no_grad():
        return segmenter.predict(torch.from_numpy(image).permute(2, 0, 1)[None])[0].numpy()


def test_exif_orientation_is_applied(settings, tmp_path):
    """A JPEG stored 40 x 70 with EXIF orientation 6 (rotate 90 degrees clockwise to display) displays 70 x 40: the
    outputs are made on, and line up with, the displayed photo."""
    stored = np.random.default_rng(3).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    with Image.open(tmp_path / "phone.jpg") as photo:
        shown = np.array(photo.transpose(Image.Transpose.ROTATE_270).convert("RGB"))  # 90 degrees clockwise
    assert shown.shape == (70, 40, 3)
    out = tmp_path / "out"
    torch.manual_seed(0)
    assert (
        zero_shot.main(["--image", str(tmp_path / "phone.jpg"), *settings, "--prompts", "cat", "--out", str(out)]) == 0
    )
    labels = np.array(Image.open(out / "phone.png"))
    assert labels.shape == (70, 40) and json.loads((out / "phone.json").read_text())["size"] == [70, 40]
    assert np.array_equal(labels, predict(settings, [["cat"]], shown))
    overlay = np.array(Image.open(out / "phone_overlay.png"))
    assert np.array_equal(overlay[labels == 0], shown[labels == 0])  # untinted pixels are the displayed photo


@pytest.fixture
def no_model(monkeypatch) -> None:
    """Building a CLIP model fails the test: errors in the prompts must be found before any work starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the prompts were checked")

    monkeypatch.setattr(fewshot.backbones.open_clip, "create_open_clip_model", refuse)


def test_duplicate_prompts_are_refused_up_front(settings, tmp_path, capsys, no_model):
    image, out = tmp_path / "ok.png", tmp_path / "out"
    write_image(image, 32, 32, 0)
    for prompts, named in (
        ("dog,dog,cat", "'dog' in classes 1, 2"),
        ("cat,sofa|couch,Couch", "'couch' in classes 2, 3"),
    ):
        assert zero_shot.main(["--image", str(image), *settings, "--prompts", prompts, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "--prompts" in err and named in err, err
    assert not out.exists()


def test_more_than_255_prompts_are_refused_up_front(settings, tmp_path, capsys, no_model):
    image = tmp_path / "ok.png"
    write_image(image, 32, 32, 0)
    prompts = ",".join(f"class{i}" for i in range(256))
    assert zero_shot.main(["--image", str(image), *settings, "--prompts", prompts, "--out", str(tmp_path / "o")]) == 2
    assert "256 classes" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_bad_input(settings, tmp_path, capsys):
    image = tmp_path / "ok.png"
    write_image(image, 32, 32, 0)
    broken = tmp_path / "broken.jpg"
    broken.write_text("this is not a JPEG")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should go")
    cases = [
        (["--image", str(image), "--prompts", " , ", "--out", str(tmp_path / "a")], "names no class"),
        (["--image", str(broken), "--prompts", "cat", "--out", str(tmp_path / "b")], "broken.jpg"),
        (
            ["--image", str(tmp_path / "missing.png"), "--prompts", "cat", "--out", str(tmp_path / "c")],
            "does not exist",
        ),
        (["--image", str(image), "--prompts", "cat", "--out", str(blocker / "sub")], "cannot be written"),
        (["--image", str(image), "--prompts", "cat", "zeroshot.method=sclipp", "--out", str(tmp_path / "d")], "sclip"),
    ]
    for argv, message in cases:
        assert zero_shot.main([*argv, *settings]) == 2, argv
        err = capsys.readouterr().err  # the tool logs the error to stderr
        assert "ERROR" in err and message in err, (argv, err)
    with pytest.raises(SystemExit):
        zero_shot.main(["--image", str(image), "--out", str(tmp_path / "e")])  # --prompts missing


def test_eval_on_synthetic_episodes(settings, tmp_path, capsys):
    out = tmp_path / "eval"
    overrides = [
        f"data.root={tmp_path / 'synthetic'}",
        "data.synthetic.images=240",
        "data.synthetic.size=64",
        "data.image_size=64",
        "data.min_pixels=64",
        "data.episodes=6",
        "data.num_workers=0",
        "eval.batch_size=3",
    ]
    rc = zero_shot.main(["--eval", str(REPO / "configs/zeroshot_demo.yaml"), *overrides, *settings, "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["class_iou"]) == {"1", "2", "3", "4", "5"}  # fold 0's novel classes
    assert results["episodes"] == 6 and 0.0 <= results["miou"] <= 100.0
    proto = results["protocol"]
    assert results["method"] == "sclip_fewshot-tiny-clip" and proto["shots"] == 0  # the zero-shot column
    assert proto["head"] == "zeroshot:sclip" and proto["pretrained"] == "none" and proto["shot_fusion"] == "none"
    assert proto["backbone"] == settings[0].split("=")[1]  # the model reports itself: open_clip:<tiny model>
    assert proto["zeroshot"]["window"] == 48 and proto["model"].startswith("zeroshot:sclip")
    assert "meaningless" in results["warnings"][0]
    assert "zero-shot fold 0" in capsys.readouterr().out

"""The synthetic dataset: VOC layout the PASCAL source reads, determinism, class design (colour is no cue), interrupted
generations."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from episodes import synthetic
from episodes.base import DataError
from episodes.pascal import PascalSource

IMAGES, SIZE = 60, 64


def _digest(root: Path) -> dict[str, str]:
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("syn") / "voc", images=IMAGES, size=SIZE, seed=0)


def test_layout_is_voc(root: Path) -> None:
    train = (root / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    val = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == 48 and len(val) == 12 and not set(train) & set(val)
    for image_id in train + val:
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (SIZE, SIZE))
        with Image.open(root / "SegmentationClassAug" / f"{image_id}.png") as im:
            assert (im.format, im.mode, im.size) == ("PNG", "P", (SIZE, SIZE))
            assert im.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # VOC colour map
    assert (root / "SOURCE.md").is_file() and synthetic.read_marker(root)["images"] == IMAGES


def test_masks_have_classes_and_a_thin_void_band(root: Path) -> None:
    labels = [np.array(Image.open(p)) for p in sorted((root / "SegmentationClassAug").glob("*.png"))]
    inside = []
    for label in labels:
        values = set(np.unique(label).tolist())
        assert values <= set(range(21)) | {255}
        assert 1 <= len(values - {0, 255}) <= 3  # one to three objects
        assert 255 in values
        void = np.pad(label == 255, 1, mode="edge")
        inside.append(np.lib.stride_tricks.sliding_window_view(void, (3, 3)).all(axis=(2, 3)).sum() / void.sum())
    assert np.mean(inside) < 0.1  # a thin band: void pixels touch a label, except where objects meet
    fg = np.mean([((lab > 0) & (lab < 255)).mean() for lab in labels])
    void = np.mean([(lab == 255).mean() for lab in labels])
    assert 0.1 < fg < 0.6 and void < 0.75 * fg  # 2 px band at 64 px: 10 % void (5 % at 128 px)


def test_pascal_source_reads_it(root: Path) -> None:
    source = PascalSource(root)
    ids = source.image_ids("trn")
    assert len(ids) == 48 and len(source.image_ids("val")) == 12
    image = source.load_image(ids[0])
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    label = np.array(Image.open(root / "SegmentationClassAug" / f"{ids[0]}.png"))
    pixels = source.class_pixels(ids[0])
    class_id = max(pixels, key=pixels.get)
    mask = source.load_class_mask(ids[0], class_id)
    assert set(np.unique(mask).tolist()) <= {0, 1, 255}
    assert ((mask == 1) == (label == class_id)).all() and ((mask == 255) == (label == 255)).all()


def test_same_seed_gives_identical_files_and_another_seed_does_not(root: Path, tmp_path: Path) -> None:
    again = synthetic.generate(tmp_path / "again", images=IMAGES, size=SIZE, seed=0)
    assert _digest(again) == _digest(root)
    other = synthetic.generate(tmp_path / "other", images=IMAGES, size=SIZE, seed=1)
    first = "JPEGImages/syn_000000.jpg"
    assert _digest(other)[first] != _digest(root)[first]


def test_every_class_is_the_top_object_in_both_splits() -> None:
    counts = {"trn": Counter(), "val": Counter()}
    for index in range(200):
        label = synthetic.render_image(index, 48, seed=3)[1]
        present = set(np.unique(label).tolist()) - {0, 255}
        counts["val" if index % 5 == 4 else "trn"].update(present)
    assert min(counts["trn"][c] for c in range(1, 21)) >= 8
    assert min(counts["val"][c] for c in range(1, 21)) >= 2


def test_no_single_cue_identifies_a_class() -> None:
    parts = [synthetic.class_parts(c) for c in range(1, 21)]
    assert len(set(parts)) == 20
    for cue, share in ((0, 4), (1, 5)):  # each shape is shared by four classes, each texture by five
        counts = Counter(p[cue] for p in parts)
        assert set(counts.values()) == {share}, f"cue {cue} is not shared evenly: {counts}"
    # the five novel classes of each PASCAL-5i fold use all five shapes and all four textures
    for fold in range(4):
        novel = parts[5 * fold : 5 * fold + 5]
        assert {p[0] for p in novel} == set(synthetic.SHAPES) and {p[1] for p in novel} == set(synthetic.TEXTURES)
    assert synthetic.CLASS_NAMES[1] == " ".join(reversed(parts[0])) == "plain circle"
    with pytest.raises(ValueError, match="1..20"):
        synthetic.class_parts(21)


def _colour_profiles(images: int, size: int, seed: int) -> np.ndarray:
    """[20, palette] per class: the share of its pixels nearest to each palette colour, averaged over its objects."""
    palette = np.array(list(synthetic.PALETTE.values()), np.float32)  # (P, 3)
    sums = np.zeros((20, len(palette)))
    for index in range(images):
        image, label = synthetic.render_image(index, size, seed)
        for class_id in set(np.unique(label).tolist()) - {0, 255}:
            pixels = image[label == class_id].astype(np.float32)  # (n, 3), void border band excluded
            nearest = ((pixels[:, None] - palette[None]) ** 2).sum(axis=-1).argmin(axis=1)  # (n,)
            sums[class_id - 1] += np.bincount(nearest, minlength=len(palette)) / len(nearest)
    return sums / sums.sum(axis=1, keepdims=True)


def test_colour_is_no_cue_every_class_has_the_same_colour_distribution() -> None:
    profiles = _colour_profiles(images=1000, size=40, seed=5)
    pooled = np.full(len(synthetic.PALETTE), 1 / len(synthetic.PALETTE))  # uniform over the shared palette
    distance = 0.5 * np.abs(profiles - pooled).sum(axis=1)  # total variation per class, in [0, 1]
    # version 1 (a colour per class, each shared by four) gives 0.5 to 0.8; 100 objects per class give about 0.1
    assert distance.max() < 0.25, f"class colour distributions differ from the palette's: {distance.round(2)}"
    # a pixel's colour says nothing of its class: the best colour -> class rule is at chance (1 in 20; version 1: 0.24)
    best_rule = profiles.max(axis=0).sum() / profiles.sum()
    assert best_rule < 0.1, f"colour predicts the class: {best_rule:.2f}"


def test_colour_does_not_separate_objects_from_the_background() -> None:
    palette = np.array(list(synthetic.PALETTE.values()), np.float32)
    counts = np.zeros(2)  # palette-coloured pixels in the background, on objects
    for index in range(150):
        image, label = synthetic.render_image(index, 48, seed=5)
        distance = ((image[..., None, :].astype(np.float32) - palette) ** 2).sum(axis=-1).min(axis=-1) ** 0.5
        coloured = distance < 40  # (48, 48): within the shade jitter of a palette colour
        counts += [(coloured & (label == 0)).sum(), (coloured & (label > 0) & (label < 255)).sum()]
    # shapeless clutter in the objects' palette and textures: 4 in 10 of those pixels (without it: none)
    assert counts[0] / counts.sum() > 0.3, f"palette colours mark the objects: {counts}"


def test_reuse_regeneration_and_refusals(root: Path, tmp_path: Path) -> None:
    target = tmp_path / "data"
    synthetic.generate(target, images=10, size=32)
    marker = target / synthetic.MARKER
    stamp = marker.stat().st_mtime_ns
    synthetic.generate(target, images=10, size=32)  # complete with the same parameters: untouched
    assert marker.stat().st_mtime_ns == stamp
    synthetic.generate(target, images=15, size=32)  # other parameters: replaced
    assert len((target / "ImageSets/Segmentation/val.txt").read_text().split()) == 3
    foreign = tmp_path / "foreign"
    (foreign / "JPEGImages").mkdir(parents=True)
    with pytest.raises(DataError, match="not a synthetic dataset"):
        synthetic.generate(foreign, images=10, size=32)


def test_interrupted_generation_leaves_nothing_and_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "data"
    calls = []

    def crash(*args):
        calls.append(args)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(*args)

    original = synthetic.render_image
    monkeypatch.setattr(synthetic, "render_image", crash)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(target, images=10, size=32)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    dead = tmp_path / ".data.partial-999999999"  # left by a killed process: no such pid
    (dead / "JPEGImages").mkdir(parents=True)
    monkeypatch.setattr(synthetic, "render_image", original)
    synthetic.generate(target, images=10, size=32)
    assert synthetic.read_marker(target)["images"] == 10 and not dead.exists()
    assert sorted(os.listdir(tmp_path)) == ["data"]

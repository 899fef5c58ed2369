"""Small cross-domain datasets in the official layouts (PATNet's, DMTNet's, the public releases), made in tmp_path.

Every mask is drawn by hand from rectangles, so a test knows each class's pixels exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Deepglobe's colours (RGB) by PATNet class id; PATNet's preprocess.py lists them in OpenCV's BGR order.
PATNET_LABELSET_BGR = [[0, 255, 255], [255, 255, 0], [255, 0, 255], [0, 255, 0], [255, 0, 0], [255, 255, 255]]
DEEPGLOBE_RGB = {c: tuple(bgr[::-1]) for c, bgr in enumerate(PATNET_LABELSET_BGR, 1)}
UNKNOWN = (0, 0, 0)


def noise_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def save(image: Image.Image | np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(path)
    return path


def binary(height: int, width: int, box: tuple[int, int, int, int], value: int = 255) -> np.ndarray:
    """A grey mask [H, W] uint8: `value` inside box (top, bottom, left, right), 0 elsewhere."""
    mask = np.zeros((height, width), np.uint8)
    top, bottom, left, right = box
    mask[top:bottom, left:right] = value
    return mask


def deepglobe_raw_mask(size: int = 60) -> np.ndarray:
    """A [size, size, 3] RGB mask whose 6 x 6 tiles (10 px each for size 60) test the preprocessing rules.

    Row 0: tile 00 agriculture left half / water right half (kept: classes 1, 5); tile 01 all urban (one colour:
    dropped); tile 02 forest with a 2 x 2 barren corner (4 % of the tile: dropped); tile 03 unknown top half / urban
    bottom half (kept: class 2 only, unknown is no class); tile 04 rangeland with 5 x 1 barren (5 %: kept). The rest is
    all unknown (one colour: dropped).
    """
    mask = np.zeros((size, size, 3), np.uint8)
    t = size // 6
    mask[0:t, 0 : t // 2] = DEEPGLOBE_RGB[1]
    mask[0:t, t // 2 : t] = DEEPGLOBE_RGB[5]
    mask[0:t, t : 2 * t] = DEEPGLOBE_RGB[2]
    mask[0:t, 2 * t : 3 * t] = DEEPGLOBE_RGB[4]
    mask[0:2, 2 * t : 2 * t + 2] = DEEPGLOBE_RGB[6]
    mask[t // 2 : t, 3 * t : 4 * t] = DEEPGLOBE_RGB[2]
    mask[0:t, 4 * t : 5 * t] = DEEPGLOBE_RGB[3]
    mask[0:5, 4 * t : 4 * t + 1] = DEEPGLOBE_RGB[6]
    return mask


def make_deepglobe_raw(root: Path, images: int = 2, size: int = 60, seed: int = 0) -> Path:
    """DeepGlobe's release layout: train/<id>_sat.jpg + <id>_mask.png (the same hand-made mask for every image)."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        save(noise_image(rng, size, size), root / "train" / f"{100 + i}_sat.jpg")
        save(deepglobe_raw_mask(size), root / "train" / f"{100 + i}_mask.png")
    return root


def make_deepglobe_binary(root: Path, layout: str, per_class: int = 3, size: int = 24, seed: int = 0) -> dict:
    """PATNet's (<c>/test/origin, <c>/test/groundtruth) or DMTNet's (image/, filter_mask/<c>/) tiles.

    Tile k holds classes {k mod 6 + 1, (k + 1) mod 6 + 1}; class c's mask is a box whose grey level is 128 (in) or
    127 (a border strip that the >= 128 rule leaves out). Returns {tile id: {class: boolean mask}}.
    """
    rng = np.random.default_rng(seed)
    truth: dict[str, dict[int, np.ndarray]] = {}
    for k in range(per_class * 3):
        tile = f"{200 + k}_sat_{k % 6}{k % 5}"
        image = noise_image(rng, size, size)
        for c in sorted({k % 6 + 1, (k + 1) % 6 + 1}):
            grey = binary(size, size, (2, 2 + 4 + c, 3, 12 + c), value=128)
            grey[0, :] = 127  # below the threshold: not the class
            truth.setdefault(tile, {})[c] = grey >= 128
            stem, _, ij = tile.rpartition("_sat_")
            if layout == "patnet":
                save(image, root / str(c) / "test" / "origin" / f"{tile}.jpg")
                save(grey, root / str(c) / "test" / "groundtruth" / f"{tile}.png")
            else:
                save(image, root / "image" / f"{tile}.jpg")
                save(grey, root / "filter_mask" / str(c) / f"{stem}_mask_{ij}.png")
    for c in range(1, 7):  # empty class folders still exist in both layouts
        (root / str(c) / "test" / "groundtruth" if layout == "patnet" else root / "filter_mask" / str(c)).mkdir(
            parents=True, exist_ok=True
        )
        if layout == "patnet":
            (root / str(c) / "test" / "origin").mkdir(parents=True, exist_ok=True)
    return truth


def make_isic(root: Path, layout: str, per_class: tuple[int, int, int] = (4, 3, 3), size: int = 20) -> dict:
    """ISIC2018 Task 1 inputs and masks, sorted into 1/2/3 folders or flat with PATNet's class_id.csv.

    Returns {image id: (class id, boolean lesion mask)}.
    """
    rng = np.random.default_rng(1)
    names = {1: "nevus", 2: "melanoma", 3: "seborrheic_keratosis"}
    truth, rows = {}, ["ID,Class"]
    n = 0
    for c, count in enumerate(per_class, 1):
        for _ in range(count):
            image_id = f"ISIC_{n:07d}"
            folder = root / "ISIC2018_Task1-2_Training_Input" / (str(c) if layout == "sorted" else "")
            save(noise_image(rng, size, size + 4), folder / f"{image_id}.jpg")
            lesion = binary(size, size + 4, (n % 5, n % 5 + 8, 2, 2 + 6 + c))
            save(lesion, root / "ISIC2018_Task1_Training_GroundTruth" / f"{image_id}_segmentation.png")
            truth[image_id] = (c, lesion >= 128)
            rows.append(f"{image_id},{names[c] if n % 2 else names[c].replace('_', ' ')}")
            n += 1
    if layout == "flat":
        (root / "class_id.csv").write_text("\n".join(rows) + "\n")
    return truth


def make_chest_xray(root: Path, shenzhen: int = 4, montgomery: int = 2, size: int = 20) -> dict:
    """Kaggle's 'Lung Segmentation': CXR_png/<name>.png, masks/<name>_mask.png (CHNCXR) or <name>.png (MCUCXR).

    One radiograph has no mask (it is not used). Returns {image id: boolean lung mask}.
    """
    rng = np.random.default_rng(2)
    truth = {}
    names = [(f"CHNCXR_{i:04d}_0", "_mask") for i in range(1, shenzhen + 1)]
    names += [(f"MCUCXR_{i:04d}_0", "") for i in range(1, montgomery + 1)]
    for k, (name, suffix) in enumerate(names):
        save(Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)), root / "CXR_png" / f"{name}.png")
        lungs = binary(size, size, (3, 15, 2 + k % 3, 9 + k % 3)) | binary(size, size, (3, 15, 11, 18))
        save(lungs, root / "masks" / f"{name}{suffix}.png")
        truth[name] = lungs >= 128
    save(Image.fromarray(np.zeros((size, size), np.uint8)), root / "CXR_png" / "CHNCXR_0999_1.png")  # no mask
    return truth


def make_fss1000(root: Path, splits: Path, per_split: dict[str, int], images: int = 10, size: int = 16) -> dict:
    """FSS-1000 class folders (<class>/<n>.jpg + <n>.png, n = 1..images) and HSNet's trn/val/test class lists."""
    rng = np.random.default_rng(3)
    classes: dict[str, list[str]] = {}
    for split, count in per_split.items():
        classes[split] = [f"{split}_class{k}" for k in range(count)]
        for name in classes[split]:
            for n in range(1, images + 1):
                save(noise_image(rng, size, size), root / name / f"{n}.jpg")
                save(binary(size, size, (2, 2 + n % 7 + 3, 4, 12)), root / name / f"{n}.png")
    splits.mkdir(parents=True, exist_ok=True)
    for split, names in classes.items():
        (splits / f"{split}.txt").write_text("\n".join(names) + "\n")
    return classes

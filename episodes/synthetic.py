"""The built-in synthetic dataset, written in exactly the PASCAL VOC layout so the real PASCAL code path reads it.

Layout under `root` (as VOC2012 + SBD):
    JPEGImages/<id>.jpg                    RGB images, size x size
    SegmentationClassAug/<id>.png          palette PNG: 0 background, 1..20 classes, 255 void band on object borders
    ImageSets/Segmentation/train_aug.txt   80 % of the ids (every image whose index is not 4 mod 5)
    ImageSets/Segmentation/val.txt        the other 20 %
    SOURCE.md, synthetic.json              what generated it; synthetic.json is the completion marker

Each of the 20 classes is a (shape, texture) combination: 5 shapes x 4 textures, so every shape is shared by four
classes and every texture by five. Colour is no cue: every object draws its colour, and the second colour of its
pattern, uniformly from one palette shared by all classes, so the colours of a class's pixels are distributed as those
of any other class; and one or two pieces of shapeless clutter in the same palette and textures lie in the background,
so colour does not tell objects from background either. A segmenter has to learn shape and texture. Images hold one to
three objects of distinct classes (25-60 % of the image side, rotated, shade-jittered) over the clutter on a noisy,
textured, low-saturation background. The object drawn last (on top) cycles through the classes within each split,
so every class is the top object of at least images // 100 val and 4 * images // 100 train images. Every image comes
from its own generator seeded with (seed, index): the same seed gives byte-identical files.

Generation happens in a hidden sibling folder renamed onto `root` when complete, so an interrupted run leaves no
half-written dataset behind and the next call starts again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from episodes.base import DataError
from fewshot.io import write_json, write_text

log = logging.getLogger(__name__)

VERSION = 2  # bump whenever the drawing changes: a dataset made by another version is regenerated
MARKER = "synthetic.json"
SHAPES = ("circle", "square", "triangle", "star", "cross")
TEXTURES = ("plain", "striped", "checkered", "dotted")
PALETTE = {  # shared by every class: an object's colour and its pattern's colour are two distinct entries
    "red": (215, 45, 40),
    "orange": (235, 130, 30),
    "yellow": (225, 200, 35),
    "green": (40, 170, 60),
    "cyan": (30, 180, 200),
    "blue": (45, 85, 215),
    "purple": (150, 55, 195),
    "magenta": (220, 60, 160),
}


def class_parts(class_id: int) -> tuple[str, str]:
    """(shape, texture) of class id k + 1 = 5a + b + 1: shape b, texture (a + b) % 4.

    Every fold's five novel classes (a fixed) hold all five shapes and all four textures.
    """
    if not 1 <= class_id <= 20:
        raise ValueError(f"synthetic class id {class_id} is out of range; valid ids are 1..20")
    a, b = divmod(class_id - 1, 5)
    return SHAPES[b], TEXTURES[(a + b) % 4]


CLASS_NAMES: dict[int, str] = {c: " ".join(reversed(class_parts(c))) for c in range(1, 21)}  # "plain circle"


def voc_palette() -> list[int]:
    """The 256-entry VOC colour map (class index -> RGB) as a flat list for PIL's putpalette."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def generate(root: str | Path, images: int = 1000, size: int = 128, seed: int = 0) -> Path:
    """Writes the synthetic dataset at `root` unless a complete one with the same parameters is already there.

    Returns `root`. A complete dataset made with other parameters (or by another generator version) is replaced;
    a non-empty `root` that this function did not write raises DataError rather than being touched.
    """
    if images < 5 or size < 32:
        raise ValueError(f"synthetic data needs images >= 5 and size >= 32, got images={images}, size={size}")
    root = Path(root).expanduser().resolve()
    params = {"version": VERSION, "images": images, "size": size, "seed": seed}
    found = read_marker(root)
    if _matches(found, params):
        return root
    if found is None and root.is_dir() and any(root.iterdir()):
        raise DataError(
            f"{root} is not empty and holds no {MARKER}: it is not a synthetic dataset. "
            "Set data.root to an empty or missing folder to generate the synthetic data there."
        )
    _remove_stale_partials(root)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("generating %d synthetic %dpx images (seed %d) in %s", images, size, seed, root)
    try:
        _write_dataset(tmp, params)
        _swap_into_place(tmp, root, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def read_marker(root: str | Path) -> dict | None:
    """The parameters of the complete synthetic dataset at `root`, or None when there is none."""
    path = Path(root) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _matches(found: dict | None, params: dict) -> bool:
    return found is not None and all(found.get(k) == v for k, v in params.items())


def split_ids(images: int) -> tuple[list[str], list[str]]:
    """(train_aug ids, val ids): image i goes to val when i % 5 == 4."""
    ids = [image_id(i) for i in range(images)]
    return [x for i, x in enumerate(ids) if i % 5 != 4], [x for i, x in enumerate(ids) if i % 5 == 4]


def image_id(index: int) -> str:
    return f"syn_{index:06d}"


def _write_dataset(folder: Path, params: dict) -> None:
    images, size, seed = params["images"], params["size"], params["seed"]
    (folder / "JPEGImages").mkdir(parents=True)
    (folder / "SegmentationClassAug").mkdir()
    palette = voc_palette()
    for index in range(images):
        image, label = render_image(index, size, seed)
        name = image_id(index)
        Image.fromarray(image).save(folder / "JPEGImages" / f"{name}.jpg", quality=90)
        png = Image.fromarray(label, mode="L").convert("P")
        png.putpalette(palette)
        png.save(folder / "SegmentationClassAug" / f"{name}.png")
    train, val = split_ids(images)
    write_text(folder / "ImageSets" / "Segmentation" / "train_aug.txt", "\n".join(train) + "\n")
    write_text(folder / "ImageSets" / "Segmentation" / "val.txt", "\n".join(val) + "\n")
    write_text(folder / "SOURCE.md", _source_note(params))
    write_json(folder / MARKER, {**params, "class_names": {str(k): v for k, v in CLASS_NAMES.items()}})


def _swap_into_place(tmp: Path, root: Path, params: dict) -> None:
    """Renames the finished folder onto `root`; another process finishing first with the same parameters wins."""
    old = root.parent / f".{root.name}.old-{os.getpid()}"
    found = read_marker(root)
    if found is not None:
        if _matches(found, params):  # made meanwhile by another process: keep it
            return
        os.replace(root, old)  # a synthetic dataset with other parameters: replace it
    try:
        os.replace(tmp, root)  # also succeeds onto an empty directory
    except OSError:
        if not _matches(read_marker(root), params):
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_partials(root: Path) -> None:
    """Deletes the hidden partial (or replaced) folders left by interrupted generations whose process is gone."""
    if not root.parent.is_dir():
        return
    for path in [*root.parent.glob(f".{root.name}.partial-*"), *root.parent.glob(f".{root.name}.old-*")]:
        try:
            os.kill(int(path.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # the process lives, under another user: its folder is in use and stays
            continue


# --------------------------------------------------------------------------------------------------------------------
# Drawing. Every shape is a signed distance field in pixels (negative inside), so anti-aliased edges, the label map
# and the void band all come from the same geometry.


def render_image(index: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of the dataset: (image [size, size, 3] uint8, label [size, size] uint8 in {0..20, 255})."""
    rng = np.random.default_rng([seed, index])
    in_val = index % 5 == 4
    rank = index // 5 if in_val else 4 * (index // 5) + index % 5  # position of the image within its split
    top = rank % 20 + 1
    others = rng.permutation([c for c in range(1, 21) if c != top])[: rng.integers(0, 3)]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    image = _background(rng, size, xx, yy)
    for _ in range(rng.integers(1, 3)):  # shapeless clutter in the objects' palette and textures: background too
        sdf, u, v = _blob_geometry(rng, size, xx, yy)
        image = _paint(image, sdf, _texture_colour(rng, TEXTURES[rng.integers(0, len(TEXTURES))], size, u, v))
    label = np.zeros((size, size), np.uint8)
    for class_id in [*others.tolist(), top]:  # the cycling class is drawn last, on top
        shape, texture = class_parts(class_id)
        sdf, u, v = _object_geometry(rng, shape, size, xx, yy)
        image = _paint(image, sdf, _texture_colour(rng, texture, size, u, v))
        label[sdf < 0] = class_id
    image += rng.normal(0.0, 6.0, image.shape).astype(np.float32)
    radius = max(1, round(size / 160))  # void band of 2 * radius pixels straddling every label edge (2 px at 128)
    label[_filter(label, radius, np.maximum) != _filter(label, radius, np.minimum)] = 255
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), label


def _background(rng: np.random.Generator, size: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Smooth low-saturation colour blobs, a faint random grating and pixel noise: [size, size, 3] float32."""
    grid = rng.integers(0, 6)  # coarseness of the blobs
    coarse = rng.uniform(60, 200, (grid + 3, grid + 3, 1)) + rng.uniform(-35, 35, (grid + 3, grid + 3, 3))
    blobs = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.04, 0.2) * size
    grating = np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period) * rng.uniform(0, 18)
    noise = rng.normal(0.0, 10.0, (size, size, 1))
    return (np.asarray(blobs, np.float32) + (grating[..., None] + noise)).astype(np.float32)


def _object_geometry(
    rng: np.random.Generator, shape: str, size: int, xx: np.ndarray, yy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signed distance [size, size], local coordinates u, v) of one randomly placed, scaled and rotated shape."""
    radius = rng.uniform(0.14, 0.28) * size  # the object spans about 25-60 % of the image side
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    phi = rng.uniform(0, 2 * np.pi)
    dx, dy = xx - cx, yy - cy
    u = np.cos(phi) * dx + np.sin(phi) * dy
    v = -np.sin(phi) * dx + np.cos(phi) * dy
    if shape == "circle":
        sdf = np.hypot(u, v) - radius
    elif shape == "square":
        sdf = _box(u, v, 0.85 * radius, 0.85 * radius)
    elif shape == "triangle":  # equilateral, circumradius 1.3 r: the max of its three edge distances
        angles = np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3
        sdf = np.max([np.cos(t) * u + np.sin(t) * v for t in angles], axis=0) - 0.65 * radius
    elif shape == "star":  # five sharp points: distance to a radius that dips between the points
        theta = np.arctan2(v, u)
        wave = np.abs(((theta * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at a point, 0 between two points
        sdf = (np.hypot(u, v) - radius * (0.6 + 0.6 * wave)) * 0.8
    elif shape == "cross":
        sdf = np.minimum(_box(u, v, radius, 0.33 * radius), _box(u, v, 0.33 * radius, radius))
    else:
        raise ValueError(f"unknown synthetic shape {shape!r}; choose from {SHAPES}")
    return sdf.astype(np.float32), u, v


def _box(u: np.ndarray, v: np.ndarray, half_w: float, half_h: float) -> np.ndarray:
    qx, qy = np.abs(u) - half_w, np.abs(v) - half_h
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _blob_geometry(
    rng: np.random.Generator, size: int, xx: np.ndarray, yy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signed distance [size, size], local coordinates u, v) of shapeless clutter: where a smooth random field is
    above its (1 - c) quantile, c in [0.06, 0.14] of the image, in one or a few irregular pieces."""
    grid = rng.integers(5, 9)
    coarse = rng.normal(0.0, 1.0, (grid, grid)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
    level = np.quantile(field, 1.0 - rng.uniform(0.06, 0.14))
    gy, gx = np.gradient(field)
    sdf = (level - field) / np.maximum(np.hypot(gx, gy), 1e-4)  # first-order distance to the level line, in pixels
    phi = rng.uniform(0, 2 * np.pi)
    dx, dy = xx - size / 2, yy - size / 2
    u = np.cos(phi) * dx + np.sin(phi) * dy
    v = -np.sin(phi) * dx + np.cos(phi) * dy
    return sdf.astype(np.float32), u, v


def _paint(image: np.ndarray, sdf: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """`colour` [size, size, 3] over `image` where `sdf` < 0, with a one-pixel anti-aliased edge."""
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]
    return image * (1 - alpha) + colour * alpha


def _texture_colour(rng: np.random.Generator, texture: str, size: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A texture in local coordinates, in two distinct palette colours drawn here whatever the texture belongs to
    (the pattern in the second), with a jittered shade: [size, size, 3] float32."""
    first, offset = rng.integers(0, len(PALETTE)), rng.integers(1, len(PALETTE))  # second = first + offset: distinct
    colours = np.array(list(PALETTE.values()), np.float32)[[first, (first + offset) % len(PALETTE)]]  # (2, 3)
    colours = colours * rng.uniform(0.85, 1.12) + rng.uniform(-12, 12, 3)
    period = size / 14 * rng.uniform(0.85, 1.15)
    if texture == "plain":
        pattern = np.zeros_like(u)
    elif texture == "striped":
        pattern = (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
    elif texture == "checkered":
        pattern = (np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period) > 0).astype(np.float32)
    elif texture == "dotted":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        pattern = (np.hypot(du, dv) < 0.3 * period).astype(np.float32)
    else:
        raise ValueError(f"unknown synthetic texture {texture!r}; choose from {TEXTURES}")
    shade = 1.0 + 0.08 * np.tanh(u / size * 4)  # a slight shading across the region
    colour = colours[0] + pattern[..., None] * (colours[1] - colours[0])  # (size, size, 3)
    return np.clip(colour * shade[..., None], 0, 255)


def _filter(label: np.ndarray, radius: int, reduce: np.ufunc) -> np.ndarray:
    """Max or min filter over a (2 radius + 1)^2 window, edges replicated."""
    out = label
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        n = label.shape[axis]
        slices = [padded[i : i + n] if axis == 0 else padded[:, i : i + n] for i in range(2 * radius + 1)]
        out = reduce.reduce(slices, axis=0)
    return out


def _source_note(params: dict) -> str:
    table = "\n".join(f"| {c} | {name} |" for c, name in CLASS_NAMES.items())
    return (
        "# Synthetic few-shot segmentation data\n\n"
        f"Generated by `episodes.synthetic.generate` (version {params['version']}): {params['images']} images of "
        f"{params['size']} x {params['size']} px, seed {params['seed']}. The same parameters give byte-identical "
        "files.\nLayout and mask values as PASCAL VOC 2012 + SBD (`SegmentationClassAug`: 0 background, 1..20 "
        "classes, 255 void border band). `train_aug.txt` holds 80 % of the ids, `val.txt` the other 20 %.\n"
        "Each class is a shape + texture combination; no single cue identifies a class. Colours (an object's and its "
        "pattern's) are drawn from one palette shared by every class, and background clutter has the same colours "
        "and textures.\n\n"
        f"| id | class |\n|---|---|\n{table}\n"
    )

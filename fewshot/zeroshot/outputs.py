"""Reading user images and writing zero-shot predictions: label PNG, colour overlay PNG and a JSON of class areas.

The label PNG is a palette image at the input's size whose pixel values are 0 for background and i for the i-th
prompt (1-based), so `np.array(Image.open(path))` gives the labels directly.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from episodes.base import IMAGE_SUFFIXES

from ..io import atomic_path, write_json


class InputError(ValueError):
    """An image, folder or output location that cannot be used; the message names it and says how to fix it."""


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files from files and folders (a folder gives its images, sorted, not recursive)."""
    images: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            images.extend(found)
        elif path.is_file():
            images.append(path)
        else:
            raise InputError(f"image {path} does not exist; pass image files or folders of images")
    if not images:
        raise InputError("no images given; pass --image PATH [PATH ...]")
    return images


def read_image(path: str | Path) -> np.ndarray:
    """RGB image [H, W, 3] uint8 as it displays: its EXIF orientation applied (a phone photo stored sideways comes
    out upright, and so do the predictions made on it). An unreadable file raises InputError naming it."""
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB")).copy()
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise InputError(f"cannot read image {path}: {err}; is it a JPEG/PNG file?") from err


def check_writable(folder: str | Path) -> Path:
    """Creates `folder` if needed and checks a file can be written there; raises InputError otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"output folder {folder} cannot be written ({err}); choose another --out") from err
    return folder


def palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map [n, 3] uint8: label 0 black, then colours spread by bit interleaving."""
    colours = np.zeros((n, 3), dtype=np.uint8)
    for label in range(n):
        value, r, g, b = label, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[label] = (r, g, b)
    return colours


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """image [H,W,3] uint8 with every non-background label tinted in its palette colour."""
    colours = palette(int(labels.max()) + 1)[labels].astype(np.float32)
    out = image.astype(np.float32)
    fg = labels > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    return out.clip(0, 255).astype(np.uint8)


def class_areas(labels: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{name: {label, pixels, fraction}} for background and every class, in label order."""
    counts = np.bincount(labels.ravel(), minlength=len(class_names) + 1)
    total = max(1, labels.size)
    names = ["background", *class_names]
    return {
        name: {"label": i, "pixels": int(counts[i]), "fraction": float(counts[i]) / total}
        for i, name in enumerate(names)
    }


def save_prediction(
    out_dir: str | Path, stem: str, image: np.ndarray, labels: np.ndarray, class_names: Sequence[str], meta: dict
) -> dict[str, Any]:
    """Writes <stem>.png (labels), <stem>_overlay.png and <stem>.json (areas + `meta`) atomically; returns the JSON.

    Args:
        image: [H, W, 3] uint8; labels: [H, W] ints, 0 background, i the i-th class.
    """
    out_dir = Path(out_dir)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {image.shape[:2]} of {stem} differ in size")
    if labels.max(initial=0) > 255:
        raise ValueError(f"{len(class_names)} classes do not fit an 8-bit label PNG; use at most 255 prompts")
    label_png = Image.frombytes(
        "P", (labels.shape[1], labels.shape[0]), np.ascontiguousarray(labels, np.uint8).tobytes()
    )
    label_png.putpalette(palette(256).ravel().tolist())
    with atomic_path(out_dir / f"{stem}.png") as tmp:
        label_png.save(tmp, format="PNG")
    with atomic_path(out_dir / f"{stem}_overlay.png") as tmp:
        Image.fromarray(overlay(image, labels)).save(tmp, format="PNG")
    record = {
        **meta,
        "size": [int(labels.shape[0]), int(labels.shape[1])],
        "labels": {"0": "background", **{str(i + 1): name for i, name in enumerate(class_names)}},
        "areas": class_areas(labels, class_names),
    }
    write_json(out_dir / f"{stem}.json", record)
    return record


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """Output names for input images: the file stem, with -2, -3 ... when stems repeat."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        stems.append(path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}")
    return stems

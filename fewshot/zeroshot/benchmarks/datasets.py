"""The eight training-free zero-shot benchmarks, read in place from their MMSegmentation layouts.

    name         root (usually)        images and labels below the root                          classes
    voc21        VOCdevkit/VOC2012     JPEGImages/*.jpg, SegmentationClass/*.png                 21 (0 = background)
    voc20        VOCdevkit/VOC2012     as voc21, zero label reduced                              20
    context60    VOCdevkit/VOC2010     JPEGImages/*.jpg, SegmentationClassContext/*.png          60 (0 = background)
    context59    VOCdevkit/VOC2010     as context60, zero label reduced                          59
    coco_object  coco_stuff164k        images/val2017/*.jpg, annotations/val2017/*_instanceTrainIds.png, or
                                       derived from *_labelTrainIds.png (see below)              81 (0 = background)
    coco_stuff   coco_stuff164k        images/val2017/*.jpg, annotations/val2017/*_labelTrainIds.png    171
    cityscapes   cityscapes            leftImg8bit/val/<city>/*_leftImg8bit.png,
                                       gtFine/val/<city>/*_gtFine_labelTrainIds.png              19
    ade20k       ADEChallengeData2016  images/validation/*.jpg, annotations/validation/*.png,
                                       zero label reduced                                        150

VOC and Context list their images in ImageSets/Segmentation/val.txt and ImageSets/SegmentationContext/val.txt; the
others take every label file of the folder, sorted. Reducing the zero label is mmseg's: 0 -> 255 (void), x -> x - 1.
COCO-Object is GroupViT's conversion of COCO-Stuff (`convert_coco_object.py`, used by SCLIP and its successors): the
80 thing classes keep their order as 1..80, and every stuff class and the unlabelled 255 become background 0; a
`_instanceTrainIds.png` beside the stuff label is read as stored. Void is 255 everywhere; any other value outside
the benchmark's classes is an error naming the file.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

VOID = 255
NAMES_DIR = Path(__file__).resolve().parent / "names"


class BenchmarkError(ValueError):
    """A benchmark folder, list, image or label that cannot be used; the message names it and the expected layout."""


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's `reduce_zero_label`: 0 (background) -> 255, x -> x - 1, 255 stays 255."""
    out = label.astype(np.int64) - 1
    out[label == 0] = VOID
    out[label == VOID] = VOID
    return out


def coco_object_from_stuff(label: np.ndarray) -> np.ndarray:
    """COCO-Stuff trainIds (0..79 things, 80..170 stuff, 255 void) -> COCO-Object (0 background, 1..80 things) as
    GroupViT's conversion makes it: unlabelled pixels become background too, so COCO-Object has no void."""
    out = np.zeros(label.shape, dtype=np.int64)
    things = label < 80
    out[things] = label[things].astype(np.int64) + 1
    return out


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: where its files are below the root and how a label file becomes class ids.

    Attributes:
        name: registry key; title: the column header of the published tables.
        names_file: official class-name file (one class per line, synonyms separated by ', '), under names/.
        background: whether class 0 is a background class (VOC21, Context60, COCO-Object).
        image_dir, label_dir: folders below the root; image_suffix, label_suffix: what the files end with.
        split_file: the list of image ids below the root ('' = every label file, found recursively).
        reduce_zero: apply reduce_zero_label to the stored labels.
        convert: a further label conversion (COCO-Object); alt_label_suffix: the converted files, read as stored.
        root_hint: the folder the root usually is.
    """

    name: str
    title: str
    names_file: str
    num_classes: int
    background: bool
    root_hint: str
    image_dir: str
    label_dir: str
    image_suffix: str
    label_suffix: str
    split_file: str = ""
    reduce_zero: bool = False
    convert: Callable[[np.ndarray], np.ndarray] | None = None
    alt_label_suffix: str = ""

    def class_names(self, names_file: str | Path | None = None) -> list[list[str]]:
        """The classes of this benchmark in label order, each a list of synonyms, from `names_file` (default: the
        official file). A file with another number of classes is an error naming it."""
        path = Path(names_file) if names_file else NAMES_DIR / self.names_file
        if not path.is_file():
            raise BenchmarkError(f"class-name file {path} does not exist")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(lines) != self.num_classes:
            raise BenchmarkError(
                f"class-name file {path} has {len(lines)} classes, but {self.name} has {self.num_classes}"
                f"{' (background first)' if self.background else ''}: one class per line, synonyms separated by ', '"
            )
        return [[word.strip() for word in line.split(",") if word.strip()] for line in lines]

    def label_names(self) -> list[str]:
        """One name per class id for the metric: 'background' for class 0 of a benchmark with background, VOC's
        dataset names for VOC, else the first word of each line of the official names file."""
        names = [synonyms[0] for synonyms in self.class_names()]
        if self.name in ("voc21", "voc20"):
            from episodes.classes import VOC_CLASSES

            names = list(VOC_CLASSES)
        return ["background", *names[-(self.num_classes - 1) :]] if self.background else names

    def layout(self) -> str:
        """The expected folder layout below the root, for error messages."""
        split = f", list {self.split_file}" if self.split_file else ""
        return (
            f"{self.name} expects <root> (usually .../{self.root_hint}) holding {self.image_dir}/*{self.image_suffix} "
            f"and {self.label_dir}/*{self.label_suffix}{split}"
        )

    def pairs(self, root: str | Path) -> list[tuple[str, Path, Path]]:
        """(id, image path, label path) of every test image, in the benchmark's order; a missing folder, list,
        image or label is an error naming it and the layout."""
        root = Path(root)
        for sub in (self.image_dir, self.label_dir):
            if not (root / sub).is_dir():
                raise BenchmarkError(f"folder {root / sub} does not exist; {self.layout()}")
        if self.split_file:
            ids = self._listed_ids(root / self.split_file)
            labels = [root / self.label_dir / f"{i}{self.label_suffix}" for i in ids]
        else:
            labels = sorted((root / self.label_dir).rglob(f"*{self.label_suffix}"))
            if self.alt_label_suffix:
                labels = labels or sorted((root / self.label_dir).rglob(f"*{self.alt_label_suffix}"))
            if not labels:
                raise BenchmarkError(
                    f"no label files *{self.label_suffix} under {root / self.label_dir}; {self.layout()}"
                )
            ids = [str(p.relative_to(root / self.label_dir))[: -len(_suffix(p, self))] for p in labels]
        pairs = []
        for i, label in zip(ids, labels, strict=True):
            label = self._stored_label(label)
            image = root / self.image_dir / f"{i}{self.image_suffix}"
            if not label.is_file():
                raise BenchmarkError(f"label {label} of {self.name} image {i!r} does not exist; {self.layout()}")
            if not image.is_file():
                raise BenchmarkError(f"image {image} for label {label} does not exist; {self.layout()}")
            pairs.append((i, image, label))
        return pairs

    def _listed_ids(self, split: Path) -> list[str]:
        if not split.is_file():
            raise BenchmarkError(f"image list {split} does not exist; {self.layout()}")
        ids = [line.strip() for line in split.read_text().splitlines() if line.strip()]
        if not ids:
            raise BenchmarkError(f"image list {split} is empty; it should hold one image id per line")
        return ids

    def _stored_label(self, label: Path) -> Path:
        """The converted label beside a stuff label when one exists (COCO-Object), else the label itself."""
        if self.alt_label_suffix and label.name.endswith(self.label_suffix):
            converted = label.with_name(label.name[: -len(self.label_suffix)] + self.alt_label_suffix)
            if converted.is_file():
                return converted
        return label

    def read_label(self, path: Path) -> np.ndarray:
        """The class ids [H, W] int64 of a stored label file (VOID = 255 ignored); a value outside 0..num_classes-1
        other than VOID is an error naming the file."""
        with Image.open(path) as image:
            stored = np.asarray(image)
        if stored.ndim != 2:
            raise BenchmarkError(f"label {path} has shape {stored.shape}; expected one channel of class ids")
        label = stored.astype(np.int64)
        if self.convert is not None and not path.name.endswith(self.alt_label_suffix or "\0"):
            label = self.convert(label)
        if self.reduce_zero:
            label = reduce_zero_label(label)
        bad = np.unique(label[(label >= self.num_classes) & (label != VOID)])
        if bad.size:
            raise BenchmarkError(
                f"label {path} holds values {bad.tolist()[:10]} outside {self.name}'s classes 0..{self.num_classes - 1}"
                f" (after {'reducing the zero label' if self.reduce_zero else 'reading'}); is it a {self.name} label?"
            )
        return label


def _suffix(path: Path, benchmark: Benchmark) -> str:
    return benchmark.label_suffix if path.name.endswith(benchmark.label_suffix) else benchmark.alt_label_suffix


_VOC = dict(
    root_hint="VOCdevkit/VOC2012", image_dir="JPEGImages", label_dir="SegmentationClass", image_suffix=".jpg",
    label_suffix=".png", split_file="ImageSets/Segmentation/val.txt",
)  # fmt: skip
_CONTEXT = dict(
    root_hint="VOCdevkit/VOC2010", image_dir="JPEGImages", label_dir="SegmentationClassContext", image_suffix=".jpg",
    label_suffix=".png", split_file="ImageSets/SegmentationContext/val.txt",
)  # fmt: skip
_STUFF = dict(
    root_hint="coco_stuff164k", image_dir="images/val2017", label_dir="annotations/val2017", image_suffix=".jpg",
    label_suffix="_labelTrainIds.png",
)  # fmt: skip

BENCHMARKS: dict[str, Benchmark] = {
    "voc21": Benchmark("voc21", "VOC21", "voc21.txt", 21, True, **_VOC),
    "context60": Benchmark("context60", "PC60", "context60.txt", 60, True, **_CONTEXT),
    "coco_object": Benchmark(
        "coco_object",
        "Object",
        "coco_object.txt",
        81,
        True,
        convert=coco_object_from_stuff,
        alt_label_suffix="_instanceTrainIds.png",
        **_STUFF,
    ),  # fmt: skip
    "voc20": Benchmark("voc20", "VOC20", "voc20.txt", 20, False, reduce_zero=True, **_VOC),
    "context59": Benchmark("context59", "PC59", "context59.txt", 59, False, reduce_zero=True, **_CONTEXT),
    "coco_stuff": Benchmark("coco_stuff", "Stuff", "coco_stuff.txt", 171, False, **_STUFF),
    "cityscapes": Benchmark(
        "cityscapes",
        "City",
        "cityscapes.txt",
        19,
        False,
        root_hint="cityscapes",
        image_dir="leftImg8bit/val",
        label_dir="gtFine/val",
        image_suffix="_leftImg8bit.png",
        label_suffix="_gtFine_labelTrainIds.png",
    ),  # fmt: skip
    "ade20k": Benchmark(
        "ade20k",
        "ADE",
        "ade20k.txt",
        150,
        False,
        root_hint="ADEChallengeData2016",
        image_dir="images/validation",
        label_dir="annotations/validation",
        image_suffix=".jpg",
        label_suffix=".png",
        reduce_zero=True,
    ),  # fmt: skip
}
TABLE_ORDER = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k")


def get_benchmark(name: str) -> Benchmark:
    """The benchmark of a name or of its table title (PC59, Stuff, City, ... in any case); an unknown one suggests
    the closest and lists them all."""
    titles = {b.title.lower(): b for b in BENCHMARKS.values()}
    if name not in BENCHMARKS and name.lower() in titles:
        return titles[name.lower()]
    if name not in BENCHMARKS:
        close = difflib.get_close_matches(name, list(BENCHMARKS), n=1, cutoff=0.4)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise KeyError(f"unknown benchmark {name!r}; {hint}choose from {list(TABLE_ORDER)}")
    return BENCHMARKS[name]


class BenchmarkDataset(Dataset):
    """A benchmark's test images and labels: item i -> (image [3, H, W] uint8 RGB, label [H, W] long, id).

    Args:
        benchmark: a `Benchmark` or its name; root: its folder (see the module docstring).
        limit: only the first `limit` images (0 = all), for a quick look; recorded with the results.
    """

    def __init__(self, benchmark: Benchmark | str, root: str | Path, limit: int = 0):
        self.benchmark = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
        self.root = Path(root)
        self.items = self.benchmark.pairs(self.root)
        self.limit = 0 < limit < len(self.items)  # a run on part of the benchmark
        if limit:
            self.items = self.items[:limit]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, str]:
        image_id, image_path, label_path = self.items[index]
        with Image.open(image_path) as image:
            pixels = np.asarray(image.convert("RGB"))  # as stored, the pixels its label was drawn on
        label = self.benchmark.read_label(label_path)
        if label.shape != pixels.shape[:2]:
            raise BenchmarkError(
                f"label {label_path} is {label.shape[0]}x{label.shape[1]} but image {image_path} is "
                f"{pixels.shape[0]}x{pixels.shape[1]}"
            )
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1), torch.from_numpy(label), image_id

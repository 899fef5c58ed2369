"""Which (image, class) pairs a fold uses: the list conventions of the published codebases, from the masks alone.

`data.lists` picks one:

- `pfenet`: a pair counts when the class covers at least `data.min_pixels` (2 x 32 x 32) pixels of the mask.
  Test pairs: the fold's novel classes in split `data.split`. Training: the base classes in split "trn".
- `bam`: the same pairs, but training keeps only images with no novel-class pixel at all (BAM's filter; this
  convention always drops such images, whatever `data.novel_in_train` says).
- `hsnet`: HSNet's list files from `data.list_dir`: `{trn,val}/fold{f}.txt` with `<image id>__<cc>` lines (cc the
  1-based class id; fold{k}.txt holds fold k's classes, so training on fold f reads the other three trn files), or
  COCO's `{trn,val}/fold{f}.pkl` (HSNet's pickles, `{0-based class: ["train2014/<name>.jpg", ...]}`, read without
  running code) or their json copies `fold{f}.json.gz`; trn/fold{f} already holds fold f's 60 base classes.

`data.novel_in_train`: `background` keeps training images that hold novel objects (they are not the episode class,
so binary masks make them 0: HSNet, PFENet); `drop` removes every training image holding any novel-class pixel.

A benchmark that fixes its classes' images (a source with `fixed_pairs`: the cross-domain targets, FSS-1000) is paired
by its own layout (`source.class_images()`, or every image holding the class when that is None), whatever
`data.lists`: test pairs, and training pairs where it has base classes (FSS-1000's trn classes).
Cross-domain training (data.target set) uses every class of the training dataset as a base class (PATNet's and
DMTNet's `--fold 4`); with `hsnet` lists it reads the trn files of all folds.
"""

from __future__ import annotations

import gzip
import json
import logging
import pickle
from pathlib import Path, PurePosixPath
from typing import Any, get_args

from episodes.base import IMAGE_SUFFIXES, DataError, Source
from episodes.index import MaskIndex
from fewshot.config import DataConfig, ListConvention, NovelInTrain

logger = logging.getLogger(__name__)

LISTS = get_args(ListConvention)
NOVEL_IN_TRAIN = get_args(NovelInTrain)


def strip_image_name(token: str) -> str:
    """`JPEGImages/2007_000032.jpg` -> `2007_000032`: the file name without folder and image extension."""
    name = PurePosixPath(token.replace("\\", "/")).name
    stem, dot, suffix = name.rpartition(".")
    return stem if dot and f".{suffix.lower()}" in IMAGE_SUFFIXES else name


def read_id_list(path: str | Path) -> list[tuple[int, str]]:
    """(1-based line number, image id) of each line of an id list, first occurrences only, in file order.

    A line is an id, a file name, or PFENet's `<image path> <mask path>`; blank lines and `#` comments are skipped.
    A list without any id raises DataError naming it.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"id list {path} cannot be read ({err})") from err
    out: list[tuple[int, str]] = []
    seen: set[str] = set()
    for line_no, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        image_id = strip_image_name(line.split()[0])
        if image_id not in seen:
            seen.add(image_id)
            out.append((line_no, image_id))
    if not out:
        raise DataError(
            f"id list {path} is empty: it holds no image id (only blank lines or # comments); write one id per line"
        )
    if len(out) < sum(1 for line in lines if line.strip() and not line.lstrip().startswith("#")):
        logger.info("id list %s repeats some ids; each is kept once", path)
    return out


def _check(data: DataConfig) -> None:
    if data.lists not in LISTS:
        raise ValueError(f"unknown list convention data.lists={data.lists!r}; choose from {', '.join(LISTS)}")
    if data.novel_in_train not in NOVEL_IN_TRAIN:
        raise ValueError(
            f"data.novel_in_train={data.novel_in_train!r} is not valid; choose from {', '.join(NOVEL_IN_TRAIN)}"
        )


def _by_threshold(index: MaskIndex, classes: list[int], min_pixels: int) -> dict[int, list[str]]:
    wanted = set(classes)
    pairs: dict[int, list[str]] = {c: [] for c in sorted(classes)}
    for image_id in index.image_ids:
        for c, n in index.classes(image_id).items():
            if c in wanted and n >= min_pixels:
                pairs[c].append(image_id)
    return pairs


def eval_pairs(source: Source, data: DataConfig) -> dict[int, list[str]]:
    """The fold's novel class id -> ids of split `data.split` in which the class counts under `data.lists`.

    Every novel class is a key (ascending), possibly with an empty list; ids are in list order.
    """
    _check(data)
    _, novel = source.fold_classes(data.fold)
    if getattr(source, "fixed_pairs", False):
        pools = source.class_images()
        if pools is not None:
            return {c: list(pools[c]) for c in sorted(novel)}
        index = MaskIndex.load_or_build(source, data.split, data.cache_dir or None)
        return _by_threshold(index, novel, 1)
    if data.lists == "hsnet":
        return read_hsnet_pairs(source, data.list_dir, data.split, data.fold, novel, training=False)
    index = MaskIndex.load_or_build(source, data.split, data.cache_dir or None)
    return _by_threshold(index, novel, data.min_pixels)


def train_pairs(source: Source, data: DataConfig) -> dict[int, list[str]]:
    """The fold's base class id -> training ids (split "trn") in which it counts, after `lists` and `novel_in_train`.

    Every base class is a key (ascending); ids are in list order.
    """
    _check(data)
    every_class = bool(data.target.dataset)  # cross-domain: no class of the training dataset is held out
    base, novel = (sorted(source.class_names), []) if every_class else source.fold_classes(data.fold)
    pools = source.class_images() if getattr(source, "fixed_pairs", False) else None
    if pools is not None:  # a benchmark with fixed class images (FSS-1000: every image of its trn classes' folders)
        return {c: list(pools[c]) for c in sorted(base)}
    drop = data.lists == "bam" or data.novel_in_train == "drop"
    index = None
    if data.lists == "hsnet":
        fold = None if every_class else data.fold
        pairs = read_hsnet_pairs(source, data.list_dir, "trn", fold, base, training=True)
    else:
        index = MaskIndex.load_or_build(source, "trn", data.cache_dir or None)
        pairs = _by_threshold(index, base, data.min_pixels)
    if not drop:
        return pairs
    index = index or MaskIndex.load_or_build(source, "trn", data.cache_dir or None)
    novel_set = set(novel)

    def clean(image_id: str) -> bool:
        if image_id not in index:
            raise DataError(
                f"training image {image_id!r} is not in the {source.name} 'trn' id list, so its novel "
                "classes are unknown; use a train list that holds every image of data.list_dir"
            )
        return novel_set.isdisjoint(index.classes(image_id))

    return {c: [i for i in ids if clean(i)] for c, ids in pairs.items()}


# ------------------------------------------------------------------------------------------------------------------
# HSNet's list files.


def _hsnet_files(list_dir: Path, split: str, fold: int | None, training: bool, num_folds: int) -> list[Path]:
    """The list files of a fold (fold None: of every fold, for training on all classes)."""
    folder = list_dir / split
    for suffix in (".json.gz", ".pkl"):  # COCO: HSNet's pickles or their json copies, one file per fold
        if fold is None and (folder / f"fold0{suffix}").is_file():
            return [folder / f"fold{k}{suffix}" for k in range(num_folds)]
        if (folder / f"fold{fold}{suffix}").is_file():
            return [folder / f"fold{fold}{suffix}"]
    folds = [k for k in range(num_folds) if k != fold] if training else [fold]
    files = [folder / f"fold{k}.txt" for k in folds]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        last = num_folds - 1
        raise DataError(
            f"HSNet list file(s) {', '.join(missing)} do not exist; data.list_dir must hold "
            f"{{trn,val}}/fold{{0..{last}}}.txt (HSNet's data/splits/pascal) or {{trn,val}}/fold{{0..{last}}}.pkl "
            "(HSNet's data/splits/coco, or their .json.gz copies)"
        )
    return files


class _PlainUnpickler(pickle.Unpickler):
    """Reads pickles of dicts, lists, strings and numbers only (HSNet's COCO lists): a pickle naming any class or
    function, the only way a pickle runs code, is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it names {module}.{name}; an HSNet list holds only dicts, lists and strings")


def _read_table(path: Path) -> Any:
    """The {class index: [image paths]} table of a COCO list: HSNet's pickle or its json.gz copy."""
    try:
        if path.name.endswith(".pkl"):
            with open(path, "rb") as f:
                return _PlainUnpickler(f).load()
        with gzip.open(path, "rt") as f:
            return json.load(f)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise DataError(f"HSNet list {path} cannot be read ({err})") from err


def _parse_hsnet_file(path: Path) -> list[tuple[int, str, int]]:
    """(line or entry number, image id, 1-based class id) of one HSNet list file."""
    out: list[tuple[int, str, int]] = []
    if path.name.endswith((".json.gz", ".pkl")):
        table = _read_table(path)
        if not isinstance(table, dict):
            raise DataError(f"HSNet list {path} must hold a dict {{class index: [image paths]}}")
        for key in sorted(table, key=int):
            for n, name in enumerate(table[key], 1):
                out.append((n, strip_image_name(name), int(key) + 1))
        return out
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        image_id, sep, cc = line.rpartition("__")
        if not sep or not image_id or not cc.isdigit():
            raise DataError(f"{path}, line {line_no}: {line!r} is not of the form <image id>__<class id>")
        out.append((line_no, image_id, int(cc)))
    if not out:
        raise DataError(f"HSNet list {path} is empty; it must hold one <image id>__<class id> line per pair")
    return out


def read_hsnet_entries(list_dir: str | Path, split: str, fold: int, num_folds: int) -> list[tuple[str, int]]:
    """(image id, 1-based class id) of every entry of fold `fold`'s HSNet file of `split`, in file order with any
    repeats, as HSNet's test reads it: the PASCAL-5i query walk, and each class's list to draw from."""
    (path,) = _hsnet_files(Path(list_dir).expanduser(), split, fold, False, num_folds)
    return [(image_id, c) for _, image_id, c in _parse_hsnet_file(path)]


def read_hsnet_pairs(
    source: Source, list_dir: str | Path, split: str, fold: int | None, classes: list[int], training: bool
) -> dict[int, list[str]]:
    """class id -> ids (file order, first occurrence) from HSNet's files; every listed class must be in `classes`.

    Args:
        split: "trn" or "val" (the sub-folder of list_dir).
        fold: the fold; None reads the files of every fold (training on all classes).
        training: the train pool (txt files: the other folds' files) rather than the fold's own file.
    """
    if not list_dir:
        raise ValueError(
            "data.lists='hsnet' reads HSNet's list files: set data.list_dir to a folder with "
            "{trn,val}/fold{f}.txt (HSNet's data/splits/pascal) or {trn,val}/fold{f}.pkl (data/splits/coco)"
        )
    known = set(source.image_ids(split))
    wanted = set(classes)
    pairs: dict[int, list[str]] = {c: [] for c in sorted(classes)}
    seen: set[tuple[str, int]] = set()
    for path in _hsnet_files(Path(list_dir).expanduser(), split, fold, training, source.num_folds):
        for where, image_id, c in _parse_hsnet_file(path):
            if c not in wanted:
                role = "base" if training else "novel"
                of = "the training classes" if fold is None else f"fold {fold}"
                raise DataError(
                    f"{path}, entry {where}: class {c} is not a {role} class of {of} for "
                    f"{source.name} ({sorted(wanted)}); check data.list_dir, data.fold and the fold split"
                )
            if image_id not in known:
                raise DataError(
                    f"{path}, entry {where}: image {image_id!r} is not in the {source.name} {split!r} "
                    "id list; point data.list_dir and the source's lists at the same data"
                )
            if (image_id, c) not in seen:
                seen.add((image_id, c))
                pairs[c].append(image_id)
    return pairs

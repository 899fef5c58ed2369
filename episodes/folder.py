"""Any folder of images and masks as a Source: the FSS-1000 layout, or a generic images/ + masks/ layout.

FSS-1000 layout (chosen when root has no images/ + masks/ folders)::

    <class name>/<n>.jpg + <n>.png      binary masks (grey level >= 128 is the class, as HSNet reads them)

Class ids are the class folders (sub-folders holding images) in sorted order (1-based); image ids are `<class>/<n>`.
A file without its partner (a .jpg without its .png mask, a mask without its image, a mask of another format) is
left out with one warning that counts them; a class folder left with fewer than `min_images` (shots + 1) pairs is
refused, naming it. With `list_dir` holding
class-name files `trn.txt` plus `test.txt` and/or `val.txt` (HSNet's data/splits/fss), split "trn" holds the images
of the trn classes and split "val" those of the test and val classes; fold 0 tests the test classes (the FSS-1000
benchmark) and fold 1 the val classes, both with the trn classes as base. Without `list_dir` both splits hold every
image and the classes are cut into `folds` contiguous blocks as in PASCAL-5i (`episodes.folds.block_fold`). A class's
episodes draw from every image of its folder (`class_images`, as HSNet's FSS-1000 loader does).

`Fss1000Source` (data.dataset=fss1000) is this layout as the FSS-1000 benchmark: one fold, HSNet's 240 test classes
(or, with data.fss1000.classes=val, its 240 val classes: PATNet's and DMTNet's validation set during training).

Generic layout (bring your own data)::

    images/<id>.<jpg|png|...>   masks/<id>.png   classes.txt   [train / val id lists, optional]

`classes.txt` gives one class per line, either a bare name (line k = mask value k = class k) or `<mask value> <name>`
(class ids 1..N in file order, for masks whose values are not 1..N, e.g. CamVid's 0-based labels). In the masks,
0 is background unless classes.txt lists it; any value it does not list (255 included) is void. With `binary`,
masks are figure/ground images of the single class in classes.txt (grey level >= 128 is the class; any mode,
JPEG masks too); without classes.txt the class is named after the root folder. Splits come from `train_list` /
`val_list` (one id or file name per line); without them both splits hold every image. Folds: 4 contiguous blocks
of classes as in PASCAL-5i when there are at least 4 classes, else a single fold 0 with every class novel and no
base class (a test-only, cross-domain set). `folds` sets the number of blocks (data.folder.folds).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from episodes.base import IMAGE_SUFFIXES, DataError
from episodes.folds import block_fold, check_fold
from episodes.lists import read_id_list, strip_image_name
from episodes.pascal import SPLITS, check_mask_size, file_signature, open_label, read_rgb, resolve_under

logger = logging.getLogger(__name__)

FOLDER_HELP = (
    "a folder dataset is either FSS-1000-like (<class>/<n>.jpg + <n>.png binary masks) or generic (images/<id>.jpg, "
    "masks/<id>.png with class-index values, classes.txt with one class name per line); see episodes/folder.py"
)
FSS_SPLIT_FILES = ("trn", "test", "val")  # fold 0 tests test.txt's classes, fold 1 val.txt's
FSS_TESTED = ("test", "val")  # the class files that define folds, in fold order
FSS_IMAGE_SUFFIXES = (".jpg", ".jpeg")  # FSS-1000: <n>.jpg beside its <n>.png mask
EXAMPLES = 3  # files named per kind in a warning


def _parse_classes(path: Path) -> tuple[list[str], list[int]]:
    """(names, mask values) from classes.txt: bare names (value = line number) or `<value> <name>` lines."""
    try:
        lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"class file {path} cannot be read ({err})") from err
    if not lines:
        raise DataError(f"class file {path} is empty; write one class name per line")
    valued = [len(parts) == 2 and parts[0].isdigit() for parts in (line.split(maxsplit=1) for _, line in lines)]
    if any(valued) and not all(valued):
        raise DataError(f"class file {path} mixes '<value> <name>' lines and bare names; use one style")
    names, values = [], []
    for (line_no, line), has_value in zip(lines, valued, strict=True):
        value, name = (int(line.split(maxsplit=1)[0]), line.split(maxsplit=1)[1]) if has_value else (line_no, line)
        if not 0 <= value <= 254 or value in values:
            raise DataError(f"{path}, line {line_no}: mask value {value} is repeated or outside 0..254 (255 is void)")
        names.append(name.strip())
        values.append(value)
    return names, values


def _list_images(folder: Path) -> dict[str, Path]:
    return {strip_image_name(e.name): Path(e.path) for e in os.scandir(folder)
            if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)}  # fmt: skip


def read_binary_mask(path: Path, hint: str = FOLDER_HELP) -> np.ndarray:
    """A figure/ground mask [H, W] uint8: 1 where the grey level is >= 128 (HSNet's and PATNet's rule), else 0.

    Any image mode is read (converted to grey as PIL's "L" does), so JPEG masks with compression noise work too.
    """
    if not path.is_file():
        raise DataError(f"mask {path} does not exist; {hint}")
    try:
        with Image.open(path) as im:
            return (np.asarray(im.convert("L")) >= 128).astype(np.uint8)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"mask {path} cannot be read ({err}); replace the file with a valid image") from err


class FolderSource:
    """A folder of images and masks, FSS-1000 or generic layout (see the module docstring).

    Args:
        root: the dataset folder.
        list_dir: FSS layout only: folder with class-name files trn.txt, test.txt, val.txt.
        train_list, val_list: generic layout: id lists of split "trn" / "val"; "" = every image.
        binary: generic layout: masks are single-class figure/ground images (>= 128 is the class).
        min_images: FSS layout: the fewest image/mask pairs a class folder may hold (shots + 1 for an episode).
        folds: number of contiguous class blocks when no list_dir defines the folds (1 = every class novel).
        tested: FSS layout with list_dir: the class files whose classes the folds test, in fold order.
        layout: "auto" (generic when root holds images/ and masks/), or "fss" to require the FSS layout.
    """

    name = "folder"
    parallel_scan = True  # class_pixels only reads one mask

    def __init__(
        self,
        root: str | Path,
        list_dir: str = "",
        train_list: str = "",
        val_list: str = "",
        binary: bool = False,
        min_images: int = 2,
        folds: int = 4,
        tested: tuple[str, ...] = FSS_TESTED,
        layout: str = "auto",
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{self.name} dataset root {self.root} does not exist; {FOLDER_HELP}")
        if folds < 1:
            raise ValueError(f"a folder dataset needs at least 1 fold, got folds={folds}")
        self.binary = binary
        self._num_blocks = folds
        self._ids: dict[str, list[str]] = {}
        self._signature_files: list[Path] = []
        if layout == "auto" and (self.root / "images").is_dir() and (self.root / "masks").is_dir():
            self.layout = "generic"
            self._init_generic(train_list, val_list)
        else:
            self.layout = "fss"
            self.binary = True
            self._init_fss(list_dir, min_images, tested)
        self.num_folds = len(self._folds)

    def __repr__(self) -> str:
        return f"FolderSource(root={str(self.root)!r}, layout={self.layout!r}, classes={len(self.class_names)})"

    # -- generic layout ---------------------------------------------------------------------------------------------

    def _init_generic(self, train_list: str, val_list: str) -> None:
        classes_file = self.root / "classes.txt"
        if classes_file.is_file():
            names, values = _parse_classes(classes_file)
            self._signature_files.append(classes_file)
        elif self.binary:
            names, values = [self.root.name], [1]
        else:
            raise DataError(
                f"class file {classes_file} does not exist; write one class name per line "
                "(line k names the class of mask value k)"
            )
        if self.binary and len(names) != 1:
            raise DataError(f"binary masks hold one class, but {classes_file} lists {len(names)}")
        self.class_names = {i + 1: name for i, name in enumerate(names)}
        self._lut = np.full(256, 255, np.uint8)  # mask value -> class id (0 background, 255 void)
        self._lut[0] = 0
        for class_id, value in enumerate(values, 1):
            self._lut[value] = class_id
        self._images = _list_images(self.root / "images")
        masks = _list_images(self.root / "masks")
        missing = sorted(set(self._images) - set(masks))
        if missing:
            raise DataError(
                f"{len(missing)} image(s) in {self.root / 'images'} have no mask in "
                f"{self.root / 'masks'}, e.g. {missing[0]!r}; add the masks or remove the images"
            )
        self._masks = {i: masks[i] for i in self._images}
        unpaired = sorted(set(masks) - set(self._images))
        if unpaired:
            logger.warning(
                "%d mask(s) in %s have no image in %s and are left out, e.g. %s",
                len(unpaired), self.root / "masks", self.root / "images", unpaired[:EXAMPLES],
            )  # fmt: skip
        self._class_of: dict[str, int] = {}
        lists = {"trn": train_list, "val": val_list}
        for split, path in ((s, resolve_under(self.root, p) if p else None) for s, p in lists.items()):
            if path is None:
                self._ids[split] = sorted(self._images)
                continue
            if not path.is_file():
                raise DataError(f"id list {path} (split {split!r}) does not exist; fix data.train_list / val_list")
            self._signature_files.append(path)
            ids = []
            for line_no, image_id in read_id_list(path):
                if image_id not in self._images:
                    raise DataError(
                        f"{path}, line {line_no}: {image_id!r} has no image in {self.root / 'images'}; "
                        "fix or remove the line"
                    )
                ids.append(image_id)
            self._ids[split] = ids
        self._folds = self._block_folds()

    # -- FSS-1000 layout --------------------------------------------------------------------------------------------

    def _init_fss(self, list_dir: str, min_images: int, tested: tuple[str, ...]) -> None:
        self._images, self._masks, self._class_of = {}, {}, {}
        folders = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        dropped: dict[str, list[str]] = {"image(s) without a .png mask": [], "mask(s) without a .jpg image": [],
                                         "file(s) of another format": []}  # fmt: skip
        pairs: dict[str, list[tuple[str, str, str]]] = {}  # class folder -> (stem, image file, mask file), name order
        for name in folders:
            files = sorted(e.name for e in os.scandir(self.root / name) if e.is_file() and not e.name.startswith("."))
            if not any(f.lower().endswith(IMAGE_SUFFIXES) for f in files):
                continue  # no image at all: not a class folder
            masks = {os.path.splitext(f)[0]: f for f in files if f.lower().endswith(".png")}
            images = {os.path.splitext(f)[0]: f for f in files if f.lower().endswith(FSS_IMAGE_SUFFIXES)}
            pairs[name] = [(stem, f, masks[stem]) for stem, f in ((os.path.splitext(f)[0], f) for f in files)
                           if f.lower().endswith(FSS_IMAGE_SUFFIXES) and stem in masks]  # fmt: skip
            dropped["image(s) without a .png mask"] += [f"{name}/{f}" for k, f in images.items() if k not in masks]
            dropped["mask(s) without a .jpg image"] += [f"{name}/{f}" for k, f in masks.items() if k not in images]
            kept = {*images.values(), *masks.values()}
            dropped["file(s) of another format"] += [f"{name}/{f}" for f in files if f not in kept]
        if not pairs:
            raise DataError(f"{self.root} holds neither images/ + masks/ nor class folders with images; {FOLDER_HELP}")
        if any(dropped.values()):
            logger.warning(
                "FSS layout %s: %d file(s) without a partner are left out: %s",
                self.root, sum(map(len, dropped.values())),
                "; ".join(f"{len(v)} {k} (e.g. {', '.join(v[:EXAMPLES])})" for k, v in dropped.items() if v),
            )  # fmt: skip
        short = {name: len(stems) for name, stems in pairs.items() if len(stems) < min_images}
        if short:
            shown = ", ".join(f"{self.root / name} ({n})" for name, n in list(short.items())[:EXAMPLES])
            raise DataError(
                f"{len(short)} class folder(s) hold fewer than shots + 1 = {min_images} image/mask pairs "
                f"(<n>.jpg beside its <n>.png mask): {shown}{' ...' if len(short) > EXAMPLES else ''}; add pairs, "
                "convert the masks to PNG, remove the folders, or use fewer shots"
            )
        self.class_names = {i + 1: name for i, name in enumerate(pairs)}
        for class_id, name in self.class_names.items():
            for stem, image, mask in pairs[name]:
                image_id = f"{name}/{stem}"
                self._images[image_id], self._masks[image_id] = self.root / name / image, self.root / name / mask
                self._class_of[image_id] = class_id
        if not list_dir:
            self._ids = {s: list(self._images) for s in SPLITS}
            self._folds = self._block_folds()
            return
        class_id = {name: c for c, name in self.class_names.items()}
        groups: dict[str, list[int]] = {}
        for key in FSS_SPLIT_FILES:
            path = Path(list_dir).expanduser() / f"{key}.txt"
            if path.is_file():
                self._signature_files.append(path)
                groups[key] = []
                for line_no, line in enumerate(path.read_text().splitlines(), 1):
                    if line.strip() and line.strip() not in class_id:
                        raise DataError(f"{path}, line {line_no}: class {line.strip()!r} has no folder in {self.root}")
                    if line.strip():
                        groups[key].append(class_id[line.strip()])
                if not groups[key]:
                    raise DataError(f"class split file {path} is empty; write one class folder name per line")
        wanted = [k for k in tested if k in groups]
        if "trn" not in groups or not wanted:
            files = " and/or ".join(f"{k}.txt" for k in tested)
            raise DataError(f"{list_dir} must hold trn.txt and {files} (class names, one per line)")
        novels = [sorted(groups[k]) for k in wanted]
        self._folds = [(sorted(groups["trn"]), novel) for novel in novels]
        eval_classes = {c for novel in novels for c in novel}
        trn_classes = set(groups["trn"])
        self._ids = {
            "trn": [i for i in self._images if self._class_of[i] in trn_classes],
            "val": [i for i in self._images if self._class_of[i] in eval_classes],
        }

    def _block_folds(self) -> list[tuple[list[int], list[int]]]:
        n, blocks = len(self.class_names), self._num_blocks
        if n < blocks:  # too few classes for the blocks: one test-only fold
            blocks = 1
        return [block_fold(n, f, blocks) for f in range(blocks)]

    # -- Source protocol --------------------------------------------------------------------------------------------

    def image_ids(self, split: str) -> list[str]:
        """Ids of `split` in list order (sorted when no list is given)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
        return list(self._ids[split])

    def _path(self, table: dict[str, Path], image_id: str) -> Path:
        try:
            return table[image_id]
        except KeyError:
            raise DataError(f"image id {image_id!r} is not in the folder dataset {self.root}") from None

    def load_image(self, image_id: str) -> np.ndarray:
        """RGB image [H, W, 3] uint8."""
        return read_rgb(self._path(self._images, image_id), FOLDER_HELP)

    def load_label(self, image_id: str) -> np.ndarray:
        """Class-id mask [H, W] uint8 (0 background, 1..N, 255 void) of a class-index (not binary) mask."""
        if self.binary:
            raise ValueError("binary masks hold one class per image; use load_class_mask")
        with open_label(self._path(self._masks, image_id), FOLDER_HELP) as im:
            return self._lut[np.asarray(im)]

    def _read_binary(self, path: Path) -> np.ndarray:
        return read_binary_mask(path)

    def load_class_mask(self, image_id: str, class_id: int) -> np.ndarray:
        """Binary mask [H, W] uint8 of `class_id`: other classes 0, void 255. A mask of another size than its image
        raises DataError naming both (check_mask_size)."""
        mask_path, image_path = self._path(self._masks, image_id), self._path(self._images, image_id)
        if self.binary:
            foreground = check_mask_size(self._read_binary(mask_path), mask_path, image_path, FOLDER_HELP)
            return foreground if self._class_of.get(image_id, 1) == class_id else np.zeros_like(foreground)
        label = check_mask_size(self.load_label(image_id), mask_path, image_path, FOLDER_HELP)
        mask = (label == class_id).astype(np.uint8)
        mask[label == 255] = 255
        return mask

    def class_pixels(self, image_id: str) -> dict[int, int]:
        """Pixel count of each class in the mask (from the histogram for class-index masks)."""
        if self.binary:
            count = int(self._read_binary(self._path(self._masks, image_id)).sum())
            return {self._class_of.get(image_id, 1): count} if count else {}
        with open_label(self._path(self._masks, image_id), FOLDER_HELP) as im:
            hist = im.histogram()
        counts: dict[int, int] = {}
        for value, n in enumerate(hist):
            class_id = int(self._lut[value])
            if n and class_id not in (0, 255):
                counts[class_id] = counts.get(class_id, 0) + n
        return counts

    def fold_classes(self, fold: int) -> tuple[list[int], list[int]]:
        """(base, novel); the folds depend on the layout and the class splits (see the module docstring)."""
        check_fold(fold, self.num_folds, f"{self.name} dataset {self.root}")
        base, novel = self._folds[fold]
        return list(base), list(novel)

    def fingerprint(self, split: str) -> str:
        """Changes with any mask of the split, the class and list files, or the binary setting."""
        files = [*self._signature_files, *(self._masks[i] for i in self.image_ids(split))]
        return hashlib.sha1(f"{file_signature(files)}\0binary={self.binary}".encode()).hexdigest()

    def identity(self) -> dict[str, Any]:
        """The root and its layout, which place every image (`images/<id>.*` or `<class>/<n>.jpg`); masks, class
        files and lists do not change pixels."""
        return {"source": self.name, "root": str(self.root.resolve()), "layout": self.layout}


FSS1000_CLASSES = ("test", "val")  # data.fss1000.classes: HSNet's test split (the benchmark) or its val split


class Fss1000Source(FolderSource):
    """FSS-1000 (`<class>/<n>.jpg` + `<n>.png`) as a benchmark: one fold of HSNet's 240 test (or val) classes.

    The fold's base classes are HSNet's 520 trn classes (FSS-1000 in-domain); a cross-domain run trains elsewhere.
    Episodes walk every image of the tested classes once each (HSNet, PATNet, DMTNet: 2,400 test episodes).

    Args:
        root: the FSS-1000 folder (one folder per class).
        splits: HSNet's data/splits/fss: trn.txt, val.txt, test.txt (class folder names, one per line).
        classes: "test" (the benchmark) or "val" (the validation classes PATNet and DMTNet select models on).
        min_images: the fewest image/mask pairs a class folder may hold.
    """

    name = "fss1000"
    fixed_pairs = True  # a class's images are its folder, whatever data.lists says

    def __init__(self, root: str | Path, splits: str, classes: str = "test", min_images: int = 2) -> None:
        if classes not in FSS1000_CLASSES:
            raise ValueError(f"data.fss1000.classes={classes!r} is not valid; choose from {', '.join(FSS1000_CLASSES)}")
        if not splits:
            raise ValueError(
                "data.dataset=fss1000 needs HSNet's FSS-1000 class splits: set data.fss1000.splits to a folder "
                "holding trn.txt, val.txt and test.txt (HSNet's data/splits/fss)"
            )
        self.classes = classes
        super().__init__(root, list_dir=splits, min_images=min_images, tested=(classes,), layout="fss")

    def class_images(self) -> dict[int, list[str]]:
        """Class id -> every image of its folder, in file order (HSNet's FSS-1000 episodes use them all)."""
        out: dict[int, list[str]] = {c: [] for c in self.class_names}
        for image_id, class_id in self._class_of.items():
            out[class_id].append(image_id)
        return out

"""The mask index: image id -> {class id: pixel count} for one source and split, built once and cached on disk.

Built by scanning the masks only (images are never opened), in worker processes when the source allows it
(`source.parallel_scan`). The cache is a JSON file named after the source name, split, root and
`source.fingerprint(split)`, so editing, adding or removing masks or changing the id list rebuilds it. It lives in
`cache_dir`, by default `<root>/.fewshot_cache`, or in the user cache (`$XDG_CACHE_HOME/fewshot`, else
`~/.cache/fewshot`) when the dataset root is read-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import stat
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from episodes.base import DataError, Source
from fewshot.io import write_text

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
PARALLEL_MIN_IMAGES = 1000  # below this a process pool costs more than it saves


def _scan(source: Source, image_ids: list[str]) -> list[dict[int, int]]:
    return [source.class_pixels(image_id) for image_id in image_ids]


def user_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/fewshot`, else `~/.cache/fewshot`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fewshot"


def _writable(path: Path) -> bool:
    """True when `path` (or its nearest existing parent) can be written, also for root on a read-only-mode tree."""
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    return os.access(path, os.W_OK) and bool(path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def default_cache_dir(root: Path) -> Path:
    """`<root>/.fewshot_cache`, or the user cache dir when the root is read-only."""
    local = Path(root) / ".fewshot_cache"
    return local if _writable(local) else user_cache_dir()


class MaskIndex:
    """Classes and their pixel counts per image of one split (no void, no background).

    Attributes:
        image_ids: the split's ids in list order.
        fingerprint: `source.fingerprint(split)` at build time ("" when built by hand).
    """

    def __init__(self, image_ids: list[str], counts: list[dict[int, int]], fingerprint: str = "") -> None:
        if len(image_ids) != len(counts):
            raise ValueError(f"{len(image_ids)} image ids but {len(counts)} count dicts")
        self.image_ids = list(image_ids)
        self.fingerprint = fingerprint
        self._counts = dict(zip(self.image_ids, counts, strict=True))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._counts

    def classes(self, image_id: str) -> dict[int, int]:
        """{class id: pixel count} of the classes present in the image's mask."""
        try:
            return dict(self._counts[image_id])
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in this mask index ({len(self)} images)") from None

    def images_with(self, class_id: int, min_pixels: int = 1) -> list[str]:
        """Ids (list order) whose mask holds at least `min_pixels` pixels of `class_id`."""
        return [i for i in self.image_ids if self._counts[i].get(class_id, 0) >= min_pixels]

    # ---------------------------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, source: Source, split: str, workers: int | None = None, fingerprint: str | None = None) -> MaskIndex:
        """Scans every mask of `split` (in `workers` processes; None = one per CPU, at most 8)."""
        start = time.perf_counter()
        fingerprint = source.fingerprint(split) if fingerprint is None else fingerprint
        ids = source.image_ids(split)
        workers = min(os.cpu_count() or 1, 8) if workers is None else workers
        serial = workers <= 1 or len(ids) < PARALLEL_MIN_IMAGES or multiprocessing.current_process().daemon
        if serial or not getattr(source, "parallel_scan", False):  # daemons (DataLoader workers) cannot fork
            counts = _scan(source, ids)
        else:
            size = max(64, len(ids) // (workers * 8))
            chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
            with ProcessPoolExecutor(max_workers=workers) as pool:
                counts = [c for part in pool.map(_scan, [source] * len(chunks), chunks) for c in part]
        logger.info("scanned %d masks of %s/%s in %.1f s", len(ids), source.name, split, time.perf_counter() - start)
        return cls(ids, counts, fingerprint)

    def save(self, path: str | Path, source_name: str = "", split: str = "") -> None:
        """Writes the index atomically as JSON: one `[class, pixels, class, pixels, ...]` row per image."""
        rows = [[v for item in sorted(self._counts[i].items()) for v in item] for i in self.image_ids]
        data = {
            "version": CACHE_VERSION,
            "source": source_name,
            "split": split,
            "fingerprint": self.fingerprint,
            "image_ids": self.image_ids,
            "classes": rows,
        }
        write_text(path, json.dumps(data, separators=(",", ":")))

    @classmethod
    def load(cls, path: str | Path) -> MaskIndex:
        """Reads a file written by `save`; DataError naming it when it is not one."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("version") != CACHE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {CACHE_VERSION}")
            counts = [dict(zip(row[0::2], row[1::2], strict=True)) for row in data["classes"]]
            return cls(data["image_ids"], counts, data["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise DataError(f"mask index {path} is unreadable ({err}); delete it to rebuild") from err

    @staticmethod
    def cache_path(source: Source, split: str, fingerprint: str, cache_dir: str | Path | None = None) -> Path:
        """Where the index is cached: one file per source name, split, root and fingerprint.

        Keying by fingerprint lets two id lists over one root (PFENet's and the standard one) keep their own file.
        """
        folder = default_cache_dir(source.root) if not cache_dir else Path(cache_dir).expanduser()
        root_key = hashlib.sha1(str(Path(source.root).resolve()).encode()).hexdigest()[:8]
        fp_key = hashlib.sha1(fingerprint.encode()).hexdigest()[:12]
        return folder / f"maskindex-{source.name}-{split}-{root_key}-{fp_key}.json"

    @classmethod
    def load_or_build(cls, source: Source, split: str, cache_dir: str | Path | None = None) -> MaskIndex:
        """The cached index when its fingerprint still matches the source, else a fresh scan (then cached).

        Args:
            cache_dir: folder of the cache files; None or "" = `<root>/.fewshot_cache`, or the user cache dir when
                the root is read-only.
        """
        fingerprint = source.fingerprint(split)
        path = cls.cache_path(source, split, fingerprint, cache_dir)
        if path.is_file():
            try:
                index = cls.load(path)
            except DataError as err:
                logger.warning("%s; rebuilding it", err)
            else:
                if index.fingerprint == fingerprint:
                    return index
                logger.warning("mask index %s does not match its name's fingerprint; rebuilding it", path)
        index = cls.build(source, split, fingerprint=fingerprint)
        try:
            index.save(path, source.name, split)
        except OSError as err:
            logger.warning(
                "cannot write the mask index cache %s (%s); set data.cache_dir to a writable folder", path, err
            )
        return index

"""The feature store behind `fewshot.cache.Encoder`: backbone features by image id, computed once per key and id.

An image's features depend on the backbone (family, name, weights, layers), on where its pixels come from and how
they were made (the source's image folders, the transform), and on the autocast dtype in force. These form the key
(`fewshot.cache.cache_key`); the image id (with its view: "2007_000032@v3") picks the entry. Entries written under
one key are never read under another: in memory each key has its own table, on disk its own folder
`<dir>/<digest of the key>/` (full key in `key.json`), and a disk key also holds a digest of the backbone's weights.

Stores (`cache.features`):
- memory: the features exactly as computed (float32, or the autocast dtype), on the device they were computed on;
- disk: memory-mapped float16 `.npy` shards, shared between runs and processes, equal within float16 rounding.
Past `cache.max_gb` new features are still computed and returned, just not stored.

Each entry keeps two checksums of its image's pixels. A hit whose pixels differ (ids that do not identify the
image, a transform that is not deterministic, a dataset changed under a disk cache) is counted on the device, without
a host synchronisation, and raised as CacheError by `check()`, which `flush()` runs. Entries served by id alone
(`lookup`, after `fewshot.cache.Encoder.prepare` encoded every image) have no pixels to check: on disk they are
trusted by id, so whatever changes an id's pixels must change the key (the source's and the transform's `identity()`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .io import atomic_write, write_json

log = logging.getLogger(__name__)

# Bump when the stored layout or the meaning of a key changes: older disk caches are then left unused.
# 2: the key holds the source's and the transform's identity() instead of a hand-kept list of data.* keys.
VERSION = 2


class CacheError(RuntimeError):
    """Cached features that cannot be trusted or read; the message says which and how to fix it."""


def image_checksums(images: Tensor) -> Tensor:
    """images [N,3,H,W] (uint8, or float in [0, 1]) -> [N,2] float64: pixel sum and a position-weighted sum.

    Pixels are taken as integers 0..255, so the sums are exact and do not depend on the batch they were computed in;
    the weighted sum changes under flips and shifts.
    """
    x = images.flatten(1)
    x = x.double() if x.dtype == torch.uint8 else (x.double() * 255).round()
    positions = torch.arange(x.shape[1], device=x.device, dtype=torch.float64)
    weights = torch.stack([torch.ones_like(positions), (positions * 40503) % 1021 + 1], dim=1)  # (D, 2)
    return x @ weights


def autocast_tag(device: torch.device) -> str:
    """The autocast dtype in force on `device`'s type ("none" when off): features differ with it, so it keys them."""
    if not torch.is_autocast_enabled(device.type):
        return "none"
    return str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")


def _indices(values: list[int], device: torch.device) -> Tensor:
    """An int64 index tensor on `device`, copied without waiting for the device (no host synchronisation)."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def weights_digest(module: nn.Module) -> str:
    """Digest of every parameter and buffer of `module` (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, tensor in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class _MemoryTable:
    """Entries of one key: id -> (per-layer features [C,h,w], checksums [2]) on the compute device."""

    def __init__(self, max_bytes: float):
        self.entries: dict[str, tuple[list[Tensor], Tensor]] = {}
        self.max_bytes, self.bytes, self.full = max_bytes, 0, False

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, ids: list[str], feats: list[Tensor], sums: Tensor) -> None:
        size = sum(f[0].numel() * f.element_size() for f in feats)
        for j, image_id in enumerate(ids):
            if self.bytes + size > self.max_bytes:
                self.full = True
                return
            self.entries[image_id] = ([f[j].clone(memory_format=torch.contiguous_format) for f in feats], sums[j])
            self.bytes += size

    def get(self, ids: list[str], device: torch.device) -> tuple[list[Tensor], Tensor]:
        rows = [self.entries[i] for i in ids]
        layers = len(rows[0][0])
        return [torch.stack([r[0][layer] for r in rows]) for layer in range(layers)], torch.stack([r[1] for r in rows])


class _DiskTable:
    """Entries of one key in `folder`: float16 `.npy` shards read through memory maps, plus a pending buffer.

    A shard is `shard-<name>.l<layer>.npy` per layer and `shard-<name>.json` (ids, checksums, dtype), the json
    written last so a shard without it is ignored. Shard names are unique, so several processes can write at once.
    """

    def __init__(self, folder: Path, key: dict[str, Any], max_bytes: float, flush_every: int = 256):
        self.folder, self.max_bytes, self.flush_every = folder, max_bytes, flush_every
        self.full = False
        key_file = folder / "key.json"
        if key_file.is_file():
            stored = json.loads(key_file.read_text())
            if stored != key:
                raise CacheError(f"{key_file} holds another key than its folder name says; delete {folder}")
        else:
            write_json(key_file, key)
        self.index: dict[str, tuple[str, int]] = {}  # id -> (shard, row)
        self.sums: dict[str, tuple[float, float]] = {}
        self.dtypes: dict[str, str] = {}
        self.arrays: dict[str, list[np.ndarray]] = {}
        self.pending: dict[str, tuple[list[np.ndarray], tuple[float, float], str]] = {}
        self.bytes = sum(p.stat().st_size for p in folder.glob("shard-*.npy"))
        for meta_file in sorted(folder.glob("shard-*.json")):
            try:
                meta = json.loads(meta_file.read_text())
                shard = meta_file.stem
                for row, (image_id, s) in enumerate(zip(meta["ids"], meta["sums"], strict=True)):
                    self.index[image_id] = (shard, row)
                    self.sums[image_id] = (s[0], s[1])
                self.dtypes[shard] = meta["dtype"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CacheError(f"unreadable feature-cache shard {meta_file} ({err}); delete {folder}") from err

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.index or image_id in self.pending

    def __len__(self) -> int:
        return len(self.index) + len(self.pending)

    def put(self, ids: list[str], feats: list[Tensor], sums: Tensor) -> None:
        host = [f.detach().to("cpu", torch.float16).numpy() for f in feats]
        host_sums = sums.tolist()
        size = sum(h[0].nbytes for h in host)
        dtype = str(feats[0].dtype).removeprefix("torch.")
        for j, image_id in enumerate(ids):
            if self.bytes + size > self.max_bytes:
                self.full = True
                break
            self.pending[image_id] = ([h[j] for h in host], (host_sums[j][0], host_sums[j][1]), dtype)
            self.bytes += size
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        shard = f"shard-{uuid.uuid4().hex[:12]}"
        ids = list(self.pending)
        dtype = self.pending[ids[0]][2]
        layers = len(self.pending[ids[0]][0])
        for layer in range(layers):
            array = np.stack([self.pending[i][0][layer] for i in ids])
            atomic_write(self.folder / f"{shard}.l{layer}.npy", lambda f, a=array: np.save(f, a))
        write_json(
            self.folder / f"{shard}.json", {"ids": ids, "sums": [self.pending[i][1] for i in ids], "dtype": dtype}
        )
        for row, image_id in enumerate(ids):
            self.index[image_id] = (shard, row)
            self.sums[image_id] = self.pending[image_id][1]
        self.dtypes[shard] = dtype
        self.pending.clear()

    def _layers(self, shard: str) -> list[np.ndarray]:
        if shard not in self.arrays:
            files = sorted(self.folder.glob(f"{shard}.l*.npy"), key=lambda p: int(p.suffixes[-2][2:]))
            try:
                self.arrays[shard] = [np.load(p, mmap_mode="r") for p in files]
            except (OSError, ValueError) as err:
                raise CacheError(f"unreadable feature-cache shard {shard} in {self.folder} ({err}); delete it") from err
        return self.arrays[shard]

    def get(self, ids: list[str], device: torch.device) -> tuple[list[Tensor], Tensor]:
        per_id: dict[str, list[np.ndarray]] = {}
        by_shard: dict[str, list[str]] = {}
        for image_id in ids:
            if image_id in self.pending:
                per_id[image_id] = self.pending[image_id][0]
            else:
                by_shard.setdefault(self.index[image_id][0], []).append(image_id)
        dtypes = {self.pending[i][2] for i in per_id}
        for shard, shard_ids in by_shard.items():
            arrays = self._layers(shard)
            rows = np.array([self.index[i][1] for i in shard_ids])
            gathered = [a[rows] for a in arrays]  # one read per layer and shard
            for k, image_id in enumerate(shard_ids):
                per_id[image_id] = [g[k] for g in gathered]
            dtypes.add(self.dtypes[shard])
        if len(dtypes) != 1:
            raise CacheError(f"feature-cache entries in {self.folder} disagree on dtype ({dtypes}); delete it")
        dtype = getattr(torch, dtypes.pop())
        layers = len(per_id[ids[0]])
        feats = [
            torch.from_numpy(np.stack([per_id[i][layer] for i in ids])).to(device, non_blocking=True).to(dtype)
            for layer in range(layers)
        ]
        sums = torch.tensor(
            [self.pending[i][1] if i in self.pending else self.sums[i] for i in ids], dtype=torch.float64
        )
        return feats, sums.to(device, non_blocking=True)


class FeatureCache:
    """Backbone features by image id, computed once per key and id.

    Args:
        encoder: images [N,3,H,W] -> list of per-layer features [N,C,h,w] (e.g. `model.encode`).
        key: everything the features depend on besides the image id and autocast (`fewshot.cache.cache_key`); JSON
            data, kept as its JSON round trip (tuples become lists, as in `key.json`).
        store: "memory" (exact) or "disk" (memory-mapped float16 under `folder`).
        folder: root folder of the disk store; each key gets a subfolder.
        max_gb: size past which new features are no longer stored.
        chunk: most images per backbone call when encoding misses.
        check_every: calls between checksum checks (each check synchronises with the device; CPU checks every call).
    """

    def __init__(
        self,
        encoder: Callable[[Tensor], list[Tensor]],
        key: dict[str, Any],
        store: str = "memory",
        folder: str | Path | None = None,
        max_gb: float = 8.0,
        chunk: int = 64,
        check_every: int = 64,
    ):
        if store not in ("memory", "disk"):
            raise ValueError(f"store={store!r} is not valid; choose from memory, disk")
        if store == "disk" and not folder:
            raise ValueError("store='disk' needs a folder (cache.dir)")
        self.encoder, self.key, self.store = encoder, json.loads(json.dumps(key)), store
        self.folder = Path(folder) if folder else None
        self.max_bytes = max_gb * 1024**3
        self.chunk, self.check_every = chunk, check_every
        self.tables: dict[str, _MemoryTable | _DiskTable] = {}
        self.hits = self.misses = self.calls = 0
        self._mismatches: Tensor | None = None
        self._warned_full = False

    def table_key(self, tag: str) -> dict[str, Any]:
        return {"version": VERSION, **self.key, "autocast": tag}

    def _table(self, tag: str) -> _MemoryTable | _DiskTable:
        if tag not in self.tables:
            if self.store == "memory":
                self.tables[tag] = _MemoryTable(self.max_bytes)
            else:
                key = self.table_key(tag)
                folder = self.folder / digest(key)
                folder.mkdir(parents=True, exist_ok=True)
                self.tables[tag] = _DiskTable(folder, key, self.max_bytes)
                log.info("feature cache on disk at %s (%d entries)", folder, len(self.tables[tag]))
        return self.tables[tag]

    def _compute(self, images: Tensor) -> list[Tensor]:
        with torch.inference_mode():
            parts = [self.encoder(images[i : i + self.chunk]) for i in range(0, images.shape[0], self.chunk)]
        return [torch.cat(p) if len(p) > 1 else p[0] for p in zip(*parts, strict=True)]

    def encode(self, images: Tensor, ids: Sequence[str] | None = None) -> list[Tensor]:
        """images [N,3,H,W] with their ids -> per-layer features [N,C,h,w]; only ids not yet cached are encoded.

        Without ids the backbone runs on every image and nothing is stored.
        """
        if ids is None:
            return self._compute(images)
        ids = [str(i) for i in ids]
        if len(ids) != images.shape[0]:
            raise ValueError(f"{len(ids)} ids for {images.shape[0]} images; give one id per image")
        table = self._table(autocast_tag(images.device))
        first: dict[str, int] = {}
        for n, image_id in enumerate(ids):
            first.setdefault(image_id, n)
        missing = [i for i in first if i not in table]
        hits = [i for i in first if i in table]
        self.hits += len(ids) - len(missing)
        self.misses += len(missing)
        sums = image_checksums(images)
        feats: list[list[Tensor]] = []
        stored_sums: list[Tensor] = []
        if missing:
            rows = _indices([first[i] for i in missing], images.device)
            computed = self._compute(images.index_select(0, rows))
            table.put(missing, computed, sums[rows])
            feats.append(computed)
            stored_sums.append(sums[rows])
            if table.full and not self._warned_full:
                log.warning(
                    "feature cache reached cache.max_gb=%.1f: further images are encoded but not kept; "
                    "raise cache.max_gb or use cache.features=disk",
                    self.max_bytes / 1024**3,
                )
                self._warned_full = True
        if hits:
            cached, cached_sums = table.get(hits, images.device)
            feats.append(cached)
            stored_sums.append(cached_sums)
        position = {image_id: k for k, image_id in enumerate(missing + hits)}
        order = _indices([position[i] for i in ids], images.device)
        unique = [torch.cat(f) if len(feats) > 1 else f[0] for f in zip(*feats, strict=True)]
        expected = torch.cat(stored_sums).index_select(0, order)
        mismatches = (expected != sums).any(dim=1).sum()
        self._mismatches = mismatches if self._mismatches is None else self._mismatches + mismatches
        self.calls += 1
        if images.device.type == "cpu" or self.calls % self.check_every == 0:
            self.check()
        return [f.index_select(0, order) for f in unique]

    def missing(self, ids: Sequence[str], device: torch.device) -> list[str]:
        """The ids (distinct, in order) the cache does not hold for features on `device` under the autocast in force."""
        table = self._table(autocast_tag(device))
        return [i for i in dict.fromkeys(str(i) for i in ids) if i not in table]

    def lookup(self, ids: Sequence[str], device: torch.device) -> list[Tensor]:
        """Per-layer features [N,C,h,w] of cached ids, no pixels needed (under the autocast they were computed in).

        An id the cache does not hold raises CacheError: encode its image first (fewshot.cache.Encoder.prepare).
        """
        ids = [str(i) for i in ids]
        absent = self.missing(ids, device)
        if absent:
            raise CacheError(
                f"the feature cache holds no features for {len(absent)} id(s) ({', '.join(absent[:3])}"
                f"{', ...' if len(absent) > 3 else ''}) under autocast {autocast_tag(device)}: an episode without "
                "pixels needs its images encoded first (fewshot.cache.Encoder.prepare), in the same autocast"
            )
        self.hits += len(ids)
        self.calls += 1
        first = list(dict.fromkeys(ids))
        feats, _ = self._table(autocast_tag(device)).get(first, device)
        if len(first) == len(ids):
            return feats
        position = {image_id: k for k, image_id in enumerate(first)}
        order = _indices([position[i] for i in ids], device)
        return [f.index_select(0, order) for f in feats]

    @property
    def full(self) -> bool:
        """Whether a table reached `max_gb`, so that further features are computed but not kept."""
        return any(t.full for t in self.tables.values())

    def check(self) -> None:
        """Raises CacheError if any cached image came back with other pixels under the same id (synchronises)."""
        if self._mismatches is not None and int(self._mismatches) > 0:
            count = int(self._mismatches)
            self._mismatches = None
            where = f" under {self.folder}" if self.store == "disk" else ""
            raise CacheError(
                f"{count} image(s) reached the feature cache{where} with the id of a cached image but other pixels: "
                "ids must name the image and its augmentation view, and the transform must be deterministic "
                "(data.augment.views > 0 for training). If the dataset changed, delete the cache folder; "
                "cache.features=off disables the cache."
            )

    def flush(self) -> None:
        """Writes pending disk entries and checks the checksums."""
        for table in self.tables.values():
            if isinstance(table, _DiskTable):
                table.flush()
        self.check()

    def stats(self) -> dict[str, Any]:
        entries = sum(len(t) for t in self.tables.values())
        return {
            "store": self.store,
            "hits": self.hits,
            "misses": self.misses,
            "entries": entries,
            "gb": sum(t.bytes for t in self.tables.values()) / 1024**3,
        }

"""The backbone pass of episodes, with the feature cache behind it: each image's features computed once.

`Encoder` is the one way episodes get backbone features (fewshot.engine.encode_episodes): a batch hands it the pixels
it brings, with their ids, and asks for the features of its queries' and supports' ids. Without a cache the encoder
runs the backbone on the batch's pixels. With one (`build_encoder`: where `cache.features` allows it and features are
exact, a frozen backbone and a deterministic transform or fixed augmented views), `Encoder.prepare` first decodes,
transforms and encodes each image (view) the episodes use once, in large batches, and transforms each mask once
(phase 1); the episodes then come from memory (`CachedEpisodes`: no file read, no pixels) and take their features by
id (phase 2). Either way an item has the same shape (episodes.dataset.episode_item) and goes through the same code,
so cached and uncached metrics are equal (exactly in memory, within float16 on disk).

The key of the cached features (`cache_key`) is built from identities that the owners of the pixel-affecting
settings provide: the backbone's `identity` (family, name, weights, layers), the source's `identity()` (image folders,
and what maps an id to its file), the transform's `identity()` (size, resize, augmentation), and on disk a digest of
the weights; the autocast dtype is added per table. The store (memory, or float16 disk shards, with pixel
checksums) is fewshot.feature_store.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from episodes.base import Source
from episodes.dataset import EpisodeDataset, ImageKey, episode_item, view_id, view_rng
from episodes.transforms import EpisodeTransform

from . import distributed
from .config import CacheMode, Config
from .engine import autocast
from .feature_store import CacheError, FeatureCache, weights_digest

log = logging.getLogger(__name__)

MODES = get_args(CacheMode)
MaskNeeds = dict[ImageKey, dict[int, bool]]  # image (view) -> {class id: whether its original-resolution mask is kept}


class Encoder:
    """Backbone features of episode images by id, through a feature cache when given one (see the module docstring).

    Args:
        model: has `encode(images [N,3,H,W]) -> per-layer features [N,C,h,w]` (FewShotSegmenter.encode).
        cache: the store of `model`'s features on these episodes' images; None runs the backbone every time.
    """

    def __init__(self, model: nn.Module, cache: FeatureCache | None = None):
        self.model, self.cache = model, cache

    def encode(self, images: Tensor, ids: Sequence[str]) -> list[Tensor]:
        """images [N,3,H,W] named by `ids` -> per-layer features [N,C,h,w]. A cache encodes each id once and keeps
        it; without one the backbone runs on every image (with gradients where the model gives them)."""
        if self.cache is None:
            return self.model.encode(images)
        return self.cache.encode(images, ids)

    def lookup(self, ids: Sequence[str], device: torch.device) -> list[Tensor]:
        """Per-layer features [N,C,h,w] of ids encoded before, with no pixels: only a cache keeps features."""
        if self.cache is None:
            raise CacheError(
                f"no pixels for {len(ids)} image id(s) ({', '.join(list(ids)[:3])}) and no feature cache to look them "
                "up in: serve these episodes with their images (Encoder.prepare returns such datasets without a cache)"
            )
        return self.cache.lookup(ids, device)

    def features(self, images: Tensor, image_ids: Sequence[str], ids: Sequence[str]) -> list[Tensor]:
        """Per-layer features [len(ids),C,h,w] of `ids`: those among `image_ids` encoded from `images` [N,3,H,W],
        the others looked up (a batch from memory brings no pixels at all)."""
        row: dict[str, int] = {}
        for n, image_id in enumerate(image_ids):
            row.setdefault(image_id, n)
        rest = [i for i in dict.fromkeys(ids) if i not in row]
        parts = []
        if image_ids:
            parts.append(self.encode(images, image_ids))
        if rest:
            parts.append(self.lookup(rest, images.device))
            row.update({image_id: len(image_ids) + k for k, image_id in enumerate(rest)})
        feats = [torch.cat(layer) if len(parts) > 1 else layer[0] for layer in zip(*parts, strict=True)]
        order = [row[i] for i in ids]
        if order == list(range(feats[0].shape[0])):
            return feats
        index = torch.tensor(order, dtype=torch.long).to(images.device, non_blocking=True)
        return [f.index_select(0, index) for f in feats]

    def prepare(
        self,
        datasets: Sequence[EpisodeDataset],
        indices: Sequence[Iterable[int]],
        batch_size: int,
        workers: int,
        device: torch.device,
        amp: str = "none",
    ) -> list[Dataset]:
        """The episodes as this encoder serves them fastest.

        With a cache, phase 1 runs here: each image (view) that episodes `indices[k]` of `datasets[k]` use and the
        cache lacks is decoded, transformed and encoded once, in batches of `batch_size` (a DataLoader with `workers`,
        under the autocast `amp` the episodes run in: it keys the features), and each of their masks is transformed
        once; the episodes then come from memory (CachedEpisodes). Without a cache, or when the cache cannot hold
        every image within cache.max_gb (a warning says so), the datasets themselves: their items bring their pixels.
        """
        datasets = list(datasets)
        if self.cache is None:
            return datasets
        for dataset in datasets:
            found = data_identity(dataset.source, dataset.transform)
            if any(self.cache.key[k] != v for k, v in found.items()):
                raise ValueError(f"episodes of {found} reach a feature cache made for other data ({self.cache.key})")
        needs: MaskNeeds = {}
        for dataset, wanted in zip(datasets, indices, strict=True):
            episode_needs(dataset, wanted, into=needs)
        masks = self._fill(datasets[0], needs, batch_size, workers, device, amp)
        if masks is None:
            log.warning(
                "the feature cache cannot hold every image (view) of the episodes within cache.max_gb=%.1f GB: they "
                "load their images again (raise cache.max_gb, use cache.features=disk or fewer data.augment.views)",
                self.cache.max_bytes / 1024**3,
            )
            return datasets
        return [CachedEpisodes(dataset, masks) for dataset in datasets]

    def _fill(
        self, dataset: EpisodeDataset, needs: MaskNeeds, batch_size: int, workers: int, device: torch.device, amp: str
    ) -> EpisodeMasks | None:
        """Phase 1 over `needs` (see `prepare`): the episodes' masks, or None when the cache filled up first."""
        ids = [view_id(key) for key in needs]
        masks = EpisodeMasks()
        with autocast(amp, device):
            absent = set(self.cache.missing(ids, device))
            pixels = {key for key in needs if view_id(key) in absent}
            log.info("feature cache: encoding %d image(s), %d already held", len(pixels), len(ids) - len(pixels))
            loader = DataLoader(
                ImageViews(dataset.source, dataset.transform, needs, pixels),
                batch_size=batch_size,
                shuffle=False,
                num_workers=min(workers, len(needs) // (4 * batch_size)),  # a worker's fork pays off over >= 4 batches
                collate_fn=collate_images,
                pin_memory=device.type == "cuda",
                generator=torch.Generator(),  # keeps the global RNG untouched (exact resume)
            )
            for batch in tqdm(loader, desc="encode", leave=False, disable=not distributed.is_main()):
                if batch["image"] is not None:
                    self.cache.encode(batch["image"].to(device, non_blocking=True), batch["image_id"])
                    if self.cache.full:
                        return None
                for image_id, classes in zip(batch["id"], batch["masks"], strict=True):
                    for class_id, resized, original in classes:
                        masks.add(image_id, class_id, resized, original)
            if self.cache.missing(ids, device):
                return None
        log.info("episode masks in memory: %.1f MB", masks.bytes / 2**20)
        return masks

    def flush(self) -> None:
        """Writes pending disk entries and checks the pixel checksums (no-op without a cache)."""
        if self.cache is not None:
            self.cache.flush()
            log.info("feature cache: %s", self.cache.stats())


# --------------------------------------------------------------------------------------------------------------------
# Phase 2: episodes from memory.


class EpisodeMasks:
    """Transformed class masks uint8 [H, W] by (view id, class id), and original-resolution ones uint8 [H0, W0] where
    kept, made once by phase 1 for the episodes it prepared."""

    def __init__(self) -> None:
        self.resized: dict[tuple[str, int], Tensor] = {}
        self.original: dict[tuple[str, int], Tensor] = {}
        self.bytes = 0

    def add(self, image_id: str, class_id: int, resized: np.ndarray, original: np.ndarray | None = None) -> None:
        self.resized[image_id, class_id] = torch.from_numpy(resized)
        self.bytes += resized.nbytes
        if original is not None:
            self.original[image_id, class_id] = torch.from_numpy(original)
            self.bytes += original.nbytes


class CachedEpisodes(Dataset):
    """`dataset`'s episodes from memory: its items (episodes.dataset.episode_item) with the masks phase 1 made and
    no pixels, for an encoder whose cache holds every feature. Nothing is read from disk."""

    def __init__(self, dataset: EpisodeDataset, masks: EpisodeMasks) -> None:
        self.dataset, self.masks = dataset, masks
        size = dataset.transform.size
        self.no_images = torch.empty(0, 3, size, size, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids = self.dataset.image_ids(index)
        class_id = self.dataset.episodes[index].class_id
        try:
            resized = [self.masks.resized[image_id, class_id] for image_id in ids]
            original = self.masks.original[ids[0], class_id] if self.dataset.keep_original else None
        except KeyError as err:
            raise KeyError(
                f"episode {index}: no mask in memory for (image, class) {err.args[0]}; the masks were made for other "
                "episodes: prepare the episodes this dataset serves (Encoder.prepare with their indices)"
            ) from None
        return episode_item(index, class_id, ids, resized, self.no_images, original)


def loader_workers(dataset: Dataset, workers: int) -> int:
    """`workers`, or 0 for CachedEpisodes: nothing to load in parallel."""
    return 0 if isinstance(dataset, CachedEpisodes) else workers


# --------------------------------------------------------------------------------------------------------------------
# Phase 1: each image (view) once, with its masks.


def episode_needs(dataset: EpisodeDataset, indices: Iterable[int], into: MaskNeeds | None = None) -> MaskNeeds:
    """What phase 1 must make for episodes `indices` of `dataset`: each image (view) they use, with its episode classes
    (and whether that class mask is kept at the original resolution: queries under keep_original); added to `into`."""
    needs: MaskNeeds = {} if into is None else into
    for index in indices:
        class_id = dataset.episodes[index].class_id
        for n, key in enumerate(dataset.image_keys(index)):
            classes = needs.setdefault(key, {})
            classes[class_id] = classes.get(class_id, False) or (n == 0 and dataset.keep_original)
    return needs


class ImageViews(Dataset):
    """Each image (view) of `needs` once, with its transformed class masks, and its pixels when in `pixels`.

    Item k -> {"id": view id, "image": uint8 [3, H, W] or None, "masks": [(class id, uint8 [H, W], uint8 [H0, W0] or
    None)]}, the masks as numpy arrays (a pinning DataLoader leaves them pageable: they are kept). Without pixels
    the masks are transformed alone (EpisodeTransform.mask_only): no image is decoded.
    """

    def __init__(self, source: Source, transform: EpisodeTransform, needs: MaskNeeds, pixels: set[ImageKey]) -> None:
        self.source, self.transform = source, transform
        self.needs = sorted(needs.items(), key=lambda need: need[0] not in pixels)  # items with pixels batch together
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.needs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key, classes = self.needs[index]
        image = self.source.load_image(key[0]) if key in self.pixels else None
        pixels, masks = None, []
        for class_id, keep_original in classes.items():
            mask = self.source.load_class_mask(key[0], class_id)
            if image is None or pixels is not None:
                resized = self.transform.mask_only(mask, view_rng(key))
            else:  # the whole transform once, as the episodes run it (the pixels do not depend on the mask)
                pixels, resized = self.transform(image, mask, view_rng(key))
            original = np.array(mask, np.uint8) if keep_original else None
            masks.append((class_id, resized.to(torch.uint8).numpy(), original))
        return {"id": view_id(key), "image": pixels, "masks": masks}


def collate_images(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """ImageViews items -> {"image": uint8 [N, 3, H, W] of the N items with pixels (or None), "image_id": their ids,
    "id": every item's id, "masks": every item's masks}."""
    with_pixels = [b for b in batch if b["image"] is not None]
    return {
        "image": torch.stack([b["image"] for b in with_pixels]) if with_pixels else None,
        "image_id": [b["id"] for b in with_pixels],
        "id": [b["id"] for b in batch],
        "masks": [b["masks"] for b in batch],
    }


# --------------------------------------------------------------------------------------------------------------------
# From the config: when the cache is exact, its key, and the encoder.


def cache_mode(cfg: Config, transform: EpisodeTransform) -> str:
    """`cache.features` resolved for episodes made by `transform`: memory, disk or off.

    auto is memory where that is exact: a frozen backbone and a deterministic transform, or a fixed set of
    `data.augment.views` per image.
    """
    mode = cfg.cache.features
    if mode not in MODES:
        raise ValueError(f"cache.features={mode!r} is not valid; choose from {', '.join(MODES)}")
    if mode == "off":
        return "off"
    if not cfg.model.backbone.frozen:
        if mode != "auto":
            log.warning("cache.features=%s ignored: model.backbone.frozen=false changes the features every step", mode)
        return "off"
    if not transform.deterministic and transform.augment.views == 0:
        if mode != "auto":
            log.warning(
                "cache.features=%s: no training cache with fresh random augmentation per episode; set "
                "data.augment.views=N to draw from N fixed views per image",
                mode,
            )
        return "off"
    return "memory" if mode == "auto" else mode


def cache_folder(cfg: Config) -> Path:
    """`cache.dir`, or `features` in data.cache_dir, else in the mask index's default folder (`<root>/.fewshot_cache`,
    or the user cache when the root is read-only)."""
    if cfg.cache.dir:
        return Path(cfg.cache.dir).expanduser()
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser() / "features"
    from episodes.index import default_cache_dir  # <root>/.fewshot_cache, or the user cache for a read-only root

    return default_cache_dir(Path(cfg.data.root).expanduser()) / "features"


def data_identity(source: Source, transform: EpisodeTransform) -> dict[str, Any]:
    """What the pixels of an image id depend on: the source's and the transform's identity (JSON data)."""
    identify = getattr(source, "identity", None)
    if identify is None:
        raise TypeError(
            f"{type(source).__name__} has no identity(): a source names where its pixels come from "
            "(episodes.base.Source.identity) so that cached features are keyed by it"
        )
    return json.loads(json.dumps({"source": identify(), "transform": transform.identity()}))


def cache_key(
    model: nn.Module, source: Source, transform: EpisodeTransform, with_weights: bool = False
) -> dict[str, Any]:
    """The key of `model`'s backbone features on `source`'s images made by `transform` (`with_weights` adds a digest
    of the weights)."""
    key: dict[str, Any] = {"backbone": model.backbone.identity, **data_identity(source, transform)}
    if with_weights:
        key["weights"] = weights_digest(model.backbone)
    return key


def build_encoder(cfg: Config, model: nn.Module, dataset: EpisodeDataset) -> Encoder:
    """The encoder of `model` on `dataset`'s episodes: with a feature cache where `cache_mode` allows one and `model`
    has a separate backbone pass with an identity (`model.backbone.identity`, as FewShotSegmenter's)."""
    mode = cache_mode(cfg, dataset.transform)
    if mode == "off" or not hasattr(getattr(model, "backbone", None), "identity"):
        return Encoder(model)
    key = cache_key(model, dataset.source, dataset.transform, with_weights=mode == "disk")
    folder = cache_folder(cfg) if mode == "disk" else None
    return Encoder(model, FeatureCache(model.encode, key, store=mode, folder=folder, max_gb=cfg.cache.max_gb))

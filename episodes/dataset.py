"""The episode Dataset: item i loads and transforms episode i, a pure function of i (augmentation seeded by i too).

Masks travel as uint8 (0, 1, 255) and become int64 on the device (fewshot.engine.to_device).

With a feature cache, images need decoding once only, and masks transforming once only: `ImageViews` decodes each
image (view) an episode set uses once, with its transformed class masks (phase 1, fewshot.evaluation.fill_cache);
an EpisodeDataset given those `EpisodeMasks` then builds its items from memory, without pixels or files (phase 2).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from episodes.base import Episode, Source
from episodes.transforms import EpisodeTransform

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[Tensor, Tensor]]
ImageKey = tuple[str, int | None]  # (image id, fixed augmented view or None): the pixels a feature-cache entry holds
MaskNeeds = dict[ImageKey, dict[int, bool]]  # image (view) -> {class id: whether its original-resolution mask is kept}
_AUGMENT = 3  # rng stream tag of the augmentation (the sampler uses 1 and 2)
_VIEWS = 4  # rng stream tag of the fixed augmented views (data.augment.views > 0)


def view_id(key: ImageKey) -> str:
    """The id of an image's pixels: "<id>" or, for a fixed augmented view, "<id>@v<view>" (feature-cache ids)."""
    image_id, view = key
    return image_id if view is None else f"{image_id}@v{view}"


def view_rng(key: ImageKey) -> np.random.Generator:
    """The augmentation rng of an image (view) decoded on its own. A fixed view's is seeded by (image id, view)
    alone; an image without a view needs a deterministic transform (evaluation, or training without augmentation:
    fewshot.cache.cache_mode allows no other cache), which draws from the rng without depending on it."""
    image_id, view = key
    crc = zlib.crc32(image_id.encode())
    return np.random.default_rng([_VIEWS, crc] if view is None else [_VIEWS, crc, view])


class EpisodeMasks:
    """Transformed class masks uint8 [S, S] by (view id, class id), and original-resolution ones uint8 [H0, W0] where
    kept, for the episodes of a phase 1 (see the module docstring)."""

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


class EpisodeDataset(Dataset):
    """Episodes of `source` as tensors.

    Args:
        source: the dataset on disk (images and class masks).
        episodes: a list of Episode (test) or a sequence with a length such as sampler.TrainEpisodes.
        transform: (image, mask, rng) -> (image uint8 [3, S, S], mask [S, S]), e.g. transforms.build_transform.
        keep_original: also return the query's class mask at its original resolution (eval_resolution: original).
        seed: seeds the augmentation of item i with (seed, i).
        masks: the episodes' masks from a phase 1 (`needs`, fewshot.evaluation.fill_cache): items then hold masks
            and ids only, read from memory, for a feature cache that holds every image.
    """

    def __init__(
        self,
        source: Source,
        episodes: Sequence[Episode],
        transform: Transform,
        keep_original: bool,
        seed: int = 0,
        masks: EpisodeMasks | None = None,
    ) -> None:
        self.source, self.episodes, self.transform = source, episodes, transform
        self.keep_original, self.seed, self.masks = keep_original, seed, masks
        self.views = getattr(getattr(transform, "augment", None), "views", 0)

    def __len__(self) -> int:
        return len(self.episodes)

    def with_masks(self, masks: EpisodeMasks) -> EpisodeDataset:
        """The same episodes, built from `masks` without pixels."""
        return EpisodeDataset(self.source, self.episodes, self.transform, self.keep_original, self.seed, masks)

    def image_keys(self, index: int) -> list[ImageKey]:
        """(image id, view) of episode `index`'s query, then of its supports, without loading anything."""
        return self._keys(self._episode(index), self._rng(index))

    def needs(self, indices: Iterable[int], into: MaskNeeds | None = None) -> MaskNeeds:
        """What a phase 1 must make for episodes `indices`: each image (view) they use, with its episode classes
        (and whether the class mask is kept at original resolution: queries with keep_original); added to `into`."""
        needs: MaskNeeds = {} if into is None else into
        for index in indices:
            episode = self._episode(index)
            for n, key in enumerate(self._keys(episode, self._rng(index))):
                classes = needs.setdefault(key, {})
                classes[episode.class_id] = classes.get(episode.class_id, False) or (n == 0 and self.keep_original)
        return needs

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One episode: query_mask uint8 [S, S] in {0, 1, 255}, support_masks uint8 [shots, S, S], class_id, index,
        query_id, support_ids; without `masks` also query_image uint8 [3, S, S] and support_images uint8
        [shots, 3, S, S]; with keep_original query_mask_original uint8 [H0, W0]."""
        episode, rng = self._episode(index), self._rng(index)
        keys = self._keys(episode, rng)
        ids = [view_id(key) for key in keys]
        item: dict[str, Any] = {"class_id": episode.class_id, "index": index}
        item["query_id"], item["support_ids"] = ids[0], ids[1:]
        if self.masks is not None:
            try:
                resized = [self.masks.resized[image_id, episode.class_id] for image_id in ids]
                if self.keep_original:
                    item["query_mask_original"] = self.masks.original[ids[0], episode.class_id]
            except KeyError as err:
                raise KeyError(
                    f"episode {index}: no mask in memory for (image, class) {err.args[0]}; the masks were made for "
                    "other episodes: build them from this dataset's needs(indices) for the episodes it serves"
                ) from None
        else:
            masks = [self.source.load_class_mask(image_id, episode.class_id) for image_id, _ in keys]
            pairs = [  # views > 0: view rngs; else the episode's rng, drawn by the query's then the supports' transform
                self.transform(self.source.load_image(key[0]), mask, rng if key[1] is None else view_rng(key))
                for key, mask in zip(keys, masks, strict=True)
            ]
            resized = [mask.to(torch.uint8) for _, mask in pairs]
            item["query_image"] = pairs[0][0]
            item["support_images"] = torch.stack([image for image, _ in pairs[1:]])
            if self.keep_original:
                item["query_mask_original"] = torch.from_numpy(np.array(masks[0], np.uint8))
        item["query_mask"], item["support_masks"] = resized[0], torch.stack(resized[1:])
        return item

    def _episode(self, index: int) -> Episode:
        if not 0 <= index < len(self):
            raise IndexError(f"episode {index} out of range 0..{len(self) - 1}")
        return self.episodes[index]

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _AUGMENT, index])

    def _keys(self, episode: Episode, rng: np.random.Generator) -> list[ImageKey]:
        """With data.augment.views = N > 0 the episode's rng draws a view v < N per image (query first): its pixels
        are then a function of (image id, v) alone, and a feature cache can key them "<id>@v<v>"."""
        images = (episode.query, *episode.supports)
        if not self.views:
            return [(image_id, None) for image_id in images]
        return [(image_id, int(rng.integers(self.views))) for image_id in images]


class ImageViews(Dataset):
    """Phase 1: each image (view) of `needs` once, with its transformed class masks, and its pixels when in `pixels`.

    Item k -> {"id": view id, "image": uint8 [3, S, S] or None, "masks": [(class id, uint8 [S, S], uint8 [H0, W0] or
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
    """ImageViews items -> {"image": uint8 [N, 3, S, S] of the N items with pixels (or None), "image_id": their ids,
    "id": every item's id, "masks": every item's masks}."""
    with_pixels = [b for b in batch if b["image"] is not None]
    return {
        "image": torch.stack([b["image"] for b in with_pixels]) if with_pixels else None,
        "image_id": [b["id"] for b in with_pixels],
        "id": [b["id"] for b in batch],
        "masks": [b["masks"] for b in batch],
    }


def collate_episodes(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks a list of items: query_mask uint8 [B, S, S], support_masks uint8 [B, shots, S, S], class_ids and index
    int64 [B], and when the items hold pixels query_image [B, 3, S, S] and support_images [B, shots, 3, S, S];
    query_id (list[str]), support_ids (list[list[str]]) and the ragged query_mask_original stay lists."""
    out: dict[str, Any] = {
        "query_mask": torch.stack([b["query_mask"] for b in batch]),
        "support_masks": torch.stack([b["support_masks"] for b in batch]),
        "class_ids": torch.tensor([b["class_id"] for b in batch], dtype=torch.int64),
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.int64),
        "query_id": [b["query_id"] for b in batch],
        "support_ids": [b["support_ids"] for b in batch],
    }
    if "query_image" in batch[0]:
        out["query_image"] = torch.stack([b["query_image"] for b in batch])
        out["support_images"] = torch.stack([b["support_images"] for b in batch])
    if "query_mask_original" in batch[0]:
        out["query_mask_original"] = [b["query_mask_original"] for b in batch]
    return out

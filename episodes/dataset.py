"""The episode Dataset: item i loads and transforms episode i, a pure function of i (augmentation seeded by i too).

An item has one shape whoever serves it (this Dataset from the files, fewshot.cache.CachedEpisodes from memory):
the episode's masks and class, the ids naming its query's and supports' pixels, and `images`, the pixels its encoder
still has to encode (with their `image_ids`): here the query's then the supports', from memory none. The encoder
(fewshot.cache.Encoder) turns ids into features, computing those it is handed pixels for. Masks travel as uint8
(0, 1, 255) and become int64 on the device (fewshot.engine.to_device).

An id names pixels: "<id>" under a deterministic transform (evaluation), "<id>@v<view>" for one of
data.augment.views fixed augmented views (a function of the id and the view alone, so a feature cache can keep it),
"<id>@e<index>" for an augmentation drawn for episode `index` alone.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from episodes.base import Episode, Source
from episodes.transforms import EpisodeTransform

ImageKey = tuple[str, int | None]  # (image id, fixed augmented view or None): the pixels a feature-cache entry holds
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


def episode_item(
    index: int, class_id: int, ids: list[str], masks: list[Tensor], images: Tensor, original: Tensor | None
) -> dict[str, Any]:
    """The one shape of an episode item: query_mask uint8 [H, W], support_masks uint8 [shots, H, W], class_id, index,
    query_id, support_ids, images uint8 [n, 3, H, W] with their image_ids (n = 1 + shots, query first, or n = 0: the
    encoder holds every feature), and query_mask_original uint8 [H0, W0] when scoring at the original resolution.

    Args:
        ids: the view ids of the query, then the supports; masks: their transformed masks, in the same order.
        original: the query's class mask at its original resolution, or None when not kept.
    """
    item: dict[str, Any] = {
        "query_mask": masks[0],
        "support_masks": torch.stack(masks[1:]),
        "class_id": class_id,
        "index": index,
        "query_id": ids[0],
        "support_ids": ids[1:],
        "images": images,
        "image_ids": list(ids) if images.shape[0] else [],
    }
    if original is not None:
        item["query_mask_original"] = original
    return item


class EpisodeDataset(Dataset):
    """Episodes of `source` as tensors, loaded from its files (see the module docstring for the item).

    Args:
        source: the dataset on disk (images and class masks).
        episodes: a list of Episode (test) or a sequence with a length such as sampler.TrainEpisodes.
        transform: (image, mask, rng) -> (image uint8 [3, H, W], mask [H, W]), transforms.build_transform's.
        keep_original: also return the query's class mask at its original resolution (eval_resolution: original).
        seed: seeds the augmentation of item i with (seed, i).
    """

    def __init__(
        self,
        source: Source,
        episodes: Sequence[Episode],
        transform: EpisodeTransform,
        keep_original: bool,
        seed: int = 0,
    ) -> None:
        self.source, self.episodes, self.transform = source, episodes, transform
        self.keep_original, self.seed = keep_original, seed
        self.views = transform.augment.views if transform.augment is not None else 0
        self.fresh = not self.views and not transform.deterministic  # augmentation drawn per episode: "<id>@e<index>"

    def __len__(self) -> int:
        return len(self.episodes)

    def image_keys(self, index: int) -> list[ImageKey]:
        """(image id, view) of episode `index`'s query, then of its supports, without loading anything."""
        return self._keys(self._episode(index), self._rng(index))

    def image_ids(self, index: int) -> list[str]:
        """The ids naming the pixels of episode `index`'s query, then of its supports (see the module docstring)."""
        return self._ids(index, self.image_keys(index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Episode `index` read from the source's files: `episode_item` with the query's and supports' pixels."""
        episode, rng = self._episode(index), self._rng(index)
        keys = self._keys(episode, rng)
        masks = [self.source.load_class_mask(image_id, episode.class_id) for image_id, _ in keys]
        pairs = [  # views > 0: view rngs; else the episode's rng, drawn by the query's then the supports' transform
            self.transform(self.source.load_image(key[0]), mask, rng if key[1] is None else view_rng(key))
            for key, mask in zip(keys, masks, strict=True)
        ]
        original = torch.from_numpy(np.array(masks[0], np.uint8)) if self.keep_original else None
        resized = [mask.to(torch.uint8) for _, mask in pairs]
        images = torch.stack([image for image, _ in pairs])  # (1 + shots, 3, S, S)
        return episode_item(index, episode.class_id, self._ids(index, keys), resized, images, original)

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

    def _ids(self, index: int, keys: list[ImageKey]) -> list[str]:
        if self.fresh:  # the query and supports of an episode are distinct images, so these ids are distinct too
            return [f"{image_id}@e{index}" for image_id, _ in keys]
        return [view_id(key) for key in keys]


def collate_episodes(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks a list of items: query_mask uint8 [B, H, W], support_masks uint8 [B, shots, H, W], class_ids and index
    int64 [B], images uint8 [N, 3, H, W] (every item's, concatenated) with image_ids (list[str], N); query_id
    (list[str]), support_ids (list[list[str]]) and the ragged query_mask_original stay lists."""
    out: dict[str, Any] = {
        "query_mask": torch.stack([b["query_mask"] for b in batch]),
        "support_masks": torch.stack([b["support_masks"] for b in batch]),
        "class_ids": torch.tensor([b["class_id"] for b in batch], dtype=torch.int64),
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.int64),
        "query_id": [b["query_id"] for b in batch],
        "support_ids": [b["support_ids"] for b in batch],
        "images": torch.cat([b["images"] for b in batch]),
        "image_ids": [image_id for b in batch for image_id in b["image_ids"]],
    }
    if "query_mask_original" in batch[0]:
        out["query_mask_original"] = [b["query_mask_original"] for b in batch]
    return out

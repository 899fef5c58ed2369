"""The episode Dataset: item i loads and transforms episode i, a pure function of i (augmentation seeded by i too)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from episodes.base import Episode, Source

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[Tensor, Tensor]]
_AUGMENT = 3  # rng stream tag of the augmentation (the sampler uses 1 and 2)
_VIEWS = 4  # rng stream tag of the fixed augmented views (data.augment.views > 0)


class EpisodeDataset(Dataset):
    """Episodes of `source` as tensors.

    Args:
        source: the dataset on disk (images and class masks).
        episodes: a list of Episode (test) or a sequence with a length such as sampler.TrainEpisodes.
        transform: (image, mask, rng) -> (image uint8 [3, S, S], mask int64 [S, S]), e.g. transforms.build_transform.
        keep_original: also return the query's class mask at its original resolution (eval_resolution: original).
        seed: seeds the augmentation of item i with (seed, i).
    """

    def __init__(
        self, source: Source, episodes: Sequence[Episode], transform: Transform, keep_original: bool, seed: int = 0
    ) -> None:
        self.source, self.episodes, self.transform = source, episodes, transform
        self.keep_original, self.seed = keep_original, seed

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One episode: query_image uint8 [3, S, S], query_mask int64 [S, S] in {0, 1, 255}, support_images uint8
        [shots, 3, S, S], support_masks int64 [shots, S, S], class_id, index, query_id, support_ids and, with
        keep_original, query_mask_original uint8 [H0, W0]."""
        if not 0 <= index < len(self):
            raise IndexError(f"episode {index} out of range 0..{len(self) - 1}")
        episode = self.episodes[index]
        rng = np.random.default_rng([self.seed, _AUGMENT, index])
        query_mask_original = self.source.load_class_mask(episode.query, episode.class_id)
        query_image, query_mask, query_id = self._view(
            self.source.load_image(episode.query), query_mask_original, episode.query, rng
        )
        supports = [
            self._view(self.source.load_image(s), self.source.load_class_mask(s, episode.class_id), s, rng)
            for s in episode.supports
        ]
        item = {
            "query_image": query_image,
            "query_mask": query_mask,
            "support_images": torch.stack([image for image, _, _ in supports]),
            "support_masks": torch.stack([mask for _, mask, _ in supports]),
            "class_id": episode.class_id,
            "index": index,
            "query_id": query_id,
            "support_ids": [image_id for _, _, image_id in supports],
        }
        if self.keep_original:
            item["query_mask_original"] = torch.from_numpy(np.array(query_mask_original, np.uint8))
        return item

    def _view(
        self, image: np.ndarray, mask: np.ndarray, image_id: str, rng: np.random.Generator
    ) -> tuple[Tensor, Tensor, str]:
        """Transformed (image, mask) and the id of those pixels.

        With data.augment.views = N > 0 the episode's rng draws a view v < N, whose augmentation is seeded by
        (image id, v) alone, and the id becomes "<id>@v<v>": a feature cache can then key the augmented pixels.
        """
        views = getattr(getattr(self.transform, "augment", None), "views", 0)
        if not views:
            return *self.transform(image, mask, rng), image_id
        view = int(rng.integers(views))
        view_rng = np.random.default_rng([_VIEWS, zlib.crc32(image_id.encode()), view])
        return *self.transform(image, mask, view_rng), f"{image_id}@v{view}"


def collate_episodes(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks a list of items: query_image [B, 3, S, S], query_mask [B, S, S], support_images [B, shots, 3, S, S],
    support_masks [B, shots, S, S], class_ids and index int64 [B]; query_id (list[str]), support_ids
    (list[list[str]]) and the ragged query_mask_original stay lists."""
    out: dict[str, Any] = {
        "query_image": torch.stack([b["query_image"] for b in batch]),
        "query_mask": torch.stack([b["query_mask"] for b in batch]),
        "support_images": torch.stack([b["support_images"] for b in batch]),
        "support_masks": torch.stack([b["support_masks"] for b in batch]),
        "class_ids": torch.tensor([b["class_id"] for b in batch], dtype=torch.int64),
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.int64),
        "query_id": [b["query_id"] for b in batch],
        "support_ids": [b["support_ids"] for b in batch],
    }
    if "query_mask_original" in batch[0]:
        out["query_mask_original"] = [b["query_mask_original"] for b in batch]
    return out

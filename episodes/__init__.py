"""Few-shot episodes: datasets on disk, fold splits, list conventions, seeded sampling, transforms.

The front door for the tools:
    build_test_dataset(data, seed)           the fold's fixed test episodes (or data.episode_file's)
    build_val_dataset(data, episodes, seed)  the same machinery on a validation seed and count
    build_train_dataset(data, seed)          endless random training episodes over the base classes, augmented
    collate_episodes(batch)                  the DataLoader collate function of all three
Importing the package is cheap: the modules behind these load on first use.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from episodes.dataset import EpisodeDataset
    from fewshot.config import DataConfig

log = logging.getLogger(__name__)

__all__ = ["build_test_dataset", "build_val_dataset", "build_train_dataset", "collate_episodes"]


def build_test_dataset(data: DataConfig, seed: int | None = None) -> EpisodeDataset:
    """Test episodes of fold data.fold on split data.split for `seed` (default data.seed).

    With data.episode_file set, the episodes come from that file, which must have been made under the same protocol
    (sampler.episode_protocol, this seed included); otherwise they are sampled with sampler.make_test_episodes.
    """
    from episodes.sampler import episode_protocol, load_episodes, with_seed

    data = with_seed(data, seed)
    if data.episode_file:
        source = _source(data)
        records = load_episodes(data.episode_file, episode_protocol(data))
        log.info("loaded %d test episodes from %s", len(records), data.episode_file)
        return _eval_dataset(data, source, records)
    return _sampled_dataset(data)


def build_val_dataset(data: DataConfig, episodes: int, seed: int) -> EpisodeDataset:
    """`episodes` validation episodes of the fold's novel classes on split data.split, sampled with `seed`."""
    from episodes.sampler import with_seed

    return _sampled_dataset(with_seed(data, seed, episodes))


def build_train_dataset(data: DataConfig, seed: int) -> EpisodeDataset:
    """Training episodes over the fold's base classes (lists.train_pairs), augmented; item i depends on (seed, i)."""
    from episodes.dataset import EpisodeDataset
    from episodes.lists import train_pairs
    from episodes.sampler import TrainEpisodes
    from episodes.transforms import build_transform

    source = _source(data)
    records = TrainEpisodes(train_pairs(source, data), data.shots, seed, ways=data.ways)
    return EpisodeDataset(source, records, build_transform(data, train=True), keep_original=False, seed=seed)


def __getattr__(name: str) -> Any:
    if name == "collate_episodes":
        from episodes.dataset import collate_episodes

        return collate_episodes
    raise AttributeError(f"module 'episodes' has no attribute {name!r}")


def _source(data: DataConfig):
    from episodes.sources import build_source

    return build_source(data)


def _sampled_dataset(data: DataConfig) -> EpisodeDataset:
    from episodes.lists import test_pairs
    from episodes.sampler import make_test_episodes, query_order

    source = _source(data)
    pairs = test_pairs(source, data)
    records = make_test_episodes(
        pairs, data.episodes, data.shots, data.seed, query_order(data.dataset), ways=data.ways, fold=data.fold
    )
    return _eval_dataset(data, source, records)


def _eval_dataset(data: DataConfig, source, records) -> EpisodeDataset:
    from episodes.dataset import EpisodeDataset
    from episodes.transforms import build_transform

    keep_original = data.eval_resolution == "original"
    return EpisodeDataset(source, records, build_transform(data, train=False), keep_original, seed=data.seed)

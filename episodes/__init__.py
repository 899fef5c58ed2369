"""Few-shot episodes: datasets on disk, fold splits, list conventions, seeded sampling, transforms.

The front door for the tools:
    build_test_dataset(data, seed)           the fold's fixed test episodes (or data.episode_file's)
    build_test_datasets(data, seeds)         the same for several seeds, sharing one source
    build_val_dataset(data, episodes, seed)  the same machinery on a validation seed and count
    save_test_episodes(data, seed, path)     the fold's test episodes of a seed as a file for data.episode_file
    build_train_dataset(data, seed)          endless random training episodes over the base classes, augmented
    collate_episodes(batch)                  the DataLoader collate function of all three
    evaluated(data), validate_fold(data)     the data settings of the scored episodes; a check of data.fold
Importing the package is cheap: the modules behind these load on first use.

Cross-domain (data.target.dataset set, PATNet / DMTNet): training episodes come from every class of data.dataset, and
test and validation episodes from fold data.fold of the target dataset at data.target.root.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from episodes.dataset import EpisodeDataset
    from fewshot.config import DataConfig

log = logging.getLogger(__name__)

__all__ = [
    "build_test_dataset", "build_test_datasets", "build_val_dataset", "build_train_dataset", "collate_episodes",
    "save_test_episodes", "evaluated", "validate_fold",
]  # fmt: skip


def evaluated(data: DataConfig) -> DataConfig:
    """The data settings of the scored (test and validation) episodes: `data`, or for a cross-domain run its target.

    The target view reads data.target.dataset at data.target.root; the training dataset's id lists and list folder do
    not apply to it. A target whose benchmark does not fix its classes' images (its source has no `fixed_pairs`)
    pairs every image with each class it holds (the pfenet rule at 1 pixel).
    """
    target = data.target
    if not target.dataset:
        return data
    return dataclasses.replace(
        data,
        dataset=target.dataset,
        root=target.root,
        lists="pfenet",
        min_pixels=1,
        train_list="",
        val_list="",
        list_dir="",
        target=type(target)(),
    )


def validate_fold(data: DataConfig) -> None:
    """Raises ValueError naming the dataset and its valid folds unless data.fold is a fold of the evaluated dataset."""
    from episodes.folds import check_fold

    view = evaluated(data)
    check_fold(data.fold, _source(view).num_folds, view.dataset)


def build_test_dataset(data: DataConfig, seed: int | None = None) -> EpisodeDataset:
    """Test episodes of fold data.fold on split data.split for `seed` (default the first of data.seeds).

    With data.episode_file set, the episodes come from that file, which must have been made under the same protocol
    (fewshot.provenance.episode_fields, this seed included) on the same data (sampler.file_protocol's fingerprint
    of the fold's test pairs), and whose every episode the protocol could have drawn (sampler.check_episodes);
    otherwise they are drawn by data.sampler (episodes.official.fold_sampler: native, hsnet or pfenet).
    """
    return build_test_datasets(data, [data.seeds[0] if seed is None else seed])[0]


def build_test_datasets(data: DataConfig, seeds: list[int] | None = None) -> list[EpisodeDataset]:
    """`build_test_dataset` for each of `seeds` (default data.seeds), over one source and one list of pairs (a COCO
    json is read once)."""
    from episodes.official import fold_sampler
    from episodes.sampler import check_episodes, file_protocol, load_episodes

    data = evaluated(data)
    source = _source(data)
    sampler = fold_sampler(source, data)
    datasets = []
    for seed in data.seeds if seeds is None else seeds:
        if data.episode_file:
            records = load_episodes(data.episode_file, file_protocol(data, seed, sampler.pairs, sampler.fields))
            check_episodes(records, sampler.pairs, source, data, data.episode_file, sampler.queries)
            log.info("loaded %d test episodes from %s", len(records), data.episode_file)
        else:
            records = sampler.draw(data.episodes, seed)
        datasets.append(_eval_dataset(data, source, records, seed))
    return datasets


def save_test_episodes(data: DataConfig, seed: int, path: str | Path) -> int:
    """Draws the test episodes of data.fold for `seed` with data.sampler (data.episode_file is not read) and writes
    them to `path` as an episode file for data.episode_file, with the fingerprint of the data they come from; returns
    their count."""
    from episodes.official import fold_sampler
    from episodes.sampler import file_protocol, save_episodes

    data = evaluated(data)
    sampler = fold_sampler(_source(data), data)
    records = sampler.draw(data.episodes, seed)
    save_episodes(path, records, file_protocol(data, seed, sampler.pairs, sampler.fields))
    return len(records)


def build_val_dataset(data: DataConfig, episodes: int, seed: int) -> EpisodeDataset:
    """`episodes` validation episodes of the fold's novel classes on split data.split, drawn by data.sampler with
    `seed`."""
    from episodes.official import fold_sampler

    data = dataclasses.replace(evaluated(data), episodes=episodes)
    source = _source(data)
    return _eval_dataset(data, source, fold_sampler(source, data).draw(episodes, seed), seed)


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


def _eval_dataset(data: DataConfig, source, records, seed: int) -> EpisodeDataset:
    from episodes.dataset import EpisodeDataset
    from episodes.transforms import build_transform

    keep_original = data.eval_resolution == "original"
    return EpisodeDataset(source, records, build_transform(data, train=False), keep_original, seed=seed)

"""Which algorithm draws a fold's test episodes (`data.sampler`), and the official ones of HSNet and PFENet.

Published few-shot numbers are measured on the episodes of two samplers; `hsnet` and `pfenet` reproduce them draw
for draw (the algorithms, read and run from the official code, are in ../shared/OFFICIAL_EPISODES.md):

- `native` (the default for new work): sampler.make_test_episodes, each episode a pure function of (seed, index).
- `hsnet`: HSNet's test loaders (juhongm999/hsnet @ 6b1bc12), used unchanged by DCAMA, Matcher, GF-SAM, VRP-SAM.
  One stream, numpy's legacy global RandomState after `np.random.seed(seed)` (HSNet: seed 0, 1,000 episodes).
  PASCAL-5i walks HSNet's val/fold{f}.txt in file order and restarts; COCO-20i draws the class, then the query,
  uniformly (`np.random.choice`); FSS-1000 (data.dataset=fss1000) walks every image of the sorted test classes once
  (2,400 episodes). Each support is an independent draw from the class's list, redrawn when it equals the query:
  **supports repeat** (the protocol records support_draw=independent).
- `pfenet`: PFENet's val loader (dvlab-research/PFENet @ a505675) on PASCAL-5i (seed 321, 5,001 episodes). Its list
  holds the images with a novel class of >= data.min_pixels pixels, walked image by image, pass after pass. The
  loader's 8 DataLoader workers draw from Python's `random`: worker w = image index mod 8 seeds it with
  `base_seed + w`, where each pass draws a new int64 base seed from torch's generator seeded with `seed`. Per image:
  a random class among the novel classes present with any pixel count (possibly below min_pixels), then K distinct
  supports from that class's list, never the query. PFENet's COCO-20i cannot be followed here: it reads PFENet's own
  COCO lists and masks, which are not public.

Class ids are the project's (1-based VOC / COCO ids: HSNet's 0-based index + 1); for FSS-1000 an episode file also
records HSNet's class numbering (`hsnet_class_ids`: 760 + rank among the sorted test classes, 520 + for val).
A cross-domain run (data.target) draws its target's episodes: the checks read the evaluated view (episodes.evaluated).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from episodes import evaluated
from episodes.base import DataError, Episode, Source
from episodes.index import MaskIndex
from episodes.lists import eval_pairs, read_hsnet_entries
from episodes.sampler import make_test_episodes
from fewshot.config import ConfigError
from fewshot.provenance import query_order

if TYPE_CHECKING:
    from fewshot.config import DataConfig

OFFICIAL = {"hsnet": "HSNet", "pfenet": "PFENet"}
HSNET_DATASETS = ("pascal", "coco", "synthetic", "fss1000")
HSNET_LISTED = ("pascal", "coco", "synthetic")  # the datasets whose pairs HSNet reads from its list files
SUPPORT_DRAW = {"hsnet": "independent", "pfenet": "distinct"}  # how each official loader draws its supports
PFENET_DATASETS = ("pascal", "synthetic")
PFENET_WORKERS = 8  # PFENet's `workers` (config/pascal/*.yaml): its episodes depend on it
HSNET_FSS_OFFSETS = {"test": 760, "val": 520}  # data.fss1000.classes -> HSNet's class index = offset + sorted rank
HSNET_FSS_SUPPORTS = range(1, 11)  # HSNet draws FSS-1000 supports by name: <class>/<k>.jpg, k = 1..10
PFENET_COCO = (
    "PFENet's COCO-20i test episodes cannot be reproduced here: they are drawn from PFENet's own COCO lists "
    "(lists/coco/val_data_list.txt, 40,137 images) and masks, which are not public. Use data.sampler=hsnet "
    "(HSNet's COCO-20i episodes, from HSNet's lists) or data.sampler=native"
)


@dataclass(frozen=True)
class FoldSampler:
    """A fold's test episodes under data.sampler.

    Attributes:
        pairs: {class id: image ids} the episodes come from (episode-file fingerprint and checks, --pairs export).
        draw: (episodes, seed) -> the first `episodes` test episodes of `seed`.
        queries: {class id: image ids} a query of the class may be, where that goes beyond `pairs` (PFENet: every
            image of its list that holds a pixel of the class); None = `pairs`.
        fields: what an episode file records beyond fewshot.provenance.episode_fields.
    """

    pairs: dict[int, list[str]]
    draw: Callable[[int, int], list[Episode]]
    queries: dict[int, list[str]] | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def sampler_problem(data: DataConfig) -> str | None:
    """Why data.sampler cannot draw this config's (evaluated) episodes, naming what is missing and what would work;
    None when it can."""
    data = evaluated(data)
    sampler = data.sampler
    if sampler == "native":
        return None
    name, key = OFFICIAL[sampler], f"data.sampler={sampler}"
    if data.ways != 1 or data.split != "val":
        return (
            f"{key} reproduces {name}'s 1-way test episodes of split val; data.ways={data.ways} and "
            f"data.split={data.split!r} need data.sampler=native"
        )
    bad = [s for s in data.seeds if not 0 <= s < 2**32]
    if bad:
        return f"{key}: seeds {bad} cannot seed {name}'s generators; use seeds in 0 .. 2**32 - 1"
    if sampler == "pfenet" and data.dataset == "coco":
        return f"{key}: {PFENET_COCO}"
    supported = HSNET_DATASETS if sampler == "hsnet" else PFENET_DATASETS
    if data.dataset not in supported:
        fss = " (FSS-1000: data.dataset=fss1000)" if data.dataset == "folder" and sampler == "hsnet" else ""
        return (
            f"{key} reproduces {name}'s loaders of data.dataset {' | '.join(supported)}{fss}, not "
            f"{data.dataset!r}; use data.sampler=native"
        )
    if sampler == "pfenet" and data.support_draw != "distinct":
        return f"{key}: PFENet draws distinct supports; data.support_draw={data.support_draw!r} needs native"
    if sampler == "hsnet" and data.dataset in HSNET_LISTED and (data.lists != "hsnet" or not data.list_dir):
        return (
            f"{key} draws from HSNet's list files: set data.lists=hsnet (not {data.lists!r}) and data.list_dir "
            f"(now {data.list_dir!r}) to a copy of HSNet's data/splits/pascal or data/splits/coco (val/fold{{f}}.pkl)"
        )
    if sampler == "hsnet" and data.dataset == "coco" and data.coco.split != "interleaved":
        return f"{key}: HSNet's COCO-20i folds are interleaved; data.coco.split={data.coco.split!r} needs native"
    if sampler == "pfenet" and data.lists not in ("pfenet", "bam"):
        return (
            f"{key} draws from PFENet's val pairs (>= data.min_pixels pixels of the class): set data.lists=pfenet "
            f"(or bam: the same test pairs), not {data.lists!r}; HSNet's lists go with data.sampler=hsnet"
        )
    return None


def fold_sampler(source: Source, data: DataConfig) -> FoldSampler:
    """The FoldSampler of data.sampler over `source`, the evaluated dataset (`data` its evaluated view,
    episodes.evaluated); a sampler that does not fit raises ConfigError (sampler_problem) or DataError (a class too
    small for the official loop to end)."""
    problem = sampler_problem(data)
    if problem:
        raise ConfigError(problem)
    pairs = eval_pairs(source, data)  # HSNet's lists: every listed image and class checked against the source
    if data.sampler == "native":
        order = query_order(data.dataset)

        def native(episodes: int, seed: int) -> list[Episode]:
            return make_test_episodes(
                pairs, episodes, data.shots, seed, order, ways=data.ways, fold=data.fold, support_draw=data.support_draw
            )

        return FoldSampler(pairs, native)
    if data.sampler == "pfenet":
        return _pfenet(source, data, pairs)
    if data.dataset == "fss1000":
        return _hsnet_fss(source, data, pairs)
    entries = read_hsnet_entries(data.list_dir, "val", data.fold, source.num_folds)  # file order, repeats kept
    pools = _pools(entries)
    if data.dataset == "coco":
        empty = [c for c in pairs if c not in pools]  # HSNet draws the class among all 20 of the fold
        if empty:
            raise DataError(f"HSNet's COCO-20i loader would draw from an empty list: no entry of classes {empty}")
        return FoldSampler(pairs, lambda n, seed: hsnet_class_uniform(pools, n, data.shots, seed))
    return FoldSampler(pairs, lambda n, seed: hsnet_walk(entries, pools, n, data.shots, seed))


# --------------------------------------------------------------------------------------------------------------------
# HSNet.


class LegacyStream:
    """numpy's legacy global RandomState after `np.random.seed(seed)`, as HSNet's test draws from it.

    `index(n)` is the position `np.random.choice(seq, 1, replace=False)[0]` takes in any sequence of length n, with
    the same use of the stream. Legacy choice without replacement is `permutation(n)[:1]`, a full Fisher-Yates
    shuffle of arange(n) (n - 1 bounded draws); calling permutation on the length skips what makes HSNet's call
    slow, turning its list of up to 19,217 file names into an array on every draw (tests prove the two equal).
    """

    def __init__(self, seed: int) -> None:
        self._state = np.random.RandomState(seed)

    def index(self, n: int) -> int:
        if n < 1:
            raise DataError("HSNet's loader would draw from an empty list")
        return int(self._state.permutation(n)[0])


def _pools(entries: Sequence[tuple[str, int]]) -> dict[int, list[str]]:
    """{class id: images} of (image, class) entries, in entry order (HSNet's img_metadata_classwise)."""
    pools: dict[int, list[str]] = {}
    for image_id, class_id in entries:
        pools.setdefault(class_id, []).append(image_id)
    return pools


def _check_pools(pools: dict[int, list[str]], shots: int) -> None:
    """HSNet redraws a support equal to the query forever when a class lists one image only."""
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    small = {c: ids for c, ids in sorted(pools.items()) if len(set(ids)) < 2}
    if small:
        raise DataError(f"HSNet's loader never ends on a class listing fewer than 2 images: {small}")


def _hsnet_supports(stream: LegacyStream, pool: list[str], query: str, shots: int) -> tuple[str, ...]:
    """HSNet's support loop: independent draws from the class's list, a draw equal to the query discarded."""
    supports: list[str] = []
    while len(supports) < shots:
        support = pool[stream.index(len(pool))]
        if support != query:
            supports.append(support)
    return tuple(supports)


def hsnet_walk(
    walk: Sequence[tuple[str, int]], pools: dict[int, list[str]], episodes: int, shots: int, seed: int
) -> list[Episode]:
    """HSNet's PASCAL-5i (and FSS-1000) test: episode n queries walk[n mod len(walk)] (image, class); its supports
    are drawn from pools[class] on one legacy stream seeded with `seed`."""
    _check_pools({c: pools[c] for _, c in walk}, shots)
    stream = LegacyStream(seed)
    out = []
    for n in range(episodes):
        query, class_id = walk[n % len(walk)]
        out.append(Episode(query, _hsnet_supports(stream, pools[class_id], query, shots), class_id))
    return out


def hsnet_class_uniform(pools: dict[int, list[str]], episodes: int, shots: int, seed: int) -> list[Episode]:
    """HSNet's COCO-20i test: per episode the class (uniform over the sorted classes), the query (uniform over the
    class's list, in pickle order) and the supports, all from one legacy stream seeded with `seed`."""
    _check_pools(pools, shots)
    classes = sorted(pools)
    stream = LegacyStream(seed)
    out = []
    for _ in range(episodes):
        class_id = classes[stream.index(len(classes))]
        pool = pools[class_id]
        query = pool[stream.index(len(pool))]
        out.append(Episode(query, _hsnet_supports(stream, pool, query, shots), class_id))
    return out


def _hsnet_fss(source: Source, data: DataConfig, pairs: dict[int, list[str]]) -> FoldSampler:
    """HSNet's FSS-1000 test over its one fold: the tested classes in name order (class ids follow the sorted
    folders), each class's images in file order; supports drawn by name, <class>/1 .. <class>/10."""
    known = set(source.image_ids(data.split))
    pools = {c: [f"{source.class_names[c]}/{k}" for k in HSNET_FSS_SUPPORTS] for c in pairs}
    missing = [image for pool in pools.values() for image in pool if image not in known]
    if missing:
        raise DataError(
            f"HSNet's FSS-1000 loader draws supports <class>/1.jpg .. 10.jpg, but {len(missing)} are not image/mask "
            f"pairs of {source.root} (e.g. {missing[:3]}); FSS-1000 holds 10 per class"
        )
    walk = [(image, c) for c in sorted(pairs) for image in pairs[c]]
    offset = HSNET_FSS_OFFSETS[data.fss1000.classes]
    hsnet_ids = {str(c): offset + rank for rank, c in enumerate(sorted(pairs))}

    def draw(episodes: int, seed: int) -> list[Episode]:
        if episodes > len(walk):
            raise DataError(
                f"HSNet's FSS-1000 {data.fss1000.classes} set has one episode per image ({len(walk)}); "
                f"data.episodes={episodes} exceeds it: use data.episodes={len(walk)}"
            )
        return hsnet_walk(walk, pools, episodes, data.shots, seed)

    return FoldSampler(pairs, draw, fields={"hsnet_class_ids": hsnet_ids})


# --------------------------------------------------------------------------------------------------------------------
# PFENet.


def pfenet_base_seeds(seed: int, count: int) -> list[int]:
    """The base seed of each of `count` DataLoader passes after `torch.manual_seed(seed)`: torch draws
    `torch.empty((), dtype=torch.int64).random_()` per iterator, i.e. mt19937 (seeded with seed mod 2**32, as
    numpy's legacy seeding does) -> two 32-bit words, high first -> mod 2**63."""
    words = np.random.RandomState(seed % 2**32)._bit_generator.random_raw(2 * count)
    return [((int(words[2 * k]) << 32) | int(words[2 * k + 1])) % 2**63 for k in range(count)]


def pfenet_episodes(
    images: Sequence[str],
    present: dict[str, list[int]],
    pools: dict[int, list[str]],
    episodes: int,
    shots: int,
    seed: int,
    workers: int = PFENET_WORKERS,
) -> list[Episode]:
    """PFENet's val episodes: passes over `images` (its data_list) until `episodes` are drawn.

    Args:
        images: the images with a novel class of >= min_pixels pixels, in list order.
        present: image -> the novel classes its label holds with any pixel count, ascending.
        pools: class -> the images holding >= min_pixels of it, in list order (sub_class_file_list).
        workers: PFENet's DataLoader workers; image i of a pass is drawn in worker i mod workers.
    """
    for query in images:
        for class_id in present[query]:
            if len(pools.get(class_id, [])) - (query in pools.get(class_id, [])) < shots:
                raise DataError(
                    f"PFENet's loader never ends on query {query!r}, class {class_id}: its list holds fewer than "
                    f"{shots} other images of the class ({pools.get(class_id, [])}); use fewer shots"
                )
    out: list[Episode] = []
    for base_seed in pfenet_base_seeds(seed, -(-episodes // len(images))):
        streams = [random.Random(base_seed + w) for w in range(workers)]  # torch's worker loop: random.seed(base + w)
        for i, query in enumerate(images[: episodes - len(out)]):
            rng = streams[i % workers]
            classes = present[query]
            class_id = classes[rng.randint(1, len(classes)) - 1]
            pool = pools[class_id]
            chosen: list[int] = []
            for _ in range(shots):
                rng.randint(1, len(pool))  # PFENet's first draw of each shot is overwritten before use
                index = rng.randint(1, len(pool)) - 1
                while pool[index] == query or index in chosen:
                    index = rng.randint(1, len(pool)) - 1
                chosen.append(index)
            out.append(Episode(query, tuple(pool[j] for j in chosen), class_id))
    return out


def _pfenet(source: Source, data: DataConfig, pairs: dict[int, list[str]]) -> FoldSampler:
    """PFENet's val loader over the fold's pfenet pairs; the classes present in each query come from the mask index."""
    listed = {i for ids in pairs.values() for i in ids}
    images = [i for i in source.image_ids(data.split) if i in listed]
    if not images:
        raise DataError(f"fold {data.fold} has no test pair under data.lists={data.lists}: PFENet's list is empty")
    index = MaskIndex.load_or_build(source, data.split, data.cache_dir or None)
    present = {i: sorted(c for c in index.classes(i) if c in pairs) for i in images}
    queries = {c: [i for i in images if c in present[i]] for c in pairs}
    return FoldSampler(
        pairs, lambda n, seed: pfenet_episodes(images, present, pairs, n, data.shots, seed), queries=queries
    )

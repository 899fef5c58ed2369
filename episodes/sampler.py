"""Episode sampling: a fixed, seeded list of test episodes and an endless, indexable stream of training episodes.

This is the native sampler (`data.sampler=native`); episodes.official reproduces HSNet's and PFENet's test episodes.

Every episode is a pure function of (seed, its index, the pairs), drawn from `np.random.default_rng([seed, tag, i])`,
so the list is the same whatever the DataLoader workers, batch size or model, and a resumed run sees the same data.

Query order (`fewshot.provenance.query_order`):
    walk           HSNet on PASCAL and FSS-1000: the (image, class) pairs sorted by (image id, class id), as in
                   HSNet's list files, walked in order and cycled when `episodes` exceeds their number.
    class_uniform  HSNet on COCO: the class is drawn uniformly, then the query uniformly among its images.
    class_cycle    PATNet and DMTNet on Deepglobe, ISIC and Chest X-ray: episode n is of class n mod C (classes in
                   id order), its query drawn uniformly among the class's images.
Supports (data.support_draw) are `shots` images of the episode class, never the query, drawn uniformly: `distinct`
(no image twice) or `independent` (HSNet's, PATNet's and DMTNet's loaders: `shots` separate draws, repeats possible).

N-way (`ways` > 1): an N-way episode is recorded as N consecutive Episode records that share one query; record
n * ways + w asks for way w. Way 0 is the class the query order gives (so it is present in the query); ways 1..N-1
are distinct other classes of the pool drawn uniformly, and may be absent from the query (their target is then
empty: the N-way setting measures false positives). Supports are distinct across the whole episode and never the
query. `episodes` counts N-way episodes, so the list holds episodes * ways records; each record is scored as a
1-way binary episode by the usual metric.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import numpy as np

from episodes.base import DataError, Episode, Source
from fewshot.config import SupportDraw
from fewshot.io import write_json

if TYPE_CHECKING:
    from fewshot.config import DataConfig

log = logging.getLogger(__name__)

QUERY_ORDERS = ("walk", "class_uniform", "class_cycle")
SUPPORT_DRAWS = get_args(SupportDraw)
_TEST, _TRAIN = 1, 2  # rng stream tags: test and training episodes never share random numbers


def make_test_episodes(
    pairs: dict[int, list[str]],
    episodes: int,
    shots: int,
    seed: int,
    query_order: str,
    *,
    ways: int = 1,
    fold: int | None = None,
    support_draw: str = "distinct",
) -> list[Episode]:
    """The fixed test list: `episodes` episodes (times `ways` records) from `pairs` {class id: image ids}.

    Raises DataError when a class has fewer than shots + 1 images (2 with independent supports; naming the class
    and `fold`) or when the pool has fewer than `ways` classes.
    """
    if query_order not in QUERY_ORDERS:
        raise ValueError(f"unknown query_order {query_order!r}; choose from {', '.join(QUERY_ORDERS)}")
    if support_draw not in SUPPORT_DRAWS:
        raise ValueError(f"unknown support_draw {support_draw!r}; choose from {', '.join(SUPPORT_DRAWS)}")
    least = 2 if support_draw == "independent" else None  # the query and one other image to draw from
    pool = _checked_pool(pairs, shots, ways, fold, skip_small=False, least=least)
    classes = sorted(pool)
    walk = sorted((image, c) for c in classes for image in pool[c])
    out: list[Episode] = []
    for n in range(episodes):
        rng = np.random.default_rng([seed, _TEST, n])
        if query_order == "walk":
            query, class_id = walk[n % len(walk)]
        else:
            pick = n % len(classes) if query_order == "class_cycle" else rng.integers(len(classes))
            class_id = classes[pick]
            query = pool[class_id][rng.integers(len(pool[class_id]))]
        out += _episode_records(rng, pool, classes, query, class_id, shots, ways, support_draw)
    return out


class TrainEpisodes:
    """Training episodes over the base classes: record i is a pure function of (seed, i), drawn at random.

    The class is drawn uniformly among the classes with at least shots + 1 images (the others are skipped with a
    warning), then the query and supports uniformly. With `ways` > 1, records come in groups of `ways` sharing a
    query, as in the module docstring. `length` is how many records `len()` reports (iteration needs a length; the
    stream itself is endless): read them in order, starting at step * batch_size when resuming.
    """

    def __init__(
        self, pairs: dict[int, list[str]], shots: int, seed: int, *, ways: int = 1, length: int = 10**9
    ) -> None:
        self.pool = _checked_pool(pairs, shots, ways, None, skip_small=True)
        self.classes = sorted(self.pool)
        self.shots, self.seed, self.ways, self.length = shots, seed, ways, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Episode:
        if not 0 <= index < self.length:
            raise IndexError(f"training episode {index} out of range 0..{self.length - 1}")
        group, way = divmod(index, self.ways)
        rng = np.random.default_rng([self.seed, _TRAIN, group])
        class_id = self.classes[rng.integers(len(self.classes))]
        query = self.pool[class_id][rng.integers(len(self.pool[class_id]))]
        return _episode_records(rng, self.pool, self.classes, query, class_id, self.shots, self.ways)[way]


def _checked_pool(
    pairs: dict[int, list[str]], shots: int, ways: int, fold: int | None, skip_small: bool, least: int | None = None
) -> dict[int, list[str]]:
    """{class: distinct image ids} with every class holding at least `least` (default shots + 1) images."""
    if shots < 1 or ways < 1:
        raise ValueError(f"shots and ways must be at least 1, got shots={shots}, ways={ways}")
    where = "" if fold is None else f" of fold {fold}"
    least = shots + 1 if least is None else least
    pool = {int(c): list(dict.fromkeys(ids)) for c, ids in pairs.items()}
    small = {c: len(ids) for c, ids in pool.items() if len(ids) < least}
    if small and not skip_small:
        c, n = next(iter(sorted(small.items())))
        need = f"shots + 1 = {least}" if least == shots + 1 else f"the {least} that independent supports need"
        raise DataError(
            f"class {c}{where} has {n} image(s), fewer than {need}; all classes short of images: {small}. "
            "Use fewer shots or a list / min_pixels that keeps more images."
        )
    if small:
        log.warning("skipping classes with fewer than %d images: %s", least, small)
    pool = {c: ids for c, ids in pool.items() if c not in small}
    if len(pool) < ways:
        raise DataError(f"{ways}-way episodes need {ways} classes with >= {least} images{where}; found {sorted(pool)}")
    return pool


def _episode_records(
    rng: np.random.Generator,
    pool: dict[int, list[str]],
    classes: list[int],
    query: str,
    class_id: int,
    shots: int,
    ways: int,
    support_draw: str = "distinct",
) -> list[Episode]:
    """One episode's `ways` records: way 0 is `class_id`, the others distinct classes drawn from the pool."""
    others = [c for c in classes if c != class_id]
    way_classes = [class_id] + [others[j] for j in rng.permutation(len(others))[: ways - 1]]
    used = {query}
    records = []
    for c in way_classes:
        ids = pool[c]
        if support_draw == "independent":  # `shots` uniform draws among the class's images other than the query
            candidates = [i for i in ids if i != query]
            records.append(Episode(query, tuple(candidates[j] for j in rng.integers(len(candidates), size=shots)), c))
            continue
        # k distinct draws in random order hold at least `shots` images outside `used`
        drawn = rng.choice(len(ids), min(len(ids), shots + len(used)), replace=False)
        supports = tuple([ids[j] for j in drawn if ids[j] not in used][:shots])
        if len(supports) < shots:
            raise DataError(f"class {c} has too few images left for {shots} supports in a {ways}-way episode")
        used.update(supports)
        records.append(Episode(query, supports, c))
    return records


# --------------------------------------------------------------------------------------------------------------------
# Protocol and episode files.


def pairs_fingerprint(pairs: dict[int, list[str]]) -> str:
    """sha256 of a fold's test pairs {class: image ids}: a content fingerprint of the data the episodes come from.

    It is the same for two copies of a dataset (paths and file times do not enter it) and differs for another
    data.root, or masks edited so that a pair appears or disappears.
    """
    canonical = json.dumps({str(c): list(ids) for c, ids in sorted(pairs.items())}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def file_protocol(
    data: DataConfig, seed: int, pairs: dict[int, list[str]], fields: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The protocol an episode file of `seed` records: fewshot.provenance.episode_fields, the sampler's own `fields`
    (official.FoldSampler.fields) and `pairs_sha256`, the fingerprint of the test pairs of the data it was made on
    (so that a file made on another data.root is refused)."""
    from fewshot.provenance import episode_fields

    return {**episode_fields(data, seed), **(fields or {}), "pairs_sha256": pairs_fingerprint(pairs)}


def save_episodes(path: str | Path, episodes: list[Episode], protocol: dict[str, Any]) -> None:
    """Writes `{"protocol": {...}, "episodes": [{"query", "supports", "class_id"}, ...]}` atomically."""
    write_json(path, {"protocol": protocol, "episodes": [e.to_json() for e in episodes]})


def support_problem(episode: Episode, allow_repeats: bool = False) -> str | None:
    """Why an episode's supports are not valid, or None. The query is never a support; a support image appears once
    per episode unless `allow_repeats` (for a sampler that draws supports independently, as HSNet's does). The one
    place this rule is written: episode files are checked with it."""
    if episode.query in episode.supports:
        return f"its query {episode.query!r} is among its supports"
    if not allow_repeats and len(set(episode.supports)) != len(episode.supports):
        return f"it has repeated supports {list(episode.supports)}"
    return None


def load_episodes(path: str | Path, protocol: dict[str, Any]) -> list[Episode]:
    """Episodes of a save_episodes file; a file made under another protocol raises DataError showing the difference.

    `protocol` is what the file must record (file_protocol for a file checked against its data). The records are
    checked for their count and supports (support_problem: repeats only where the protocol's support_draw is
    independent, as HSNet's sampler records); check_episodes checks them against the data.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        stored, records = data["protocol"], data["episodes"]
        episodes = [Episode.from_json(r) for r in records]
    except FileNotFoundError as err:
        raise DataError(f"episode file {path} does not exist; write it with tools/export_episodes.py") from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"episode file {path} is not a valid episodes JSON ({err!r}); expected "
            '{"protocol": {...}, "episodes": [{"query": id, "supports": [ids], "class_id": c}, ...]}'
        ) from err
    expected = json.loads(json.dumps(protocol))
    diff = {k: (stored.get(k), expected.get(k)) for k in sorted(set(stored) | set(expected)) if k != "pairs_sha256"}
    diff = {k: v for k, v in diff.items() if v[0] != v[1]}
    if diff:
        shown = "; ".join(f"{k}: file {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise DataError(
            f"episode file {path} was made under another protocol ({shown}); re-export it or match the config"
        )
    if stored.get("pairs_sha256") != expected.get("pairs_sha256"):
        made = "records no fingerprint of its data" if "pairs_sha256" not in stored else "was made on other data"
        raise DataError(
            f"episode file {path} {made} (pairs_sha256): the test pairs of fold {expected.get('fold')} under this "
            "data.root may differ from those its episodes were drawn from; re-export it with "
            "tools/export_episodes.py on this data"
        )
    count = expected.get("episodes", 0) * expected.get("ways", 1)
    if "episodes" in expected and len(episodes) != count:
        raise DataError(f"episode file {path} holds {len(episodes)} episode records, the protocol says {count}")
    repeats = expected.get("support_draw") == "independent"  # independent draws may repeat a support
    for i, e in enumerate(episodes):
        problem = support_problem(e, allow_repeats=repeats)
        if problem:
            raise DataError(f"episode file {path}: episode {i} is not valid: {problem}")
    return episodes


def check_episodes(
    episodes: list[Episode],
    pairs: dict[int, list[str]],
    source: Source,
    data: DataConfig,
    path: str | Path,
    queries: dict[int, list[str]] | None = None,
) -> None:
    """Raises DataError, before any episode runs, unless every episode of file `path` is one the protocol could draw
    from `pairs` (the fold's test pairs): its class a novel class of the fold, its images from split data.split,
    each support a pair of the class, and so the query (for way 0 of an N-way episode; the other ways' queries may
    lack their class), or one of `queries` of the class where the sampler gives them (official.FoldSampler). The
    error counts the bad episodes and shows the first five."""
    members = {c: set(ids) for c, ids in pairs.items()}
    query_members = members if queries is None else {c: set(ids) for c, ids in queries.items()}
    in_split = set(source.image_ids(data.split))
    problems: list[str] = []
    for i, e in enumerate(episodes):
        if e.class_id not in members:
            problems.append(f"episode {i}: class {e.class_id} is not a novel class of fold {data.fold} {sorted(pairs)}")
            continue
        for role, image in [("query", e.query), *(("support", s) for s in e.supports)]:
            if image in (query_members if role == "query" else members).get(e.class_id, ()):
                continue
            if image not in in_split:
                problems.append(f"episode {i}: {role} {image!r} is not an image of split {data.split!r} (data.split)")
                continue
            if role == "query" and i % data.ways:
                continue  # ways 1..N-1 of an N-way episode may be absent from the query
            count = source.class_pixels(image).get(e.class_id, 0)
            if not count:
                problems.append(f"episode {i}: {role} {image!r} holds no pixel of class {e.class_id}")
            elif data.lists == "hsnet":
                problems.append(f"episode {i}: {role} {image!r} is not listed for class {e.class_id} in data.list_dir")
            else:
                problems.append(
                    f"episode {i}: {role} {image!r} holds {count} pixels of class {e.class_id}, fewer than "
                    f"data.min_pixels={data.min_pixels}"
                )
    if problems:
        shown = "\n  ".join(problems[:5]) + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DataError(
            f"episode file {path}: {len(problems)} problem(s) with its episodes against the masks of {source.root} "
            f"(lists={data.lists}, fold {data.fold}, split {data.split}):\n  {shown}\n"
            "An episode file must hold episodes the protocol could draw; re-export it with tools/export_episodes.py"
        )

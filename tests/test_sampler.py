"""Episode sampling on plain {class: image ids} pools: validity, determinism, query orders, N-way, episode files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from episodes.base import DataError, Episode
from episodes.sampler import (
    TrainEpisodes,
    load_episodes,
    make_test_episodes,
    save_episodes,
    support_problem,
)
from fewshot.config import CocoConfig, DataConfig
from fewshot.provenance import episode_fields, query_order

# class 3 is much larger than the others: the two query orders differ in how often it is drawn
PAIRS = {
    1: ["a01", "a02", "a03", "shared"],
    2: ["b01", "b02", "shared"],
    3: [f"c{i:02d}" for i in range(40)] + ["shared"],
}


def _valid(episodes: list[Episode], pairs: dict[int, list[str]], shots: int) -> None:
    for e in episodes:
        assert e.query in pairs[e.class_id]
        assert all(s in pairs[e.class_id] for s in e.supports)
        assert e.query not in e.supports
        assert len(e.supports) == shots == len(set(e.supports))


@pytest.mark.parametrize("order", ["walk", "class_uniform"])
@pytest.mark.parametrize("shots", [1, 2])
def test_test_episodes_are_valid_and_deterministic(order: str, shots: int) -> None:
    episodes = make_test_episodes(PAIRS, 300, shots, seed=0, query_order=order)
    assert len(episodes) == 300
    _valid(episodes, PAIRS, shots)
    assert episodes == make_test_episodes(PAIRS, 300, shots, seed=0, query_order=order)
    assert episodes != make_test_episodes(PAIRS, 300, shots, seed=1, query_order=order)
    # episode i does not depend on how many are made
    assert make_test_episodes(PAIRS, 50, shots, seed=0, query_order=order) == episodes[:50]


def test_walk_follows_sorted_pairs_and_cycles() -> None:
    walk = sorted((image, c) for c, ids in PAIRS.items() for image in ids)
    episodes = make_test_episodes(PAIRS, 2 * len(walk) + 3, 1, seed=0, query_order="walk")
    assert [(e.query, e.class_id) for e in episodes] == (walk * 3)[: len(episodes)]
    # a cycled pair gets other supports
    assert any(episodes[i].supports != episodes[i + len(walk)].supports for i in range(len(walk)))


def test_class_uniform_draws_classes_evenly_where_walk_does_not() -> None:
    uniform = Counter(e.class_id for e in make_test_episodes(PAIRS, 3000, 1, 0, "class_uniform"))
    walk = Counter(e.class_id for e in make_test_episodes(PAIRS, 3000, 1, 0, "walk"))
    assert all(900 < uniform[c] < 1100 for c in PAIRS)
    assert walk[3] > 2000
    assert query_order("coco") == "class_uniform" and query_order("pascal") == "walk"
    with pytest.raises(ValueError, match="walk, class_uniform"):
        make_test_episodes(PAIRS, 10, 1, 0, "random")


def test_a_class_short_of_images_names_class_and_fold() -> None:
    with pytest.raises(DataError, match=r"class 2 of fold 3 has 3 image\(s\), fewer than shots \+ 1 = 4"):
        make_test_episodes(PAIRS, 10, 3, 0, "walk", fold=3)
    with pytest.raises(DataError, match="class 1"):
        make_test_episodes({**PAIRS, 1: ["a01"]}, 10, 1, 0, "walk")


def test_n_way_records_share_a_query_with_distinct_classes_and_supports() -> None:
    episodes = make_test_episodes(PAIRS, 40, 1, seed=0, query_order="walk", ways=3)
    assert len(episodes) == 120
    _valid(episodes[::3], PAIRS, 1)  # way 0 holds the query's own class; the other ways may be absent from it
    for e in episodes:
        assert e.query not in e.supports and all(s in PAIRS[e.class_id] for s in e.supports)
    walk = sorted((image, c) for c, ids in PAIRS.items() for image in ids)
    for n in range(40):
        group = episodes[3 * n : 3 * n + 3]
        assert (group[0].query, group[0].class_id) == walk[n]
        assert len({e.query for e in group}) == 1 and len({e.class_id for e in group}) == 3
        supports = [s for e in group for s in e.supports]
        assert len(set(supports)) == len(supports)
    with pytest.raises(DataError, match="4-way"):
        make_test_episodes(PAIRS, 10, 1, 0, "walk", ways=4)


def test_train_episodes_are_a_pure_function_of_seed_and_index() -> None:
    train = TrainEpisodes(PAIRS, shots=2, seed=5, length=1000)
    forward = [train[i] for i in range(200)]
    backward = [TrainEpisodes(PAIRS, shots=2, seed=5, length=1000)[i] for i in reversed(range(200))]
    assert forward == backward[::-1]
    assert forward != [TrainEpisodes(PAIRS, shots=2, seed=6)[i] for i in range(200)]
    _valid(forward, PAIRS, 2)
    assert Counter(e.class_id for e in forward).keys() == PAIRS.keys()
    assert len(train) == 1000
    with pytest.raises(IndexError):
        train[1000]


def test_train_episodes_skip_small_classes_and_support_n_way() -> None:
    train = TrainEpisodes({**PAIRS, 4: ["only"]}, shots=1, seed=0)
    assert {train[i].class_id for i in range(100)} == {1, 2, 3}
    two_way = TrainEpisodes(PAIRS, shots=1, seed=0, ways=2)
    for i in range(0, 40, 2):
        a, b = two_way[i], two_way[i + 1]
        assert a.query == b.query and a.class_id != b.class_id and not set(a.supports) & set(b.supports)
    with pytest.raises(DataError, match="need 2 classes"):
        TrainEpisodes({1: PAIRS[1], 4: ["only"]}, shots=1, seed=0, ways=2)


def test_protocol_holds_every_defining_field() -> None:
    protocol = episode_fields(DataConfig(dataset="coco", fold=2, shots=5, coco=CocoConfig(split="consecutive")), 3)
    for key in ("dataset", "fold", "split", "lists", "shots", "ways", "episodes", "seed", "min_pixels", "coco_split",
                "coco_crowd", "novel_in_train", "train_list", "val_list", "list_dir", "resize", "image_size",
                "eval_resolution"):  # fmt: skip
        assert key in protocol
    assert protocol["query_order"] == "class_uniform" and protocol["coco_split"] == "consecutive"
    assert protocol["seed"] == 3
    synthetic = episode_fields(DataConfig(dataset="synthetic"), 0)
    assert "synthetic" in synthetic and "synthetic" not in protocol
    assert "coco_split" not in synthetic and "coco_crowd" not in synthetic  # per-dataset fields only for their dataset
    json.dumps(protocol)


def test_episode_file_round_trip_and_protocol_mismatch(tmp_path: Path) -> None:
    data = DataConfig(dataset="pascal", episodes=30)
    episodes = make_test_episodes(PAIRS, 30, 1, 0, "walk")
    path = tmp_path / "episodes.json"
    save_episodes(path, episodes, episode_fields(data, 0))
    stored = json.loads(path.read_text())
    assert stored["episodes"][0] == {"query": episodes[0].query, "supports": list(episodes[0].supports),
                                     "class_id": episodes[0].class_id}  # fmt: skip
    assert load_episodes(path, episode_fields(data, 0)) == episodes
    other = DataConfig(dataset="pascal", episodes=30, fold=2, shots=5)
    with pytest.raises(DataError, match=r"another protocol.*fold: file 0 vs config 2.*shots: file 1 vs config 5"):
        load_episodes(path, episode_fields(other, 0))


def test_broken_episode_files_are_refused(tmp_path: Path) -> None:
    protocol = episode_fields(DataConfig(dataset="pascal", episodes=2), 0)
    with pytest.raises(DataError, match="does not exist; write it with tools/export_episodes.py"):
        load_episodes(tmp_path / "missing.json", protocol)
    bad = tmp_path / "bad.json"
    bad.write_text('{"episodes": []}')
    with pytest.raises(DataError, match="not a valid episodes JSON"):
        load_episodes(bad, protocol)
    records = [{"query": "a", "supports": ["a"], "class_id": 1}, {"query": "b", "supports": ["c"], "class_id": 1}]
    bad.write_text(json.dumps({"protocol": protocol, "episodes": records}))
    with pytest.raises(DataError, match="episode 0 is not valid: its query 'a' is among its supports"):
        load_episodes(bad, protocol)
    records[0] = {"query": "a", "supports": ["b", "b"], "class_id": 1}
    bad.write_text(json.dumps({"protocol": protocol, "episodes": records}))
    with pytest.raises(DataError, match=r"episode 0 is not valid: it has repeated supports \['b', 'b'\]"):
        load_episodes(bad, protocol)
    bad.write_text(json.dumps({"protocol": protocol, "episodes": records[1:]}))
    with pytest.raises(DataError, match="holds 1 episode records, the protocol says 2"):
        load_episodes(bad, protocol)


def test_the_support_rule_refuses_the_query_always_and_repeats_unless_allowed() -> None:
    repeated = Episode("q", ("a", "a"), 1)
    assert support_problem(repeated) == "it has repeated supports ['a', 'a']"
    assert support_problem(repeated, allow_repeats=True) is None  # a sampler drawing supports independently
    assert support_problem(Episode("q", ("a", "q"), 1), allow_repeats=True) == "its query 'q' is among its supports"
    assert support_problem(Episode("q", ("a", "b"), 1)) is None

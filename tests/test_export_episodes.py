"""tools/export_episodes.py: the exported file loads back through data.episode_file; other protocols are refused."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

import episodes
import episodes.lists
from episodes.base import DataError, Episode
from fewshot.config import DataConfig, load_config

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("export_episodes", REPO / "tools" / "export_episodes.py")
export_episodes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_episodes)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    data = {"dataset": "synthetic", "root": str(folder / "voc"), "synthetic": {"images": 200, "size": 64},
            "min_pixels": 64,
            "image_size": 32, "episodes": 30, "num_workers": 0}  # fmt: skip
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"data": data}))
    return path


def test_exported_episodes_load_back_identically(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "episodes.json"
    assert export_episodes.main([str(config), "data.fold=1", "data.seeds=[4]", "--out", str(out)]) == 0
    stored = json.loads(out.read_text())
    assert stored["protocol"]["fold"] == 1 and stored["protocol"]["seed"] == 4 and len(stored["episodes"]) == 30
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left
    data = load_config(config, ["data.fold=1", "data.seeds=[4]"]).data
    sampled = episodes.build_test_dataset(data).episodes
    data.episode_file = str(out)
    assert episodes.build_test_dataset(data).episodes == sampled
    assert [e.to_json() for e in sampled] == stored["episodes"]


def test_an_episode_file_from_another_protocol_is_refused(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "episodes.json"
    export_episodes.main([str(config), "--out", str(out)])
    data = load_config(config, [f"data.episode_file={out}", "data.shots=2"]).data
    with pytest.raises(DataError, match="another protocol.*shots: file 1 vs config 2"):
        episodes.build_test_dataset(data)
    with pytest.raises(DataError, match="seed: file 0 vs config 3"):
        episodes.build_test_dataset(data, seed=3)


def test_pairs_are_the_configured_splits_eval_pairs(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "pairs.json"
    assert export_episodes.main([str(config), "data.fold=2", "--out", str(out), "--pairs"]) == 0
    pairs = json.loads(out.read_text())["pairs"]
    data = load_config(config, ["data.fold=2"]).data
    source = episodes.build_test_dataset(data).source
    _, novel = source.fold_classes(2)
    val = set(source.image_ids("val"))
    assert pairs == sorted(pairs) and len(pairs) > 10
    for image_id, class_id in pairs:
        assert image_id in val and class_id in novel
        assert source.class_pixels(image_id)[class_id] >= 64
    walked = [[e.query, e.class_id] for e in episodes.build_test_dataset(data).episodes]
    assert walked == (pairs * 30)[:30]  # the walk follows the exported pair order


@pytest.mark.parametrize("lists", ["pfenet", "bam"])
def test_train_pairs_are_the_pool_the_fold_trains_on(config: Path, tmp_path: Path, lists: str) -> None:
    out = tmp_path / "train.json"
    assert export_episodes.main([str(config), "data.fold=1", f"data.lists={lists}", "--out", str(out),
                                 "--train-pairs"]) == 0  # fmt: skip
    stored = json.loads(out.read_text())
    data = load_config(config, ["data.fold=1", f"data.lists={lists}"]).data
    source = episodes.build_test_dataset(data).source
    pool = episodes.lists.train_pairs(source, data)
    assert stored["pairs"] == sorted([image, c] for c, ids in pool.items() for image in ids)
    assert stored["protocol"] | {"split": "trn", "lists": lists, "fold": 1} == stored["protocol"]
    base, novel = source.fold_classes(1)
    assert {c for _, c in stored["pairs"]} <= set(base)
    assert {i for i, _ in stored["pairs"]} <= set(source.image_ids("trn"))
    if lists == "bam":  # BAM drops every training image holding a novel-class pixel
        assert all(not set(novel) & set(source.class_pixels(i)) for i, _ in stored["pairs"])
    with pytest.raises(SystemExit):
        export_episodes.main([str(config), "--out", str(out), "--pairs", "--train-pairs"])


def test_official_episodes_are_exported_and_unfit_samplers_refused(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "pfenet.json"
    assert export_episodes.main([str(config), "data.sampler=pfenet", "data.seeds=[321]", "--out", str(out)]) == 0
    stored = json.loads(out.read_text())
    assert stored["protocol"]["sampler"] == "pfenet" and stored["protocol"]["seed"] == 321
    data = load_config(config, ["data.sampler=pfenet", "data.seeds=[321]"]).data
    assert [Episode.from_json(e) for e in stored["episodes"]] == episodes.build_test_dataset(data).episodes
    assert export_episodes.main([str(config), "data.sampler=pfenet", "data.dataset=coco", "--out", str(out)]) == 2
    assert "PFENet's own COCO lists" in capsys.readouterr().err


def test_bad_arguments_fail_clearly(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        export_episodes.main([str(config)])  # --out is required
    out = tmp_path / "x.json"
    assert export_episodes.main([str(config), "data.fols=1", "--out", str(out)]) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert "data.fols" in err and "data.fold" in err and "Traceback" not in err
    assert export_episodes.main([str(config), "data.fold=9", "--out", str(out)]) == 2
    assert "valid folds are 0, 1, 2, 3" in capsys.readouterr().err
    assert export_episodes.main([str(config), "--out", str(tmp_path)]) == 2  # a folder
    assert "is a folder" in capsys.readouterr().err
    assert not out.exists()


def test_the_config_is_not_changed_in_place(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(config, [f"data.episode_file={tmp_path / 'old.json'}"])
    monkeypatch.setattr(export_episodes, "load_config", lambda *args: cfg)
    assert export_episodes.main([str(config), "--out", str(tmp_path / "eps.json")]) == 0
    assert cfg.data.episode_file == str(tmp_path / "old.json")


# ---------------------------------------------------------------------------------------------------------------------
# Hand-edited files: every episode is checked against the masks before any runs.


@pytest.fixture(scope="module")
def exported(config: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[DataConfig, dict]:
    """(data config of fold 0, the exported file's JSON)."""
    path = tmp_path_factory.mktemp("exported") / "episodes.json"
    assert export_episodes.main([str(config), "--out", str(path)]) == 0
    return load_config(config).data, json.loads(path.read_text())


def _edited(exported: tuple[DataConfig, dict], tmp_path: Path, edit) -> DataConfig:
    data, stored = exported
    stored = copy.deepcopy(stored)
    edit(stored["episodes"])
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(stored))
    return dataclasses.replace(data, episode_file=str(path))


def _source(data: DataConfig):
    return episodes.build_test_dataset(data).source


def test_an_episode_whose_query_lacks_its_class_is_refused(exported, tmp_path: Path) -> None:
    data, stored = exported
    source = _source(data)
    first = stored["episodes"][0]
    lacking = next(i for i in source.image_ids("val") if first["class_id"] not in source.class_pixels(i))

    def edit(records):
        records[0]["query"] = lacking

    with pytest.raises(DataError, match=rf"episode 0: query '{lacking}' holds no pixel of class {first['class_id']}"):
        episodes.build_test_dataset(_edited(exported, tmp_path, edit))


def test_a_support_below_min_pixels_or_from_the_training_split_is_refused(exported, tmp_path: Path) -> None:
    data, stored = exported
    source = _source(data)
    small = {c: i for i in source.image_ids("val") for c, n in source.class_pixels(i).items() if n < data.min_pixels}
    n, c = next((n, e["class_id"]) for n, e in enumerate(stored["episodes"]) if e["class_id"] in small)
    m, d = next((m, e["class_id"]) for m, e in enumerate(stored["episodes"]) if m != n)
    train = next(i for i in source.image_ids("trn") if source.class_pixels(i).get(d, 0) >= data.min_pixels)

    def edit(records):
        records[n]["supports"] = [small[c]]
        records[m]["query"] = train

    with pytest.raises(DataError) as err:
        episodes.build_test_dataset(_edited(exported, tmp_path, edit))
    message = str(err.value)
    assert "2 problem(s)" in message
    assert f"episode {n}: support '{small[c]}' holds {source.class_pixels(small[c])[c]} pixels of class {c}" in message
    assert f"fewer than data.min_pixels={data.min_pixels}" in message
    assert f"episode {m}: query '{train}' is not an image of split 'val'" in message


def test_a_base_class_is_reported_before_any_episode_runs(exported, tmp_path: Path) -> None:
    data, _ = exported
    source = _source(data)
    base, novel = source.fold_classes(0)
    ids = [i for i in source.image_ids("val") if source.class_pixels(i).get(base[0], 0) >= data.min_pixels]

    def edit(records):
        records[3] = {"query": ids[0], "supports": [ids[1]], "class_id": base[0]}

    with pytest.raises(DataError, match=rf"episode 3: class {base[0]} is not a novel class of fold 0 \{novel}"):
        episodes.build_test_dataset(_edited(exported, tmp_path, edit))  # no model needed: nothing has run


def test_a_file_made_on_other_data_is_refused_and_a_copy_of_the_data_accepted(tmp_path: Path) -> None:
    from episodes.synthetic import generate

    roots = [generate(tmp_path / name, images=120, size=64, seed=seed) for name, seed in (("a", 0), ("b", 1))]
    copied = shutil.copytree(roots[0], tmp_path / "a_copy")
    data = DataConfig(dataset="pascal", root=str(roots[0]), min_pixels=64, episodes=10, cache_dir=str(tmp_path / "c"))
    path = tmp_path / "episodes.json"
    assert episodes.save_test_episodes(data, 0, path) == 10
    on = [dataclasses.replace(data, root=str(root), episode_file=str(path)) for root in (copied, roots[1])]
    assert episodes.build_test_dataset(on[0]).episodes == episodes.build_test_dataset(data).episodes
    with pytest.raises(DataError, match="was made on other data .pairs_sha256."):
        episodes.build_test_dataset(on[1])

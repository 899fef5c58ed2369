"""tools/export_episodes.py: the exported file loads back through data.episode_file; other protocols are refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

import episodes
from episodes.base import DataError
from fewshot.config import load_config

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


def test_pairs_are_the_configured_splits_test_pairs(config: Path, tmp_path: Path) -> None:
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


def test_bad_arguments_fail_clearly(config: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        export_episodes.main([str(config)])  # --out is required
    with pytest.raises(Exception, match="data.shot"):
        export_episodes.main([str(config), "data.shot=2", "--out", str(tmp_path / "x.json")])

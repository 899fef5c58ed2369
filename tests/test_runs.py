"""Run directories: what a resume drops from metrics.jsonl, and which config differences it tolerates."""

from __future__ import annotations

import json

import pytest
import yaml

from fewshot.config import ConfigError, dump_yaml, load_config
from fewshot.runs import RESUMABLE_CHANGES, check_resumable, config_differences, truncate_metrics


def _lines(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_truncate_metrics_keeps_the_records_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    kept = [
        {"step": 0, "split": "val_untrained"},
        {"step": 1, "split": "train"},
        {"step": 2, "split": "train"},
        {"step": 2, "split": "val"},
    ]
    path.write_text(_lines(*kept, {"step": 3, "split": "train"}, {"step": 4, "split": "val"}) + '{"step": 5, "spl')
    assert truncate_metrics(path, 2) == 3  # two replayed records, and a line cut off by a kill
    assert path.read_text() == _lines(*kept)
    assert truncate_metrics(path, 2) == 0 and path.read_text() == _lines(*kept)
    assert truncate_metrics(tmp_path / "none.jsonl", 2) == 0


def test_truncate_metrics_refuses_a_damaged_line_it_did_not_cut(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines({"step": 1}) + "garbage\n" + _lines({"step": 2}))
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON record"):
        truncate_metrics(path, 1)


def test_config_differences_name_the_keys_and_skip_the_allowed_ones():
    cfg = load_config(None, ["optim.lr=0.5", "train.max_iters=9"])
    stored = yaml.safe_load(dump_yaml(load_config(None, [])))
    assert config_differences(stored, cfg) == ["optim.lr", "train.max_iters"]
    assert config_differences(stored, cfg, RESUMABLE_CHANGES) == ["optim.lr"]
    assert config_differences(yaml.safe_load(dump_yaml(cfg)), cfg) == []  # the YAML round trip is exact


def test_check_resumable_refuses_a_last_pt_of_another_run(tmp_path):
    cfg = load_config(None, ["train.max_iters=9", "run.dir=elsewhere"])
    check_resumable(dump_yaml(load_config(None, [])), cfg, tmp_path / "last.pt")  # a longer run, moved: the same run
    with pytest.raises(ConfigError, match=r"last.pt was trained with a different config \(differs in \['seed'\]\)"):
        check_resumable(dump_yaml(load_config(None, ["seed=1"])), cfg, tmp_path / "last.pt")

from __future__ import annotations

import pytest
import yaml

from fewshot.config import Config, ConfigError, diff_from_defaults, dump_yaml, from_dict, load_config, to_dict


def write(tmp_path, text: str):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return path


def test_defaults_yaml_then_cli_precedence(tmp_path):
    path = write(tmp_path, "data:\n  fold: 1\n  shots: 5\noptim:\n  lr: 0.01\n")
    cfg = load_config(path, ["data.fold=2", "model.backbone.layers=[1,2]"])
    assert cfg.data.fold == 2  # CLI beats YAML
    assert cfg.data.shots == 5  # YAML beats defaults
    assert cfg.optim.lr == 0.01
    assert cfg.model.backbone.layers == [1, 2]
    assert cfg.train.max_iters == Config().train.max_iters  # untouched default


def test_cli_values_are_python_literals_or_strings():
    cfg = load_config(None, ["data.root=/tmp/voc", "optim.lr=5e-4", "run.overwrite=true", "device=cpu"])
    assert cfg.data.root == "/tmp/voc"
    assert cfg.optim.lr == 5e-4
    assert cfg.run.overwrite is True
    assert cfg.device == "cpu"


def test_int_is_accepted_for_float_and_tuple_from_comma_string():
    cfg = load_config(None, ["optim.lr=1", "data.augment.scale=0.5,2"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.augment.scale == (0.5, 2.0)


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'data.shot'.*did you mean 'data.shots'"):
        load_config(None, ["data.shot=5"])
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"x.yaml.*'optim.lrr'.*did you mean 'optim.lr'"):
        load_config(path)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"data.fold: expected int, got 'two'"):
        load_config(None, ["data.fold=two"])
    with pytest.raises(ConfigError, match=r"data.shots: expected int, got True"):
        load_config(None, ["data.shots=True"])
    with pytest.raises(ConfigError, match=r"model.backbone: expected a mapping"):
        from_dict({"model": {"backbone": "vit"}})


def test_choices_and_ranges():
    with pytest.raises(ConfigError, match=r"data.fold must be >= 0"):
        load_config(None, ["data.fold=-1"])
    assert load_config(None, ["data.fold=4"]).data.fold == 4  # the dataset's source checks the upper end
    with pytest.raises(ConfigError, match=r"data.lists='osl'.*pfenet, bam, hsnet"):
        load_config(None, ["data.lists=osl"])
    with pytest.raises(ConfigError, match=r"data.shots=0 must be at least 1"):
        load_config(None, ["data.shots=0"])


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["data.fold=3", "model.head=transformer", "data.augment.scale=0.8,1.2"])
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    path = write(tmp_path, dump_yaml(cfg))
    assert load_config(path) == cfg
    assert to_dict(again)["data"]["augment"]["scale"] == [0.8, 1.2]


def test_diff_from_defaults_lists_only_changes():
    cfg = load_config(None, ["data.fold=3", "optim.lr=0.5"])
    assert diff_from_defaults(cfg) == {"data.fold": 3, "optim.lr": 0.5}


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["data.fold"])


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert any(p.name == "demo.yaml" for p in configs)
    for path in configs:
        if path.name == "published.yaml":
            continue
        load_config(path)

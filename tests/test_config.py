from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fewshot.config import Config, ConfigError, diff_from_defaults, dump_yaml, from_dict, get, load_config, to_dict


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
    with pytest.raises(ConfigError, match=r"data.fold=-1 must be >= 0"):
        load_config(None, ["data.fold=-1"])
    assert load_config(None, ["data.fold=4"]).data.fold == 4  # the dataset's source checks the upper end
    with pytest.raises(ConfigError, match=r"data.lists='osl' is not valid; choose from pfenet, bam, hsnet"):
        load_config(None, ["data.lists=osl"])
    with pytest.raises(ConfigError, match=r"data.shots=0 must be at least 1"):
        load_config(None, ["data.shots=0"])


def test_closed_choices_suggest_the_closest():
    with pytest.raises(ConfigError, match=r"data.resize='keep_aspekt' is not valid \(did you mean 'keep_aspect'\?\)"):
        load_config(None, ["data.resize=keep_aspekt"])
    with pytest.raises(ConfigError, match=r"train.amp='bf61'.*did you mean 'bf16'"):
        load_config(None, ["train.amp=bf61"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.head=protoype", r"model.head='protoype' is not valid \(did you mean 'prototype'\?\)"),
        ("model.backbone.name=tim:resnet50", r"model.backbone.name family='tim' is not valid \(did you mean 'timm'"),
        ("model.backbone.name=resnet50", r"model.backbone.name='resnet50' must be <family>:<model>"),
        ("data.dataset=pascl", r"data.dataset='pascl' is not valid \(did you mean 'pascal'"),
        ("zeroshot.method=sclp", r"zeroshot.method='sclp' is not valid \(did you mean 'sclip'"),
        ("zeroshot.backbone=timm:vit_b16", r"zeroshot.backbone='timm:vit_b16' must be open_clip:<model>"),
    ],
)
def test_registry_names_are_checked_at_load_time(override, message):
    """Open sets (heads, backbone families, datasets, zero-shot methods) are checked when the config loads, before a
    tool writes anything, against the registries that implement them."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_every_registry_entry_is_a_valid_choice():
    from fewshot.config import REGISTRIES, registry_names

    for key in REGISTRIES:
        for name in registry_names(key):
            value = f"{name}:some_model" if key == "model.backbone.name" else name
            cfg = load_config(None, [f"{key}={value}"])
            assert get(cfg, key) == value


def test_every_literal_value_round_trips():
    """Each closed choice is declared once, as a Literal annotation: every value loads, any other is refused."""
    import dataclasses
    import typing

    def literal_fields(cls, prefix=""):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from literal_fields(hint, f"{prefix}{f.name}.")
            elif typing.get_origin(hint) is typing.Literal:
                yield f"{prefix}{f.name}", typing.get_args(hint)

    fields = dict(literal_fields(Config))
    assert {"data.lists", "data.sampler", "data.coco.split", "train.amp", "eval.amp", "cache.features"} <= set(fields)
    needs = {("data.sampler", "hsnet"): ["data.lists=hsnet", "data.list_dir=splits"]}  # HSNet's episodes need its lists
    for group, preset in [(g, p) for g in ("model", "zeroshot") for p in ("sam2_tiny128", "sam2_tiny1024")]:
        needs[(f"{group}.sam.preset", preset)] = [f"{group}.sam.name=sam2.1_hiera_t"]  # a SAM 2 preset, a SAM 2 name
    for key, values in fields.items():
        for value in values:
            assert get(load_config(None, [f"{key}={value}", *needs.get((key, value), [])]), key) == value
        with pytest.raises(ConfigError, match=f"{key}='nope' is not valid"):
            load_config(None, [f"{key}=nope"])


def test_yaml_floats_without_a_dot_are_floats(tmp_path):
    """PyYAML (YAML 1.1) reads `lr: 1e-3` as the string '1e-3'; a float field takes it as the number."""
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1e-3\n  weight_decay: 5E-2\n"))
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 0.05
    with pytest.raises(ConfigError, match=r"optim.lr: expected float, got 'fast'"):
        load_config(write(tmp_path, "optim:\n  lr: fast\n"))


def test_repeated_yaml_keys_are_refused_with_both_lines(tmp_path):
    text = "data:\n  fold: 1\nmodel:\n  head: transformer\ndata:\n  shots: 5\n"
    with pytest.raises(ConfigError, match=r"x.yaml.*key 'data' appears twice.*lines 1 and 5"):
        load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"key 'shots' appears twice.*lines 2 and 3"):
        load_config(write(tmp_path, "data:\n  shots: 1\n  shots: 5\n"))


@pytest.mark.parametrize("key", ["train.log_every", "train.val_every", "train.checkpoint_every", "train.val_episodes"])
def test_step_intervals_must_be_positive(key):
    with pytest.raises(ConfigError, match=f"{key}=0 must be at least 1"):
        load_config(None, [f"{key}=0"])


def test_seeds_are_one_list():
    assert load_config(None, []).data.seeds == [0]
    assert load_config(None, ["data.seeds=[3, 1]"]).data.seeds == [3, 1]
    with pytest.raises(ConfigError, match="names no test seed"):
        load_config(None, ["data.seeds=[]"])
    with pytest.raises(ConfigError, match="repeats a seed"):
        load_config(None, ["data.seeds=[1, 1]"])
    with pytest.raises(ConfigError, match=r"unknown config key 'data.seed'.*did you mean 'data.seeds'"):
        load_config(None, ["data.seed=1"])


def test_run_dir_defaults_to_the_config_name_and_fold(tmp_path):
    path = write(tmp_path, "data:\n  fold: 2\n")
    assert load_config(path).run.dir == "runs/x_fold2"
    assert load_config(path, ["data.fold=3"]).run.dir == "runs/x_fold3"
    assert load_config(path, ["run.dir=elsewhere"]).run.dir == "elsewhere"
    assert load_config(None, []).run.dir == "runs/default_fold0"


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["data.fold=3", "model.head=transformer", "data.augment.scale=0.8,1.2"])
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    path = write(tmp_path, dump_yaml(cfg))
    assert load_config(path) == cfg
    assert to_dict(again)["data"]["augment"]["scale"] == [0.8, 1.2]


def test_diff_from_defaults_lists_only_changes():
    cfg = load_config(None, ["data.fold=3", "optim.lr=0.5"])
    assert diff_from_defaults(cfg) == {"data.fold": 3, "optim.lr": 0.5, "run.dir": "runs/default_fold3"}


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["data.fold"])


def test_shipped_configs_load_and_hold_only_differences():
    """Every experiment YAML loads and restates no default: defaults are the benchmark protocol, a YAML its diff."""
    from fewshot.config import flatten, read_yaml

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert any(p.name == "demo.yaml" for p in configs)
    defaults = flatten(to_dict(Config()))
    for path in configs:
        if path.name == "published.yaml":
            continue
        load_config(path)
        restated = {k: v for k, v in flatten(read_yaml(path)).items() if defaults.get(k) == _as_config_value(v)}
        assert not restated, f"{path.name} restates defaults: {restated}"


def _as_config_value(value):
    return list(value) if isinstance(value, tuple) else value


def test_defaults_are_the_benchmark_protocol():
    data = Config().data
    assert (data.dataset, data.lists, data.episodes, data.seeds) == ("pascal", "pfenet", 1000, [0])
    assert data.min_pixels == 2048
    assert (data.resize, data.eval_resolution, data.image_size) == ("square", "resized", 400)
    assert Config().model.backbone.pretrained != "none"

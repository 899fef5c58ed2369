"""Configs in and out: YAML files and `a.b=value` overrides onto the defaults of fewshot.config.schema, type and
choice checks with suggestions, registry and range checks (`validate`), and the YAML / flat-dict views of a config."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from .schema import Config, ConfigError


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists for tuples) of a config dataclass."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(valid))}"


def _choice_error(key: str, value: Any, choices: typing.Iterable[str]) -> ConfigError:
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{key}={value!r} is not valid{hint}; choose from {', '.join(choices)}")


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")  # PyYAML reads 1e-3 as a string (YAML 1.1)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Checks `value` against a field's type annotation, converting the lossless cases (int -> float, list -> tuple,
    a YAML string such as '1e-3' -> float)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value not in args or not isinstance(value, str):
            raise _choice_error(key, value, args)
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    if annotation in (int, float, str, bool):
        if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {annotation}")
    raise ConfigError(f"{key}: unsupported annotation {annotation!r}")


def _apply(cfg: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            raise ConfigError(f"unknown config key {full!r}{_suggest(full, valid)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of sub-keys, got {value!r}")
            _apply(current, value, f"{full}.")
        else:
            setattr(cfg, key, _coerce(value, hints[key], full))


def from_dict(data: dict[str, Any]) -> Config:
    """A Config from a (partial) nested dict; missing keys keep their defaults."""
    cfg = Config()
    _apply(cfg, data or {})
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is a Python literal when it parses as one, else a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        lowered = raw.strip().lower()
        value = {"true": True, "false": False}.get(lowered, raw)
    return key.strip().split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    for part in reversed(path):
        value = {part: value}
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key repeated in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); the second would "
                    "silently replace the first: merge them into one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a config YAML file; a missing file, invalid YAML, a repeated key or a non-mapping is a
    ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/demo.yaml")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except ConfigError as err:
        raise ConfigError(f"config file {path}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `key.sub=value` overrides.

    An empty `run.dir` becomes `runs/<file name without .yaml>_fold<fold>` (`runs/default_fold<fold>` without a file).
    """
    cfg = Config()
    if path is not None:
        data = read_yaml(path)
        try:
            _apply(cfg, data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err
    for text in overrides or []:
        keys, value = parse_override(text)
        _apply(cfg, _nest(keys, value))
    if not cfg.run.dir:
        cfg.run.dir = f"runs/{Path(path).stem if path is not None else 'default'}_fold{cfg.data.fold}"
    validate(cfg)
    return cfg


# Open sets: config key -> (module, registry dict) whose names are its valid values. They are imported only when a
# config is validated, so this module stays at the bottom of the import graph.
REGISTRIES = {
    "data.dataset": ("episodes.sources", "SOURCES"),
    "model.head": ("fewshot.heads", "MODEL_HEADS"),  # feature heads and SAM heads
    "model.backbone.name": ("fewshot.backbones", "BACKBONES"),  # the family before ':'
    "zeroshot.method": ("fewshot.zeroshot.dense_clip", "LAST_BLOCKS"),
    "model.sam.name": ("fewshot.sam.weights", "NAMES"),
    "zeroshot.sam.name": ("fewshot.sam.weights", "NAMES"),
}


def registry_names(key: str) -> list[str]:
    """The valid values of an open-set key of REGISTRIES, read from the module that implements them."""
    module, name = REGISTRIES[key]
    return sorted(getattr(importlib.import_module(module), name))


def get(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: Config) -> None:
    """Value checks the types alone cannot express: registry names, ranges. The fold is checked against its
    dataset's source, which knows how many folds it has (episodes.sources)."""
    for key in REGISTRIES:
        value = get(cfg, key)
        if key == "model.backbone.name":
            family, sep, model = value.partition(":")
            if not sep or not model:
                raise ConfigError(f"{key}={value!r} must be <family>:<model>, e.g. timm:resnet50 or open_clip:ViT-B-16")
            if family not in registry_names(key):
                raise _choice_error(f"{key} family", family, registry_names(key))
        elif value not in registry_names(key):
            raise _choice_error(key, value, registry_names(key))
    at_least_one = (
        "data.shots", "data.ways", "data.episodes", "data.image_size", "train.batch_size", "eval.batch_size",
        "train.val_every", "train.val_episodes", "train.checkpoint_every", "train.log_every",
        "model.sam.image_size", "model.sam.points_per_batch", "model.gfsam.max_points", "model.gfsam.dino_size",
        "model.persam_f.iters",
    )  # fmt: skip
    family, _, model = cfg.zeroshot.backbone.partition(":")
    if family != "open_clip" or not model:
        raise ConfigError(
            f"zeroshot.backbone={cfg.zeroshot.backbone!r} must be open_clip:<model>, e.g. open_clip:ViT-B-16 "
            "(dense zero-shot methods change CLIP's last block)"
        )
    for key in at_least_one:
        if get(cfg, key) < 1:
            raise ConfigError(f"{key}={get(cfg, key)} must be at least 1")
    if not cfg.data.seeds:
        raise ConfigError("data.seeds=[] names no test seed; give at least one, e.g. data.seeds=[0]")
    if len(set(cfg.data.seeds)) != len(cfg.data.seeds):
        raise ConfigError(f"data.seeds={cfg.data.seeds} repeats a seed; list each seed once")
    if cfg.data.augment.views < 0 or cfg.cache.max_gb < 0:
        raise ConfigError("data.augment.views and cache.max_gb must be >= 0")
    if cfg.train.max_iters < 0:
        raise ConfigError(f"train.max_iters={cfg.train.max_iters} must be >= 0")
    if cfg.data.fold < 0:
        raise ConfigError(f"data.fold={cfg.data.fold} must be >= 0")
    if cfg.data.folder.folds < 1:
        raise ConfigError(f"data.folder.folds={cfg.data.folder.folds} must be at least 1")
    target = cfg.data.target
    if target.dataset and target.dataset not in registry_names("data.dataset"):
        raise _choice_error("data.target.dataset", target.dataset, registry_names("data.dataset"))
    if target.dataset and not target.root:
        raise ConfigError(f"data.target.dataset={target.dataset!r} needs data.target.root, the folder it is in")
    from fewshot.sam.weights import family, preset_mismatch

    for group in ("model", "zeroshot"):
        sam = getattr(cfg, group).sam
        if preset_mismatch(sam.name, sam.preset, group):
            raise ConfigError(preset_mismatch(sam.name, sam.preset, group))
    if cfg.model.head in ("persam", "persam_f"):
        if family(cfg.model.sam.name) != "sam":
            raise ConfigError(
                f"model.head={cfg.model.head} is PerSAM, a SAM 1 method (its target-guided decoder modifies "
                f"segment_anything's mask decoder); model.sam.name={cfg.model.sam.name} is SAM 2, whose decoder it "
                "does not define: use a SAM 1 model.sam.name (vit_h, as published) or model.head=gfsam"
            )
    from episodes.official import sampler_problem  # the samplers know what each needs of the data (as REGISTRIES)

    problem = sampler_problem(cfg.data)
    if problem:
        raise ConfigError(problem)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def diff_from_defaults(cfg: Config) -> dict[str, Any]:
    """The flat `a.b: value` entries where `cfg` differs from the defaults."""
    defaults = flatten(to_dict(Config()))
    return {k: v for k, v in flatten(to_dict(cfg)).items() if defaults.get(k) != v}


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out

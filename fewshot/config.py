"""Every setting of the project, with its default, in one place.

Precedence is defaults < YAML file < CLI overrides (`data.fold=2 optim.lr=5e-4`). A YAML file holds only its
differences from these defaults. An unknown key or a value of the wrong type is an error that names the key and
suggests the closest valid one. The resolved config is saved in the run directory and inside every checkpoint.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class AugmentConfig:
    hflip: bool = True  # random horizontal flip of query and supports (training only)
    scale: tuple[float, float] = (0.9, 1.1)  # random rescale range before the crop; (1.0, 1.0) disables it
    rotate: float = 10.0  # maximum rotation in degrees, drawn uniformly in [-rotate, rotate]; 0 disables it
    crop: bool = True  # crop back to data.image_size after scaling (pads with void where the image is smaller)
    views: int = 0  # 0 = fresh random augmentation per episode; N > 0 = N fixed augmented views per image, one drawn
    # per use (the view is part of the image id, "2007_000032@v3"), so the feature cache can serve training too


@dataclass
class SyntheticConfig:
    images: int = 1000  # number of generated images (split 80/20 into train_aug / val)
    size: int = 128  # side of the generated square images in pixels
    seed: int = 0  # generation seed: the same seed gives byte-identical files


@dataclass
class TargetConfig:  # cross-domain few-shot (PATNet, DMTNet): train on data.dataset, evaluate on another dataset
    dataset: str = ""  # the evaluated dataset (deepglobe | isic | chest_xray | fss1000 | ...); "" = data.dataset
    root: str = ""  # its root; with a target, training uses every class of data.dataset (PATNet's fold 4)


@dataclass
class Fss1000Config:
    splits: str = ""  # HSNet's data/splits/fss (trn.txt, val.txt, test.txt class names); needed by fss1000
    classes: str = "test"  # the classes of its one fold: test (the benchmark) | val (PATNet's validation set)


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # pascal | coco | folder | synthetic | deepglobe | isic | chest_xray | fss1000
    root: str = "data/synthetic"  # dataset root; for synthetic it is generated there when missing
    fold: int = 0  # the evaluated fold (of data.target's dataset when set): 0 .. its source's num_folds - 1
    split: str = "val"  # split the test episodes come from (val | trn)
    shots: int = 1  # support images per episode
    ways: int = 1  # classes per episode (N-way; 1 is the standard benchmark)
    episodes: int = 1000  # fixed test episodes per fold and seed (HSNet: 1000, PFENet: 5000 / 20000)
    seed: int = 0  # test-episode seed; the episode list is a pure function of the protocol and this seed
    seeds: list[int] = field(default_factory=list)  # several test seeds in one run (mean and spread); [] = [seed]
    lists: str = "pfenet"  # list convention: pfenet | bam | hsnet
    min_pixels: int = 2048  # pfenet / bam rule: a pair counts when the class covers >= 2 x 32 x 32 pixels
    novel_in_train: str = "background"  # novel objects in training images: background (HSNet, PFENet) | drop (BAM)
    coco_split: str = "interleaved"  # COCO-20i fold convention: interleaved (HSNet, PFENet) | consecutive (PANet)
    coco_crowd: str = "ignore"  # crowd regions of the episode class: ignore (void, 255) | foreground | background
    coco_train_json: str = ""  # instances json of split trn; "" = <root>/annotations/instances_train2014.json
    coco_val_json: str = ""  # instances json of split val; "" = <root>/annotations/instances_val2014.json
    coco_train_images: str = ""  # image folder of split trn; "" = <root>/train2014
    coco_val_images: str = ""  # image folder of split val; "" = <root>/val2014
    folder_binary: bool = False  # folder dataset: masks are one-class figure/ground images (grey >= 128 = the class)
    train_list: str = ""  # image-id list for training; "" = the dataset's standard list
    val_list: str = ""  # image-id list for testing; "" = the dataset's standard list
    list_dir: str = ""  # hsnet convention: folder with {trn,val}/fold{f}.txt
    episode_file: str = ""  # load test episodes from an export_episodes.py JSON file instead of sampling
    image_size: int = 224  # square side (resize: square) or long side (resize: keep_aspect) fed to the model
    resize: str = "square"  # square (HSNet family) | keep_aspect (PFENet family: resize long side, pad with void)
    eval_resolution: str = "resized"  # resized (HSNet family) | original (PFENet family: score at label resolution)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    cache_dir: str = ""  # where mask indexes are cached; "" = <root>/.fewshot_cache
    num_workers: int = 2  # DataLoader workers (test / validation episodes: on CUDA only, see evaluation.episode_loader)
    support_draw: str = "distinct"  # distinct supports | independent (HSNet, PATNet: K draws, repeats possible)
    folder_folds: int = 4  # folder dataset without class splits: its classes cut into this many folds
    target: TargetConfig = field(default_factory=TargetConfig)
    fss1000: Fss1000Config = field(default_factory=Fss1000Config)


@dataclass
class BackboneConfig:
    name: str = "timm:vit_tiny_patch16_224"  # timm:<model> or open_clip:<model>
    pretrained: str = "none"  # a weights tag, hf-hub:org/repo, a local .pt/.bin/.safetensors file, or none (random)
    layers: list[int] = field(default_factory=lambda: [-4, -3, -2, -1])  # blocks / stages whose features are used
    frozen: bool = True  # no gradients and eval-mode norms in the backbone


@dataclass
class PrototypeConfig:
    temperature: float = 20.0  # cosine-similarity scale (PANet uses 20)
    trainable: bool = True  # False: training-free matching; True: a light learnable projection and fusion
    proj_dim: int = 128  # channels of the learnable projection per layer
    align_loss: float = 0.0  # weight of PANet's prototype alignment loss (0 disables it)


@dataclass
class TransformerConfig:
    dim: int = 128  # token width inside the decoder
    depth: int = 2  # cross-attention layers
    heads: int = 4  # attention heads
    attention: str = "masked"  # masked (DCAMA-style mask-weighted cross-attention) | prototype (FPTrans / APM tokens)
    dropout: float = 0.0


@dataclass
class TextHeadConfig:
    dim: int = 128  # decoder width of the text-conditioned head (LSeg / CLIPSeg style)
    templates: str = "imagenet"  # imagenet (80 templates) | single ("a photo of a {}.")
    use_supports: bool = False  # also condition on support prototypes (text + image)


@dataclass
class ModelConfig:
    head: str = "prototype"  # prototype | transformer | text
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    prototype: PrototypeConfig = field(default_factory=PrototypeConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    text: TextHeadConfig = field(default_factory=TextHeadConfig)
    shot_fusion: str = "model"  # model (all supports in one pass) | vote (HSNet: K 1-shot passes, vote >= half max)


@dataclass
class LossConfig:
    ce: float = 1.0  # weight of cross-entropy (void ignored)
    dice: float = 0.0  # weight of the Dice loss on the foreground probability
    dice_form: str = "squared"  # squared (V-Net: p^2 + g^2 denominator) | plain (p + g denominator)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # cosine | poly | constant
    poly_power: float = 0.9
    warmup_iters: int = 0
    grad_clip: float = 0.0  # max gradient norm; 0 disables clipping


@dataclass
class TrainConfig:
    max_iters: int = 1000  # optimisation steps
    batch_size: int = 8  # episodes per step (per process)
    val_every: int = 250  # validate on fixed episodes every N steps (and at the end)
    val_episodes: int = 200  # episodes of the validation run
    val_seed: int = 1000  # validation-episode seed, kept apart from the test seeds
    checkpoint_every: int = 250  # write last.pt every N steps (and at exit)
    log_every: int = 10  # append the training loss to metrics.jsonl every N steps
    amp: str = "none"  # none | bf16 | fp16 (fp16 on CUDA only)


@dataclass
class EvalConfig:
    batch_size: int = 8  # episodes per forward pass at test time
    overlays: list[int] = field(default_factory=list)  # episode indices whose query/support/prediction are saved


@dataclass
class ZeroShotConfig:
    model: str = "ViT-B-16"  # open_clip model name (use ViT-B-16-quickgelu or force_quick_gelu for OpenAI weights)
    pretrained: str = "none"  # open_clip tag (openai, laion2b_s34b_b88k), hf-hub:..., a local file, or none
    method: str = "sclip"  # vanilla | maskclip | sclip | clearclip | naclip
    templates: str = "imagenet"  # imagenet | single
    background: str = "prompt"  # prompt ('background' prompt set) | threshold | both
    background_words: list[str] = field(default_factory=list)  # words of the background prompt; [] = 'background'
    # plus SCLIP's stuff words (sky, wall, ...; fewshot.text.BACKGROUND_WORDS), minus words naming a prompted class
    threshold: float = 0.5  # foreground probability threshold when background uses threshold
    short_side: int = 336  # short-side resize before inference
    window: int = 224  # sliding-window crop (0 = whole image)
    stride: int = 112  # sliding-window stride
    logit_scale: float = 40.0  # softmax temperature over classes


@dataclass
class CacheConfig:
    features: str = "auto"  # auto (memory where exact: frozen backbone, deterministic transform) | memory | disk | off
    dir: str = ""  # disk cache folder; "" = features/ in data.cache_dir, else beside the mask index cache
    max_gb: float = 8.0  # size of each cache (training / testing) past which new features are not stored


@dataclass
class RunConfig:
    dir: str = "runs/demo"  # run directory: config.yaml, metrics.jsonl, checkpoints, results
    overwrite: bool = False  # allow a run directory that holds a different config


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0  # training seed (weights init, training episodes, augmentation)
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N


# --------------------------------------------------------------------------------------------------------------------
# Conversion between dataclasses, dicts, YAML and CLI overrides.


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


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Checks `value` against a field's type annotation, converting the lossless cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `key.sub=value` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/demo.yaml")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
        try:
            _apply(cfg, data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err
    for text in overrides or []:
        keys, value = parse_override(text)
        if isinstance(value, str) and _is_tuple_field(cfg, keys):
            value = [float(v) for v in value.split(",")]
        _apply(cfg, _nest(keys, value))
    validate(cfg)
    return cfg


def _is_tuple_field(cfg: Any, keys: list[str]) -> bool:
    for key in keys[:-1]:
        cfg = getattr(cfg, key, None)
        if cfg is None:
            return False
    hint = typing.get_type_hints(type(cfg)).get(keys[-1]) if dataclasses.is_dataclass(cfg) else None
    return typing.get_origin(hint) is tuple


_CHOICES = {
    "data.dataset": ("pascal", "coco", "folder", "synthetic", "deepglobe", "isic", "chest_xray", "fss1000"),
    "data.target.dataset": ("", "pascal", "coco", "folder", "synthetic", "deepglobe", "isic", "chest_xray", "fss1000"),
    "data.fss1000.classes": ("test", "val"),
    "data.support_draw": ("distinct", "independent"),
    "data.split": ("val", "trn"),
    "data.lists": ("pfenet", "bam", "hsnet"),
    "data.novel_in_train": ("background", "drop"),
    "data.coco_split": ("interleaved", "consecutive"),
    "data.coco_crowd": ("ignore", "foreground", "background"),
    "data.resize": ("square", "keep_aspect"),
    "data.eval_resolution": ("resized", "original"),
    "model.shot_fusion": ("model", "vote"),
    "model.transformer.attention": ("masked", "prototype"),
    "model.text.templates": ("imagenet", "single"),
    "loss.dice_form": ("squared", "plain"),
    "optim.name": ("adamw", "sgd"),
    "optim.schedule": ("cosine", "poly", "constant"),
    "train.amp": ("none", "bf16", "fp16"),
    "zeroshot.method": ("vanilla", "maskclip", "sclip", "clearclip", "naclip"),
    "zeroshot.templates": ("imagenet", "single"),
    "zeroshot.background": ("prompt", "threshold", "both"),
    "cache.features": ("auto", "memory", "disk", "off"),
}


def get(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: Config) -> None:
    """Value checks the types alone cannot express: choices and ranges."""
    for key, choices in _CHOICES.items():
        value = get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose from {', '.join(choices)}")
    positive = ("data.shots", "data.ways", "data.episodes", "data.image_size", "train.batch_size", "eval.batch_size")
    for key in positive:
        if get(cfg, key) < 1:
            raise ConfigError(f"{key}={get(cfg, key)} must be at least 1")
    if cfg.data.augment.views < 0 or cfg.cache.max_gb < 0:
        raise ConfigError("data.augment.views and cache.max_gb must be >= 0")
    if cfg.train.max_iters < 0:
        raise ConfigError(f"train.max_iters={cfg.train.max_iters} must be >= 0")
    if cfg.data.fold < 0 or cfg.data.folder_folds < 1:
        raise ConfigError("data.fold must be >= 0 (its source checks the upper end) and data.folder_folds >= 1")
    if cfg.data.target.dataset and not cfg.data.target.root:
        raise ConfigError(f"data.target.dataset={cfg.data.target.dataset!r} needs data.target.root, its folder")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def diff_from_defaults(cfg: Config) -> dict[str, Any]:
    """The flat `a.b: value` entries where `cfg` differs from the defaults."""
    return {k: v for k, v in flatten(to_dict(cfg)).items() if flatten(to_dict(Config())).get(k) != v}


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out

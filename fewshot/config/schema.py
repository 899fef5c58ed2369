"""Every setting of the project, with its default, in one place: the config dataclasses and the closed sets of
choices their fields are annotated with (fewshot.config.loading reads, checks and writes them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# Closed sets of choices, declared once: the fields below are annotated with them, `_coerce` checks them with a
# suggestion, and the modules that act on a choice read its values with `typing.get_args`. Open sets (datasets,
# heads, backbone families, zero-shot methods) are the registries of the modules that implement them (REGISTRIES).
Split = Literal["val", "trn"]
ListConvention = Literal["pfenet", "bam", "hsnet"]
Sampler = Literal["native", "hsnet", "pfenet"]
NovelInTrain = Literal["background", "drop"]
CocoSplit = Literal["interleaved", "consecutive"]
CocoCrowd = Literal["ignore", "foreground", "background"]
Resize = Literal["square", "keep_aspect"]
EvalResolution = Literal["resized", "original"]
ShotFusion = Literal["model", "vote"]
Attention = Literal["masked", "prototype"]
Templates = Literal["imagenet", "single"]
DiceForm = Literal["squared", "plain"]
OptimName = Literal["adamw", "sgd"]
Schedule = Literal["cosine", "poly", "constant"]
Amp = Literal["none", "bf16", "fp16"]
Background = Literal["prompt", "threshold", "both", "none"]
CacheMode = Literal["auto", "memory", "disk", "off"]
SamDtype = Literal["fp32", "bf16"]
SamPreset = Literal["", "tiny256", "vith_ratio256", "tiny1024", "sam2_tiny128", "sam2_tiny1024"]
DinoResize = Literal["bilinear", "antialias"]
Refine = Literal["none", "sam"]
RefineSelect = Literal["iou_pred", "agreement"]
SupportDraw = Literal["distinct", "independent"]
Fss1000Classes = Literal["test", "val"]

# The defaults below are the benchmark protocol (PASCAL-5i, PFENet lists, 1,000 test episodes, seed 0, HSNet's
# 400 px square input scored on the resized mask, an ImageNet ResNet-50, bf16, validation every 1,000 steps); an
# experiment YAML holds only its differences (configs/demo.yaml: the synthetic CPU demo).


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
class CocoConfig:
    split: CocoSplit = "interleaved"  # COCO-20i fold convention: interleaved (HSNet, PFENet) | consecutive (PANet)
    crowd: CocoCrowd = "ignore"  # crowd regions of the episode class: ignore (void, 255) | foreground | background
    train_json: str = ""  # instances json of split trn; "" = <root>/annotations/instances_train2014.json
    val_json: str = ""  # instances json of split val; "" = <root>/annotations/instances_val2014.json
    train_images: str = ""  # image folder of split trn; "" = <root>/train2014
    val_images: str = ""  # image folder of split val; "" = <root>/val2014


@dataclass
class FolderConfig:
    binary: bool = False  # masks are one-class figure/ground images (grey >= 128 = the class)
    folds: int = 4  # without class split files: its classes cut into this many contiguous folds (PASCAL-5i: 4)


@dataclass
class TargetConfig:  # cross-domain few-shot (PATNet, DMTNet): train on data.dataset, evaluate on another dataset
    dataset: str = ""  # the evaluated dataset, a name of episodes.sources.SOURCES (deepglobe, isic, ...); "" = none
    root: str = ""  # its root; with a target, training uses every class of data.dataset (PATNet's fold 4)


@dataclass
class Fss1000Config:
    splits: str = ""  # HSNet's data/splits/fss (trn.txt, val.txt, test.txt class names); needed by fss1000
    classes: Fss1000Classes = "test"  # its one fold's classes: test (the benchmark) | val (PATNet's validation set)


@dataclass
class DataConfig:
    dataset: str = "pascal"  # a name of episodes.sources.SOURCES: pascal | coco | folder | synthetic | ...
    root: str = "data/VOCdevkit/VOC2012"  # dataset root; for synthetic it is generated there when missing
    fold: int = 0  # the evaluated fold (of data.target's dataset when set); its source says how many there are
    split: Split = "val"  # split the test episodes come from
    shots: int = 1  # support images per episode
    ways: int = 1  # classes per episode (N-way; 1 is the standard benchmark)
    episodes: int = 1000  # fixed test episodes per fold and seed (HSNet: 1000; PFENet: 5001 on PASCAL-5i)
    seeds: list[int] = field(default_factory=lambda: [0])  # test-episode seeds (several: mean and spread); the
    # episode list of a seed is a pure function of the protocol and that seed
    lists: ListConvention = "pfenet"  # list convention (PROTOCOL.md)
    sampler: Sampler = "native"  # test episodes: native (seeded, per-index) | hsnet | pfenet (the official episodes of
    # HSNet / PFENet, draw for draw; episodes.official says what each needs)
    min_pixels: int = 2048  # pfenet / bam rule: a pair counts when the class covers >= 2 x 32 x 32 pixels
    novel_in_train: NovelInTrain = "background"  # novel objects in training images: background (HSNet, PFENet) |
    # drop the image (BAM)
    train_list: str = ""  # image-id list for training; "" = the dataset's standard list
    val_list: str = ""  # image-id list for testing; "" = the dataset's standard list
    list_dir: str = ""  # hsnet convention: folder with {trn,val}/fold{f}.txt
    episode_file: str = ""  # load test episodes from an export_episodes.py JSON file instead of sampling
    image_size: int = 400  # square side (resize: square) or long side (resize: keep_aspect) fed to the model
    resize: Resize = "square"  # square (HSNet family) | keep_aspect (PFENet family: resize long side, pad with void)
    eval_resolution: EvalResolution = "resized"  # resized (HSNet family) | original (PFENet: at label resolution)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    coco: CocoConfig = field(default_factory=CocoConfig)  # data.dataset=coco only
    folder: FolderConfig = field(default_factory=FolderConfig)  # data.dataset=folder only
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # data.dataset=synthetic only
    cache_dir: str = ""  # where mask indexes are cached; "" = <root>/.fewshot_cache
    num_workers: int = 4  # DataLoader workers (test / validation episodes: on CUDA only, see evaluation.episode_loader)
    support_draw: SupportDraw = "distinct"  # supports: distinct | independent (HSNet, PATNet: K draws, may repeat)
    target: TargetConfig = field(default_factory=TargetConfig)  # cross-domain runs only
    fss1000: Fss1000Config = field(default_factory=Fss1000Config)  # data.dataset or data.target.dataset=fss1000


@dataclass
class BackboneConfig:
    name: str = "timm:resnet50"  # <family>:<model>, family a name of fewshot.backbones.BACKBONES (timm, open_clip)
    pretrained: str = "a1_in1k"  # a weights tag, hf-hub:org/repo, a local .pt/.bin/.safetensors file, or none (random)
    layers: list[int] = field(default_factory=lambda: [-3, -2, -1])  # blocks / stages whose features are used
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
    attention: Attention = "masked"  # masked (DCAMA-style mask-weighted cross-attention) | prototype (FPTrans / APM)
    dropout: float = 0.0


@dataclass
class TextHeadConfig:
    dim: int = 128  # decoder width of the text-conditioned head (LSeg / CLIPSeg style)
    templates: Templates = "imagenet"  # imagenet (80 templates) | single ("a photo of a {}.")
    use_supports: bool = False  # also condition on support prototypes (text + image)


@dataclass
class SamConfig:
    name: str = "vit_h"  # SAM vit_b | vit_l | vit_h, SAM 2.1 sam2.1_hiera_{t,s,b+,l} (official sizes), or a
    # transformers id: facebook/sam-vit-{base,large,huge}, facebook/sam2.1-hiera-{tiny,small,base-plus,large}
    pretrained: str = "sam_vit_h_4b8939.pth"  # official checkpoint (.pth; SAM 2: sam2.1_hiera_large.pt), transformers
    # folder, hf-hub:org/repo, or none (random)
    preset: SamPreset = ""  # with pretrained=none, a small random architecture of the name's family: tiny256 |
    # vith_ratio256 | tiny1024 (SAM), sam2_tiny128 | sam2_tiny1024 (SAM 2) (fewshot.sam.weights.PRESETS)
    image_size: int = 1024  # SAM's square input side; must be the model's (256 for tiny256)
    points_per_batch: int = 64  # most prompts per mask-decoder call
    dtype: SamDtype = "fp32"  # fp32 (the published numbers) | bf16


@dataclass
class GfsamConfig:
    max_points: int = 128  # most point prompts per query (GF-SAM: 128)
    token_norm: bool = True  # the official F.normalize(feats, dim=1) of [shots, tokens, C]: each channel over the
    # patch tokens (GFSAM.py:354-355), not each token over channels
    dino_size: int = 518  # side of the square the episode image is resized to for the feature backbone
    dino_resize: DinoResize = "bilinear"  # that resize: bilinear (torchvision's Resize on tensors before 0.17) |
    # antialias (its default since 0.17); GF-SAM's code leaves it to the installed torchvision


@dataclass
class PersamFConfig:
    iters: int = 1000  # AdamW steps fitting the 2 mask weights on the reference (persam_f.py)
    lr: float = 1e-3
    eps: float = 1e-4


@dataclass
class RefineSamConfig:
    accept_iou: float = 0.5  # SAM's mask replaces the head's only when their IoU is at least this
    select: RefineSelect = "iou_pred"  # which of SAM's 3 masks: its predicted IoU | its IoU with the head's mask
    cascade: bool = True  # one more step with the chosen mask's box and low-res logits (as PerSAM's cascade)


@dataclass
class ModelConfig:
    head: str = "prototype"  # a name of fewshot.heads.MODEL_HEADS: prototype | transformer | text | gfsam |
    # persam | persam_f
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    prototype: PrototypeConfig = field(default_factory=PrototypeConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    text: TextHeadConfig = field(default_factory=TextHeadConfig)
    sam: SamConfig = field(default_factory=SamConfig)  # SAM heads (gfsam, persam, persam_f) and model.refine=sam
    gfsam: GfsamConfig = field(default_factory=GfsamConfig)
    persam_f: PersamFConfig = field(default_factory=PersamFConfig)
    refine: Refine = "none"  # none | sam: SAM refines a feature head's mask at test time (fewshot.sam.refine)
    refine_sam: RefineSamConfig = field(default_factory=RefineSamConfig)
    shot_fusion: ShotFusion = "model"  # model (all supports in one pass) | vote (HSNet: K 1-shot passes, vote >= half
    # the max)


@dataclass
class LossConfig:
    ce: float = 1.0  # weight of cross-entropy (void ignored)
    dice: float = 0.0  # weight of the Dice loss on the foreground probability
    dice_form: DiceForm = "squared"  # squared (V-Net: p^2 + g^2 denominator) | plain (p + g denominator)


@dataclass
class OptimConfig:
    name: OptimName = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    schedule: Schedule = "cosine"
    poly_power: float = 0.9
    warmup_iters: int = 500
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping


@dataclass
class TrainConfig:
    max_iters: int = 20000  # optimisation steps
    batch_size: int = 8  # episodes per step (per process)
    val_every: int = 1000  # validate on fixed episodes every N steps (and at the end)
    val_episodes: int = 500  # episodes of the validation run
    val_seed: int = 1000  # validation-episode seed, kept apart from the test seeds
    checkpoint_every: int = 1000  # write last.pt every N steps (and at exit)
    log_every: int = 10  # append the training loss to metrics.jsonl every N steps
    amp: Amp = "bf16"  # autocast of training (fp16 on CUDA only; bf16 is about 5x slower than none on a CPU)


@dataclass
class EvalConfig:
    batch_size: int = 8  # episodes per forward pass at test time
    amp: Amp = "bf16"  # autocast of testing and validation (it keys cached features: features differ with it)
    overlays: list[int] = field(default_factory=list)  # episode indices whose query/support/prediction are saved


@dataclass
class ZeroShotConfig:
    backbone: str = "open_clip:ViT-B-16"  # open_clip:<model>, the spelling of model.backbone.name
    pretrained: str = "openai"  # open_clip tag (openai, laion2b_s34b_b88k), hf-hub:..., a local file, or none
    method: str = "sclip"  # a name of fewshot.zeroshot.dense_clip.LAST_BLOCKS: vanilla | maskclip | sclip |
    # clearclip | naclip
    templates: Templates = "imagenet"
    background: Background = "prompt"  # prompt ('background' prompt set) | threshold | both | none
    background_words: list[str] = field(default_factory=list)  # words of the background prompt; [] = 'background'
    # plus SCLIP's stuff words (sky, wall, ...; fewshot.text.BACKGROUND_WORDS), minus words naming a prompted class
    threshold: float = 0.5  # foreground probability threshold when background uses threshold
    short_side: int = 336  # short-side resize before inference
    window: int = 224  # sliding-window crop (0 = whole image)
    stride: int = 112  # sliding-window stride
    logit_scale: float = 40.0  # softmax temperature over classes
    refine: Refine = "none"  # none | sam: SAM refines each class's mask (tools/zero_shot.py --refine sam)
    sam: SamConfig = field(default_factory=SamConfig)  # the SAM of zeroshot.refine=sam
    refine_sam: RefineSamConfig = field(default_factory=RefineSamConfig)


@dataclass
class CacheConfig:
    features: CacheMode = "auto"  # auto (memory where exact: frozen backbone, deterministic transform) | memory |
    # disk | off
    dir: str = ""  # disk cache folder; "" = features/ in data.cache_dir, else beside the mask index cache
    max_gb: float = 8.0  # size of each cache (training / testing) past which new features are not stored


@dataclass
class RunConfig:
    dir: str = ""  # run directory (config.yaml, metrics.jsonl, checkpoints); "" = runs/<config file name>_fold<fold>
    overwrite: bool = False  # allow a run directory that holds a different config or an earlier run's results


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

"""Inference settings as the official code runs each method on each benchmark, one named preset per pair.

`PRESETS["sclip/voc21"]` is SCLIP's VOC21 run; `preset_for(method, benchmark)` looks one up. `codebase_preset(cfg,
benchmark)` is the codebase's own behaviour (the `zeroshot.*` keys) under the name "codebase/<benchmark>". Every
results.json records the preset's name and all of its fields. Sources (DENSE_CLIP_OFFICIAL.md, sections 2 and 5):

    sclip      SCLIP clip_segmentor.py + configs/cfg_*.py: short side 336 (COCO-Stuff 448, Cityscapes 560), 224/112
               windows, logit scale 40; VOC21: scale 65, prob_thd 0.1, area_thd 0.1, 26 stuff words as background;
               PC60: scale 50, prob_thd 0.1, 'background'; COCO-Object: scale 50, prob_thd 0.1, stuff words.
    naclip     NACLIP naclip.py + configs: as SCLIP's sizes (COCO-Stuff 336), scale 40, PAMR 10 steps with dilations
               (8, 16) on by default; VOC21 and VOC20 on the whole image (slide_crop=0 at NACLIP 0cac3a6, the commit
               DENSE_CLIP_OFFICIAL.md read; the cfg_voc21.py of commit 8865082 slides 224/112: --set window=224);
               prob_thd 0.1 on VOC21, PC60, COCO-Object.
    clearclip  ClearCLIP clearclip_segmentor.py + configs: short side 448, 448/224 windows (Cityscapes: crop 224,
               the stride stays 224), scale 50, crops padded centred to a patch multiple; 'background' with prob_thd
               0.5 (VOC21), 0.15 (PC60), 0.4 (COCO-Object); VOC21 (its cls_voc21.txt) and COCO-Object use the
               dataset's class names (COCO-Object's file is not in the stored copy of the repository: rebuilt from
               DENSE_CLIP_OFFICIAL.md, 'background' plus the 80 names).
    proxyclip  ProxyCLIP proxyclip_segmentor.py + configs: DINO ViT-B/8 attention (fewshot/zeroshot/proxy.py), short
               side 336 (Cityscapes and ADE20K 448), 336/112 windows (Cityscapes 224/112) padded centred to a multiple
               of 56, scale 40; prob_thd 0.2 (VOC21), 0.15 (PC60), 0.25 (COCO-Object); VOC21 and COCO-Object with
               its own name files (stuff words as background, the dataset's class names).
    maskclip   MaskCLIP's last block under SCLIP's protocol (the "MaskCLIP" row of SCLIP's table).
    maskclip_release  MaskCLIP's own protocol on the benchmarks it reports (VOC20, PC59, COCO-Stuff): see
               `_maskclip_release` (its logits are resized to the input and then to the original; here once).

All official runs resize as mmcv does (bilinear on the uint8 image), resample the position embedding with DINO's
(n + 0.1) / 14 bicubic, and run CLIP in fp16 on a GPU (fp32 on a CPU, as `clip.load` does). Here fp16 covers both
towers; the cosine of image and text features and every step after it run in fp32 (the official code stays in fp16
through the cosine, a noise-level difference).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
from dataclasses import dataclass

from ...config import ZeroShotConfig
from .datasets import TABLE_ORDER, Benchmark, get_benchmark

METHODS = ("sclip", "naclip", "clearclip", "maskclip", "proxyclip")


@dataclass(frozen=True)
class Preset:
    """Every inference setting of one (method, benchmark) run; see ZeroShotSegmenter for their meaning."""

    name: str  # "<method>/<benchmark>" or "codebase/<benchmark>"
    method: str  # a key of fewshot.zeroshot.dense_clip.LAST_BLOCKS
    names_file: str  # class-name file under benchmarks/names (line 0 = the background words with background)
    background: str = "official"  # with a background class: official (the names file's line 0 as prompts, plus
    # prob_thd when threshold > 0) | prompt | threshold | both (the codebase's modes: ZeroShotSegmenter)
    threshold: float = 0.0  # prob_thd: background where no class reaches it (0 = none)
    logit_scale: float = 40.0
    short_side: int = 336
    long_side: int = 2048
    window: int = 224  # 0 = whole image
    stride: int = 112
    area_threshold: float = 0.0  # SCLIP's area_thd (0 = off)
    pamr_steps: int = 0
    pamr_dilations: tuple[int, ...] = (8, 16)
    pos_embed: str = "dino"  # dino | size | open_clip
    remainder: str = "floor"  # floor | centre | corner
    resize: str = "mmcv"  # mmcv | torch
    precision: str = "fp16"  # fp16 (on a GPU; fp32 on a CPU) | fp32
    templates: str = "imagenet"
    background_words: tuple[str, ...] = ()  # background prompts outside `official` (() = the codebase's default:
    # fewshot.text.BACKGROUND_WORDS minus the class words)
    shared_background_words: bool = True  # the official files may give a word to background and a class
    vision: str = "clip"  # clip | mmseg (MaskCLIP's release ViT: exact GELU, LayerNorm eps 1e-6)
    normalisation: str = "clip"  # clip | imagenet (the image statistics)
    vfm: str = ""  # ProxyCLIP: the timm VFM whose attention replaces CLIP's last block ('' = a DenseCLIP method)

    def with_overrides(self, overrides: list[str]) -> Preset:
        """A copy with `key=value` overrides (values parsed as Python literals, else strings); an unknown key is an
        error with the closest name."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes = {}
        for item in overrides:
            key, sep, text = item.partition("=")
            if not sep or key not in fields or key == "name":
                close = difflib.get_close_matches(key, list(fields), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise KeyError(f"preset override {item!r}: not key=value of a preset field{hint} ({sorted(fields)})")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            if isinstance(value, list):
                value = tuple(value)
            changes[key] = value
        return dataclasses.replace(self, **changes) if changes else self


def _official(method: str, benchmark: Benchmark) -> Preset:
    name, b = f"{method}/{benchmark.name}", benchmark.name
    background_thd = {"voc21": 0.1, "context60": 0.1, "coco_object": 0.1}
    if method in ("sclip", "maskclip"):
        short = {"coco_stuff": 448, "cityscapes": 560}.get(b, 336)
        scale = {"voc21": 65.0, "context60": 50.0, "coco_object": 50.0}.get(b, 40.0)
        area = 0.1 if b == "voc21" and method == "sclip" else 0.0
        return Preset(
            name, method, benchmark.names_file, threshold=background_thd.get(b, 0.0), logit_scale=scale,
            short_side=short, area_threshold=area,
        )  # fmt: skip
    if method == "naclip":
        return Preset(
            name, method, benchmark.names_file, threshold=background_thd.get(b, 0.0),
            short_side=560 if b == "cityscapes" else 336, window=0 if b in ("voc21", "voc20") else 224, pamr_steps=10,
        )  # fmt: skip
    if method == "clearclip":
        raw_names = {"voc21": "voc21_clearclip.txt", "coco_object": "coco_object_clearclip.txt"}
        names = raw_names.get(b, benchmark.names_file)
        city = b == "cityscapes"
        return Preset(
            name, method, names, threshold={"voc21": 0.5, "context60": 0.15, "coco_object": 0.4}.get(b, 0.0),
            logit_scale=50.0, short_side=448, window=224 if city else 448, stride=224, remainder="centre",
        )  # fmt: skip
    if method == "proxyclip":
        city = b == "cityscapes"
        raw_names = {"voc21": "voc21_proxyclip.txt", "coco_object": "coco_object_proxyclip.txt"}
        return Preset(
            name, "vanilla", raw_names.get(b, benchmark.names_file),
            threshold={"voc21": 0.2, "context60": 0.15, "coco_object": 0.25}.get(b, 0.0),
            short_side=448 if b in ("cityscapes", "ade20k") else 336, window=224 if city else 336, stride=112,
            remainder="centre", vfm="vit_base_patch8_224.dino",
        )  # fmt: skip
    raise KeyError(f"no official preset for method {method!r}; choose from {list(METHODS)}")


def _maskclip_release(benchmark: str) -> Preset:
    """MaskCLIP's own release (mmseg 0.x configs): whole image at short side 512 (PC59: (520, 520), i.e. long
    side 520), softmax of raw cosines (scale 1), 85 templates, ImageNet statistics, exact GELU and LayerNorm eps
    1e-6 in every block, size-based position resampling and bottom-right padding, no background class."""
    context = benchmark == "context59"
    return Preset(
        f"maskclip_release/{benchmark}", "maskclip", get_benchmark(benchmark).names_file, logit_scale=1.0,
        short_side=520 if context else 512, long_side=520 if context else 2048, window=0, pos_embed="size",
        remainder="corner", precision="fp32", templates="maskclip", vision="mmseg", normalisation="imagenet",
    )  # fmt: skip


PRESETS: dict[str, Preset] = {
    **{f"{method}/{b}": _official(method, get_benchmark(b)) for method in METHODS for b in TABLE_ORDER},
    **{f"maskclip_release/{b}": _maskclip_release(b) for b in ("voc20", "context59", "coco_stuff")},
}


def preset_for(method: str, benchmark: str) -> Preset:
    """The official preset of a method on a benchmark (`PRESETS[f"{method}/{benchmark}"]`)."""
    key = f"{method}/{get_benchmark(benchmark).name}"
    if key not in PRESETS:
        raise KeyError(f"no official preset {key!r}: methods with presets are {[*METHODS, 'maskclip_release']}")
    return PRESETS[key]


def codebase_preset(cfg: ZeroShotConfig, benchmark: str) -> Preset:
    """The codebase's own zero-shot behaviour on a benchmark, from `zeroshot.*`: its threshold only where
    zeroshot.background uses one, its sizes and scale; torch resize, fp32, the floor rule and DINO's resampling.
    With a background class, background is zeroshot.background over zeroshot.background_words (default: 'background'
    plus the stuff words; the names file's line 0 is not used)."""
    bench = get_benchmark(benchmark)
    threshold = cfg.threshold if bench.background and cfg.background in ("threshold", "both") else 0.0
    return Preset(
        f"codebase/{bench.name}", cfg.method, bench.names_file, background=cfg.background, threshold=threshold,
        logit_scale=cfg.logit_scale, short_side=cfg.short_side, window=cfg.window, stride=cfg.stride, resize="torch",
        precision="fp32", templates=cfg.templates, background_words=tuple(cfg.background_words),
        shared_background_words=False,
    )  # fmt: skip

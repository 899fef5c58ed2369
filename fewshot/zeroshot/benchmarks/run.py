"""A zero-shot benchmark run: the segmenter of a preset, the whole-dataset loop and the results record.

With a background class (VOC21, PC60, COCO-Object) the segmenter's labels are the benchmark's (0 = background);
without one, the segmenter has no background channel and its label i (1-based) is class i - 1. Under torchrun each
process takes every world_size-th image and the counts are summed before the IoU is computed.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ... import distributed
from ...provenance import zero_shot_benchmark_protocol
from ..dense_clip import DenseCLIP, open_clip_model_name
from ..proxy import IMAGENET_MEAN, IMAGENET_STD, ProxyCLIP
from ..segmenter import ZeroShotSegmenter
from .datasets import Benchmark, BenchmarkDataset, get_benchmark
from .metric import SemanticIoU
from .presets import Preset


def build_dense(backbone: str, pretrained: str, preset: Preset, device: torch.device) -> DenseCLIP | ProxyCLIP:
    """The dense features of a preset on `device`: a DenseCLIP with its method and position-embedding resampling,
    or ProxyCLIP over `preset.vfm` (pretrained VFM weights whenever CLIP's are); fp16 on a GPU when the preset says
    so, as the official loaders keep the fp16 weights there."""
    if preset.vfm:
        dense = ProxyCLIP.from_names(backbone, pretrained, preset.vfm)
    else:
        dense = DenseCLIP(open_clip_model_name(backbone), pretrained, preset.method, pos_embed=preset.pos_embed)
    if preset.vision == "mmseg":
        as_mmseg_vit(dense.backbone.visual)
    if preset.normalisation == "imagenet":
        dense.mean = dense.backbone.mean = IMAGENET_MEAN
        dense.backbone.std = IMAGENET_STD
    dense = dense.to(device)
    return dense.half() if preset.precision == "fp16" and device.type == "cuda" else dense


def as_mmseg_vit(visual: torch.nn.Module) -> None:
    """The CLIP weights as MaskCLIP's mmseg ViT runs them: exact GELU in every MLP and LayerNorm eps 1e-6."""
    for module in visual.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-6
        mlp = getattr(module, "mlp", None)
        if mlp is not None and hasattr(mlp, "gelu"):
            mlp.gelu = torch.nn.GELU()


def build_segmenter(
    preset: Preset, benchmark: Benchmark, dense: DenseCLIP | ProxyCLIP, names_file: str | Path | None = None
) -> ZeroShotSegmenter:
    """The segmenter of `preset` over the benchmark's classes (from `names_file`, default the preset's file)."""
    classes = benchmark.class_names(names_file or _names_path(preset))
    if not benchmark.background:
        background, words = "none", None
    elif preset.background == "official":  # line 0 of the names file is the background prompt set
        background, words = ("both" if preset.threshold else "prompt"), classes[0]
    else:
        background, words = preset.background, list(preset.background_words) or None
    return ZeroShotSegmenter(
        dense, classes[1:] if benchmark.background else classes, templates=preset.templates, background=background,
        background_prompts=words, threshold=preset.threshold or 0.5, logit_scale=preset.logit_scale,
        short_side=preset.short_side, long_side=preset.long_side, window=preset.window, stride=preset.stride,
        area_threshold=preset.area_threshold, pamr_steps=preset.pamr_steps, pamr_dilations=preset.pamr_dilations,
        remainder=preset.remainder, resize=preset.resize, shared_background_words=preset.shared_background_words,
    )  # fmt: skip


def _names_path(preset: Preset) -> Path:
    from .datasets import NAMES_DIR

    return NAMES_DIR / preset.names_file


def benchmark_labels(segmenter_labels: torch.Tensor, benchmark: Benchmark) -> torch.Tensor:
    """Segmenter labels (0 background, i the i-th class) -> the benchmark's class ids."""
    return segmenter_labels if benchmark.background else segmenter_labels - 1


def evaluate_benchmark(
    segmenter: ZeroShotSegmenter, dataset: BenchmarkDataset, device: torch.device, progress: bool = True
) -> SemanticIoU:
    """Every image of `dataset` (this process's share under torchrun) through `segmenter`, one at a time as the
    official runs do; returns the metric with the counts of all processes."""
    benchmark = dataset.benchmark
    metric = SemanticIoU(benchmark.label_names())
    shard = Subset(dataset, range(distributed.rank(), len(dataset), distributed.world_size()))
    loader = DataLoader(shard, batch_size=None, num_workers=2 if device.type == "cuda" else 0)
    segmenter.eval()
    with torch.inference_mode():
        for image, label, _ in tqdm(loader, desc=benchmark.name, disable=not (progress and distributed.is_main())):
            pred = benchmark_labels(segmenter.predict(image[None].to(device))[0], benchmark)
            metric.update(pred.cpu(), label)
    metric.all_reduce()
    return metric


def results_record(
    metric: SemanticIoU, preset: Preset, dataset: BenchmarkDataset, backbone: str, pretrained: str,
    segmenter: ZeroShotSegmenter, seconds: float, names_file: str | Path | None = None, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """The results.json record: mIoU, per-class IoU, and the `protocol` naming the benchmark, its data, the preset
    and every inference setting, the weights and the code revision."""
    benchmark = dataset.benchmark
    protocol = zero_shot_benchmark_protocol(
        {
            "benchmark": benchmark.name,
            "root": str(dataset.root),
            "images": len(dataset),
            "limit": dataset.limit,
            "classes": benchmark.num_classes,
            "background_class": benchmark.background,
            "names_file": str(names_file or _names_path(preset)),
            "preset": preset.name,
            "settings": dataclasses.asdict(preset),
            "backbone": backbone,
            "model": segmenter.identity,
            "seed": seed,
            "world_size": distributed.world_size(),
        },
        pretrained,
    )
    return {
        "method": preset.name.partition("/")[0],
        "metrics": metric.compute(),
        "absent_classes": metric.absent_classes(),
        "seconds": seconds,
        "images_per_second": len(dataset) / seconds if seconds else None,
        "protocol": protocol,
    }


def run_benchmark(
    name: str, root: str | Path, preset: Preset, backbone: str, pretrained: str, device: torch.device,
    limit: int = 0, names_file: str | Path | None = None, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Builds everything from names and runs it: the results record of `preset` on benchmark `name` at `root`.
    `seed` seeds torch before the model is built (random weights are then the same in every process)."""
    benchmark = get_benchmark(name)
    dataset = BenchmarkDataset(benchmark, root, limit=limit)
    torch.manual_seed(seed)
    dense = build_dense(backbone, pretrained, preset, device)
    segmenter = build_segmenter(preset, benchmark, dense, names_file).to(device)
    start = time.perf_counter()
    metric = evaluate_benchmark(segmenter, dataset, device)
    seconds = time.perf_counter() - start
    return results_record(metric, preset, dataset, backbone, pretrained, segmenter, seconds, names_file, seed)

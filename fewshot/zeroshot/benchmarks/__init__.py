"""The training-free zero-shot benchmarks (VOC21, PC60, COCO-Object, VOC20, PC59, COCO-Stuff, Cityscapes, ADE20K):
datasets read in MMSegmentation layouts, the whole-dataset IoU, the official per-method presets and a run.

BENCHMARKS / get_benchmark(name)       the registry of `Benchmark`s (layout, classes, label rules)
BenchmarkDataset(benchmark, root)      item i -> (image [3, H, W] uint8, label [H, W] long, id)
SemanticIoU(class_names)               intersection and union summed over the dataset, void 255 ignored
PRESETS / preset_for(method, name)     the official settings of each (method, benchmark); codebase_preset(cfg, name)
run_benchmark(name, root, preset, ...) a results.json record with its protocol
"""

from __future__ import annotations

from .datasets import BENCHMARKS, TABLE_ORDER, Benchmark, BenchmarkDataset, BenchmarkError, get_benchmark
from .metric import SemanticIoU
from .presets import METHODS, PRESETS, Preset, codebase_preset, preset_for

__all__ = [
    "BENCHMARKS", "METHODS", "PRESETS", "TABLE_ORDER", "Benchmark", "BenchmarkDataset", "BenchmarkError", "Preset",
    "SemanticIoU", "codebase_preset", "get_benchmark", "preset_for",
]  # fmt: skip

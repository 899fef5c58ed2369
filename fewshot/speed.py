"""The measurements of tools/benchmark.py, each a function returning its keys: the feature cache in training
(`bench_cache`), a cached fold evaluation over its floor (`bench_eval`), the mask index (`bench_index`), dense
zero-shot inference (`bench_zeroshot`) and a whole zero-shot benchmark run (`bench_zs_benchmark`) over a plain CLIP
forward, and the machine they ran on. GF-SAM's folds are timed by fewshot.sam.speed. Ratios of times measured in one
run are what hold on a noisy machine; every function also returns the times behind its ratio.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

import episodes
from fewshot.cache import CachedEpisodes, Encoder, build_encoder, loader_workers
from fewshot.config import Config
from fewshot.engine import TrainStep, autocast, timed, timed_call, to_device
from fewshot.losses import build_loss


def bench_cache(cfg: Config, model: torch.nn.Module, device: torch.device, reps: int) -> dict[str, float]:
    """Seconds per training step (the train.max_iters steps of the trainer) without the cache, with it cold (encoding
    every image view of the steps up front, then the steps) and warm (from memory, best of `reps` + 1 passes)."""
    from fewshot.trainer import StepBatches

    steps = cfg.train.max_iters
    train_set = episodes.build_train_dataset(cfg.data, seed=cfg.seed)

    def loader(dataset: Dataset) -> DataLoader:  # the trainer's, with workers kept between passes
        workers = loader_workers(dataset, cfg.data.num_workers)
        loader = DataLoader(dataset, batch_sampler=StepBatches(0, steps, cfg.train.batch_size), num_workers=workers,
                            collate_fn=episodes.collate_episodes, pin_memory=device.type == "cuda",
                            persistent_workers=workers > 0)  # fmt: skip
        for _ in loader:  # starts the workers and warms the page cache, so neither counts against the steps
            pass
        return loader

    criterion = build_loss(cfg.loss)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def per_step(step_module: TrainStep, batches: DataLoader) -> float:
        def run() -> None:
            for batch in batches:
                batch = to_device(batch, device)
                with autocast(cfg.train.amp, device):
                    loss = step_module(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        return timed(run, device) / steps

    model.train()
    plain = per_step(TrainStep(model, criterion, Encoder(model)), loader(train_set))
    encoder = build_encoder(cfg, model, train_set)
    if encoder.cache is None:
        raise RuntimeError("no training feature cache: the benchmark needs a frozen backbone and data.augment.views")
    cached = TrainStep(model, criterion, encoder)
    indices = [i for batch in StepBatches(0, steps, cfg.train.batch_size) for i in batch]

    def prepare() -> list[Dataset]:  # the trainer's phase 1: every image view of the steps encoded once
        batch_size = cfg.train.batch_size * (1 + cfg.data.shots)
        return encoder.prepare([train_set], [indices], batch_size, cfg.data.num_workers, device, cfg.train.amp)

    [in_memory], fill = timed_call(prepare, device)
    if not isinstance(in_memory, CachedEpisodes):
        raise RuntimeError("the training cache did not take every image view: raise cache.max_gb")
    batches = loader(in_memory)
    cold = fill / steps + per_step(cached, batches)
    warm = min(per_step(cached, batches) for _ in range(reps + 1))
    return {"cache_speedup": plain / warm, "train_step_s": plain, "train_step_cached_cold_s": cold,
            "train_step_cached_s": warm, "train_cache_gb": encoder.cache.stats()["gb"]}  # fmt: skip


def bench_eval(cfg: Config, model: torch.nn.Module, device: torch.device, reps: int) -> dict[str, float]:
    """A cached `evaluate_fold` over every seed (fresh cache) against one backbone forward per unique image of its
    episodes; the two alternate `reps` times and the best of each counts (others' load only slows things down)."""
    from fewshot.evaluation import evaluate_fold

    datasets = episodes.build_test_datasets(cfg.data, cfg.data.seeds)  # index built before timing
    unique = sorted({i for d in datasets for e in d.episodes for i in (e.query, *e.supports)})
    source, transform = datasets[0].source, datasets[0].transform
    images = torch.stack([transform(source.load_image(i), source.load_class_mask(i, 0), None)[0] for i in unique])
    chunk = cfg.eval.batch_size * (1 + cfg.data.shots)  # the largest backbone batch of the evaluation
    model.eval()

    def floor() -> None:
        with torch.inference_mode(), autocast(cfg.eval.amp, device):
            for part in images.split(chunk):
                model.encode(part.to(device))

    floor_times, eval_times = [], []
    for _ in range(reps):
        floor_times.append(timed(floor, device))
        eval_times.append(timed(lambda: evaluate_fold(cfg, model, device), device))
    floor_s, eval_s = min(floor_times), min(eval_times)
    episodes_run = sum(len(d) for d in datasets)
    return {"eval_overhead": eval_s / floor_s, "eval_s": eval_s, "eval_floor_s": floor_s,
            "eval_unique_images": len(unique), "eval_episodes": episodes_run}  # fmt: skip


def bench_index(masks: Path | None, limit: int) -> dict[str, Any]:
    """MaskIndex over every mask in `masks` (a SegmentationClassAug folder): a cold scan, then a warm load."""
    from episodes.index import MaskIndex
    from episodes.pascal import PascalSource

    if masks is None or not masks.is_dir():
        note = "skipped: pass --voc-masks DIR (SegmentationClassAug)" if masks is None else f"skipped: {masks} missing"
        return {"index_cold_s": None, "index_warm_s": None, "index_note": note}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "voc"
        root.mkdir()
        (root / "SegmentationClassAug").symlink_to(masks.resolve(), target_is_directory=True)
        ids = sorted(p.stem for p in masks.glob("*.png"))[: limit or None]
        (root / "all.txt").write_text("\n".join(ids) + "\n")
        source = PascalSource(root, train_list="all.txt")
        cold = timed(lambda: MaskIndex.load_or_build(source, "trn", Path(tmp) / "cache"), torch.device("cpu"))
        source = PascalSource(root, train_list="all.txt")  # a new process's view: nothing held in memory
        warm = timed(lambda: MaskIndex.load_or_build(source, "trn", Path(tmp) / "cache"), torch.device("cpu"))
    return {"index_cold_s": cold, "index_warm_s": warm, "index_masks": len(ids)}


def bench_zeroshot(name: str, size: int, device: torch.device, reps: int) -> dict[str, float]:
    """Median seconds of ZeroShotSegmenter (sclip, whole image) and of open_clip's encode_image, alternated."""
    import open_clip

    from episodes.classes import VOC_CLASSES
    from fewshot.zeroshot import DenseCLIP, ZeroShotSegmenter

    dense = DenseCLIP(name, "none", "sclip")
    segmenter = ZeroShotSegmenter(dense, list(VOC_CLASSES), templates="single", short_side=size, window=0)
    segmenter = segmenter.to(device).eval()
    plain = open_clip.create_model(name, pretrained=None, force_image_size=size).to(device).eval()
    image = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, device=device)
    pixels = image.float() / 255  # the plain forward gets normalised floats for free: a lower floor
    times: dict[str, list[float]] = {"dense": [], "plain": []}
    with torch.inference_mode():
        for rep in range(reps + 1):  # the first round warms up
            for key, fn in (("plain", lambda: plain.encode_image(pixels)), ("dense", lambda: segmenter(image))):
                seconds = timed(fn, device)
                if rep:
                    times[key].append(seconds)
    dense_s, plain_s = statistics.median(times["dense"]), statistics.median(times["plain"])
    return {"zeroshot_overhead": dense_s / plain_s, "zeroshot_s": dense_s, "clip_forward_s": plain_s}


def bench_zs_benchmark(name: str, short_side: int, window: int, count: int, device: torch.device) -> dict[str, float]:
    """A VOC21 benchmark run (SCLIP's preset: resize, windows, scoring, area rule; single template) over `count`
    random 375 x 500 images in the VOC layout, against its floor: a plain CLIP forward of the same windows."""
    import numpy as np
    import open_clip
    from PIL import Image

    from fewshot.zeroshot.benchmarks import BenchmarkDataset, preset_for
    from fewshot.zeroshot.benchmarks.run import build_segmenter, evaluate_benchmark
    from fewshot.zeroshot.segmenter import rescaled_size, window_boxes

    preset = preset_for("sclip", "voc21").with_overrides(
        [f"short_side={short_side}", f"window={window}", f"stride={window // 2}", "templates='single'"]
    )
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (root / sub).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(root / f"JPEGImages/{i}.jpg")
            Image.fromarray(rng.integers(0, 21, (375, 500), dtype=np.uint8)).save(root / f"SegmentationClass/{i}.png")
        (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(map(str, range(count))))
        dataset = BenchmarkDataset("voc21", root)
        from fewshot.zeroshot.dense_clip import DenseCLIP

        dense = DenseCLIP(name, "none", "sclip").to(device)
        segmenter = build_segmenter(preset, dataset.benchmark, dense).to(device)
        evaluate_benchmark(segmenter, BenchmarkDataset("voc21", root, limit=1), device, progress=False)  # warm-up
        run_s = timed(lambda: evaluate_benchmark(segmenter, dataset, device, progress=False), device)
    plain = open_clip.create_model(name, pretrained=None, force_image_size=window).to(device).eval()
    h, w = rescaled_size(375, 500, short_side)
    crops = torch.rand(len(window_boxes(h, w, window, window // 2)), 3, window, window, device=device)
    with torch.inference_mode():
        plain.encode_image(crops[:1])
        floor_s = timed(lambda: [plain.encode_image(chunk) for _ in range(count) for chunk in crops.split(16)], device)
    return {"zs_benchmark_overhead": run_s / floor_s, "zs_benchmark_images_per_s": count / run_s,
            "zs_benchmark_floor_images_per_s": count / floor_s}  # fmt: skip


def machine(device: torch.device) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []  # Linux only
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "device": str(device), "torch": torch.__version__, "python": platform.python_version()}  # fmt: skip

"""Testing a model on a fold's fixed episodes, over one or several seeds, into the results.json record.

With a feature cache, testing runs in two phases: `fill_cache` decodes and encodes each unique image of the episodes
(every seed) once, batched, and transforms their masks once; then the episodes are built from memory, without pixels,
and take their features from the cache by id. The metrics equal the uncached ones.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import episodes
from episodes.dataset import EpisodeDataset, EpisodeMasks, ImageViews, MaskNeeds, collate_images, view_id

from . import distributed
from .cache import FeatureCache, build_feature_cache
from .config import Config
from .engine import autocast, evaluate, place_model, resolve_device
from .metrics import FewShotIoU
from .provenance import protocol_record

log = logging.getLogger(__name__)

METRIC_KEYS = ("miou", "fbiou", "pixel_acc", "mean_pixel_acc")


def shard_indices(count: int) -> range:
    """The indices of `count` test episodes this process runs: every world_size-th under torchrun, else all."""
    return range(distributed.rank(), count, distributed.world_size())


def loader_workers(dataset: Any, workers: int) -> int:
    """`workers`, or 0 for episodes built from memory (EpisodeDataset with masks): nothing to load in parallel."""
    return 0 if getattr(dataset, "masks", None) is not None else workers


def eval_workers(cfg: Config, device: torch.device) -> int:
    """Test-time DataLoader workers: data.num_workers on CUDA only. On the CPU they share the model's cores, and each
    evaluation's fork costs the parent copy-on-write faults (ViT-B/16 at 384 px, 2 cores: +15 % for 2 workers)."""
    return cfg.data.num_workers if device.type == "cuda" else 0


def episode_loader(dataset: Any, cfg: Config, device: torch.device) -> DataLoader:
    """Fixed-order loader over test episodes; under torchrun each process takes every world_size-th episode."""
    workers = loader_workers(dataset, eval_workers(cfg, device))
    if distributed.world_size() > 1:
        dataset = Subset(dataset, shard_indices(len(dataset)))
    return DataLoader(
        dataset,
        batch_size=cfg.eval.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=episodes.collate_episodes,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # keeps the global RNG untouched (exact resume)
    )


def fill_cache(
    cache: FeatureCache,
    dataset: EpisodeDataset,
    needs: MaskNeeds,
    batch_size: int,
    workers: int,
    device: torch.device,
    amp: str = "none",
) -> EpisodeMasks | None:
    """Phase 1 of a cached run: each image (view) of `needs` (EpisodeDataset.needs) is decoded and transformed once,
    as `dataset` does, if `cache` lacks its features, which are then encoded in batches of `batch_size` (DataLoader
    with `workers`, pinned on CUDA); its class masks are transformed once too.

    Returns those masks for `dataset.with_masks`, or None when the cache reached cache.max_gb before holding every
    image (the episodes then need their pixels).
    """
    ids = [view_id(key) for key in needs]
    masks = EpisodeMasks()
    with autocast(amp, device):  # the autocast of phase 2: it keys the features
        absent = set(cache.missing(ids, device))
        pixels = {key for key in needs if view_id(key) in absent}
        log.info("feature cache: encoding %d image(s), %d already held", len(pixels), len(ids) - len(pixels))
        loader = DataLoader(
            ImageViews(dataset.source, dataset.transform, needs, pixels),
            batch_size=batch_size,
            shuffle=False,
            num_workers=min(workers, len(needs) // (4 * batch_size)),  # a worker's fork pays off over >= 4 batches
            collate_fn=collate_images,
            pin_memory=device.type == "cuda",
            generator=torch.Generator(),  # keeps the global RNG untouched (exact resume)
        )
        for batch in tqdm(loader, desc="encode", leave=False, disable=not distributed.is_main()):
            if batch["image"] is not None:
                cache.encode(batch["image"].to(device, non_blocking=True), batch["image_id"])
                if cache.full:
                    return None
            for image_id, classes in zip(batch["id"], batch["masks"], strict=True):
                for class_id, resized, original in classes:
                    masks.add(image_id, class_id, resized, original)
        if cache.missing(ids, device):
            return None
    log.info("episode masks in memory: %.1f MB", masks.bytes / 2**20)
    return masks


def cached_test_episodes(
    cache: FeatureCache, datasets: list[EpisodeDataset], cfg: Config, device: torch.device
) -> list[EpisodeDataset]:
    """`datasets` (test or validation episodes) built from memory, after `fill_cache` has encoded every image of
    this process's episodes of all of them; unchanged, with a warning, when the cache cannot hold them all."""
    needs: MaskNeeds = {}
    for dataset in datasets:
        dataset.needs(shard_indices(len(dataset)), into=needs)
    batch_size = cfg.eval.batch_size * (1 + cfg.data.shots)  # the largest backbone batch of an uncached evaluation
    masks = fill_cache(cache, datasets[0], needs, batch_size, eval_workers(cfg, device), device, cfg.eval.amp)
    if masks is not None:
        return [dataset.with_masks(masks) for dataset in datasets]
    log.warning(
        "the feature cache cannot hold every test image within cache.max_gb=%.1f: episodes load their images again "
        "(raise cache.max_gb or use cache.features=disk)",
        cfg.cache.max_gb,
    )
    return datasets


def test_model(
    cfg: Config,
    model: nn.Module,
    device: torch.device | None = None,
    checkpoint: str = "",
    trained: dict[str, Any] | None = None,
) -> dict:
    """Tests `model` on the fold's test episodes for every seed in `data.seeds`; `checkpoint` and `trained`
    (provenance.checkpoint_fields) say where its weights come from, for the protocol.

    Returns the results.json record: the metrics (mean over seeds), per-class IoU, each seed's metrics, the spread
    over seeds and the protocol.
    """
    device = device or resolve_device(cfg.device)
    model = place_model(model, device, cfg.eval.amp)
    seeds = cfg.data.seeds
    datasets = episodes.build_test_datasets(cfg.data, seeds)
    cache = build_feature_cache(cfg, model)
    if cache is not None:  # each unique image encoded once across episodes and seeds, then episodes from memory
        datasets = cached_test_episodes(cache, datasets, cfg, device)
    _, novel = datasets[0].source.fold_classes(cfg.data.fold)
    keep_aspect = cfg.data.resize == "keep_aspect"
    per_seed = []
    for seed, dataset in zip(seeds, datasets, strict=True):
        metric = FewShotIoU(novel, device=device)
        loader = episode_loader(dataset, cfg, device)
        scores = evaluate(
            model, loader, metric, device, amp=cfg.eval.amp, keep_aspect=keep_aspect, desc=f"seed {seed}", encode=cache
        )
        per_seed.append({"seed": seed, **scores})
        log.info("seed %d: mIoU %.1f  FB-IoU %.1f", seed, scores["miou"], scores["fbiou"])
        if scores["absent_classes"]:
            log.warning(
                "seed %d: classes %s had no test episode among %d: mIoU is the mean over the other %d classes "
                "(absent_classes in results.json; raise data.episodes)",
                seed, scores["absent_classes"], scores["episodes"], len(novel) - len(scores["absent_classes"]),
            )  # fmt: skip
    if cache is not None:
        cache.flush()
        log.info("feature cache: %s", cache.stats())
    proto = protocol_record(cfg, model, checkpoint, trained, num_folds=datasets[0].source.num_folds)
    results = summarize(per_seed, proto)
    results["method"] = f"{cfg.model.head}_{cfg.model.backbone.name.split(':', 1)[-1]}"
    return results


def summarize(per_seed: list[dict[str, Any]], proto: dict[str, Any]) -> dict[str, Any]:
    """Mean over seeds of every metric and per-class IoU, with the standard deviation of mIoU and FB-IoU.

    A class's IoU is its mean over the seeds that tested it (None when none did); `absent_classes` lists the classes
    some seed had no episode of (each seed's own list is in `seeds`), see fewshot.metrics.
    """
    results: dict[str, Any] = {key: statistics.fmean(s[key] for s in per_seed) for key in METRIC_KEYS}
    results["class_iou"] = {}
    for c in per_seed[0]["class_iou"]:
        tested = [s["class_iou"][c] for s in per_seed if s["class_iou"][c] is not None]
        results["class_iou"][str(c)] = statistics.fmean(tested) if tested else None
    results["absent_classes"] = sorted({c for s in per_seed for c in s["absent_classes"]})
    results["episodes"] = per_seed[0]["episodes"]
    for key in ("miou", "fbiou"):
        results[f"{key}_std"] = statistics.pstdev(s[key] for s in per_seed) if len(per_seed) > 1 else 0.0
    results["seeds"] = [{**s, "class_iou": {str(c): v for c, v in s["class_iou"].items()}} for s in per_seed]
    results["protocol"] = proto
    return results


def format_results(results: dict[str, Any], class_names: dict[int, str]) -> str:
    """A short human-readable table of per-class IoU, mIoU and FB-IoU."""
    lines = [f"{'class':<28} IoU"]
    for cid, iou in results["class_iou"].items():
        shown = "absent (no episode)" if iou is None else f"{iou:5.1f}"
        lines.append(f"{class_names.get(int(cid), cid):<28} {shown}")
    spread = f" ± {results['miou_std']:.1f}" if len(results["seeds"]) > 1 else ""
    lines.append(f"{'mIoU':<28} {results['miou']:5.1f}{spread}")
    lines.append(f"{'FB-IoU':<28} {results['fbiou']:5.1f}")
    lines.append(f"episodes {results['episodes']} x {len(results['seeds'])} seed(s)")
    return "\n".join(lines)

"""Testing a model on a fold's fixed episodes, over one or several seeds, into the results.json record."""

from __future__ import annotations

import logging
import statistics
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import episodes
from episodes.sampler import episode_protocol

from . import distributed
from .cache import build_feature_cache
from .config import Config
from .engine import evaluate, place_model, resolve_device
from .metrics import FewShotIoU

log = logging.getLogger(__name__)

METRIC_KEYS = ("miou", "fbiou", "pixel_acc", "mean_pixel_acc")


def git_revision() -> str:
    """Short git revision of the code that produced a number ("unknown" outside a git checkout)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def protocol(cfg: Config, model: nn.Module, checkpoint: str = "") -> dict[str, Any]:
    """Everything that defines a number: the episodes' protocol plus the model, its weights and the code revision."""
    seeds = cfg.data.seeds or [cfg.data.seed]
    episodes_proto = episode_protocol(cfg.data)
    if cfg.model.head == "text" and not cfg.model.text.use_supports:
        episodes_proto["shots"] = 0  # text only: the zero-shot column of the tables
    return {
        **episodes_proto,
        "seeds": list(seeds),
        "backbone": cfg.model.backbone.name,
        "pretrained": cfg.model.backbone.pretrained,
        "head": cfg.model.head,
        "shot_fusion": cfg.model.shot_fusion,
        "model": getattr(model, "identity", type(model).__name__),
        "checkpoint": checkpoint,
        "git": git_revision(),
    }


def episode_loader(dataset: Any, cfg: Config, device: torch.device, shard: bool = True) -> DataLoader:
    """Fixed-order loader over test episodes; under torchrun each process takes every world_size-th episode.

    Workers (data.num_workers) load on CUDA only: on the CPU they share the model's cores, and each evaluation's fork
    costs the parent copy-on-write faults (ViT-B/16 at 384 px, 2 cores: +15 % evaluation time for 2 workers).
    """
    if shard and distributed.world_size() > 1:
        dataset = Subset(dataset, range(distributed.rank(), len(dataset), distributed.world_size()))
    return DataLoader(
        dataset,
        batch_size=cfg.eval.batch_size,
        shuffle=False,
        num_workers=cfg.data.num_workers if device.type == "cuda" else 0,
        collate_fn=episodes.collate_episodes,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # keeps the global RNG untouched (exact resume)
    )


def test_model(cfg: Config, model: nn.Module, device: torch.device | None = None, checkpoint: str = "") -> dict:
    """Tests `model` on the fold's test episodes for every seed in `data.seeds` (or `data.seed`).

    Returns the results.json record: the metrics (mean over seeds), per-class IoU, each seed's metrics, the spread
    over seeds and the protocol.
    """
    device = device or resolve_device(cfg.device)
    model = place_model(model, device, cfg.train.amp)
    cache = build_feature_cache(cfg, model)  # each unique image encoded once across episodes and seeds
    per_seed = []
    for seed in cfg.data.seeds or [cfg.data.seed]:
        dataset = episodes.build_test_dataset(cfg.data, seed=seed)
        _, novel = dataset.source.fold_classes(cfg.data.fold)
        metric = FewShotIoU(novel, device=device)
        loader = episode_loader(dataset, cfg, device)
        keep_aspect = cfg.data.resize == "keep_aspect"
        scores = evaluate(
            model, loader, metric, device, amp=cfg.train.amp, keep_aspect=keep_aspect, desc=f"seed {seed}", encode=cache
        )
        per_seed.append({"seed": seed, **scores})
        log.info("seed %d: mIoU %.1f  FB-IoU %.1f", seed, scores["miou"], scores["fbiou"])
    if cache is not None:
        cache.flush()
        log.info("feature cache: %s", cache.stats())
    results = summarize(per_seed, protocol(cfg, model, checkpoint))
    results["method"] = f"{cfg.model.head}_{cfg.model.backbone.name.split(':', 1)[-1]}"
    return results


def summarize(per_seed: list[dict[str, Any]], proto: dict[str, Any]) -> dict[str, Any]:
    """Mean over seeds of every metric and per-class IoU, with the standard deviation of mIoU and FB-IoU."""
    results: dict[str, Any] = {key: statistics.fmean(s[key] for s in per_seed) for key in METRIC_KEYS}
    classes = per_seed[0]["class_iou"]
    results["class_iou"] = {str(c): statistics.fmean(s["class_iou"][c] for s in per_seed) for c in classes}
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
        lines.append(f"{class_names.get(int(cid), cid):<28} {iou:5.1f}")
    spread = f" ± {results['miou_std']:.1f}" if len(results["seeds"]) > 1 else ""
    lines.append(f"{'mIoU':<28} {results['miou']:5.1f}{spread}")
    lines.append(f"{'FB-IoU':<28} {results['fbiou']:5.1f}")
    lines.append(f"episodes {results['episodes']} x {len(results['seeds'])} seed(s)")
    return "\n".join(lines)

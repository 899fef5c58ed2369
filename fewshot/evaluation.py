"""Scoring a model on a fold's fixed episodes, over one or several seeds, into the results.json record.

One test episode, top to bottom:
    evaluate_fold           the fold's episodes for every seed (episodes.build_test_datasets) and the model's
                            encoder (fewshot.cache.build_encoder); `Encoder.prepare` encodes each unique image once
                            when there is a feature cache, and the episodes then come from memory
    evaluate                per batch (episodes.dataset.episode_item, collated), on the device, under autocast:
      encode_episodes         the encoder's features of the queries and supports (fewshot.engine)
      forward_episodes        head and shot fusion: logits [B, 2, H, W] (FewShotSegmenter.forward_features)
      Scoring.update          the prediction against the label, resized or at its original resolution
                              (data.eval_resolution), into FewShotIoU
    summarize               mean and spread over seeds, with the protocol
Cached or not, with pixels or from memory, this is the only path; the metrics are equal either way.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import episodes

from . import distributed
from .cache import Encoder, build_encoder, loader_workers
from .config import Config, DataConfig
from .engine import (
    autocast,
    encode_episodes,
    forward_episodes,
    inference_context,
    place_model,
    resolve_device,
    to_device,
)
from .metrics import FewShotIoU, predict_mask
from .provenance import protocol_record

log = logging.getLogger(__name__)

METRIC_KEYS = ("miou", "fbiou", "pixel_acc", "mean_pixel_acc")


def shard_indices(count: int) -> range:
    """The indices of `count` test episodes this process runs: every world_size-th under torchrun, else all."""
    return range(distributed.rank(), count, distributed.world_size())


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


def at_original_resolution(logits: Tensor, size: tuple[int, int], keep_aspect: bool) -> Tensor:
    """logits [2,H,W] of a resized query -> prediction [H0,W0] at the label's original resolution.

    With keep-aspect resizing the image sits in the top-left corner of the padded square; that part is cropped first.
    """
    H0, W0 = size
    if keep_aspect:
        side = logits.shape[-1]  # the padded square's
        scale = side / max(H0, W0)
        logits = logits[:, : max(1, round(H0 * scale)), : max(1, round(W0 * scale))]
    logits = F.interpolate(logits[None].float(), size=(H0, W0), mode="bilinear", align_corners=False)[0]
    return predict_mask(logits)


@dataclass(frozen=True)
class Scoring:
    """Where a prediction is scored (data.eval_resolution): against the query mask the model saw ("resized", HSNet
    family) or against the label at its own resolution ("original", PFENet family: the logits, cropped to the
    image part of a keep-aspect canvas, are resized bilinearly to the label and then thresholded)."""

    original: bool = False
    keep_aspect: bool = False

    @classmethod
    def from_config(cls, data: DataConfig) -> Scoring:
        return cls(original=data.eval_resolution == "original", keep_aspect=data.resize == "keep_aspect")

    def update(self, metric: FewShotIoU, logits: Tensor, batch: dict[str, Any]) -> None:
        """Adds a batch's predictions, logits [B,2,H,W], to `metric`."""
        if not self.original:
            metric.update(predict_mask(logits), batch["query_mask"], batch["class_ids"])
            return
        if "query_mask_original" not in batch:
            raise ValueError("original-resolution scoring needs episodes built with data.eval_resolution=original")
        for b, target in enumerate(batch["query_mask_original"]):
            target = torch.as_tensor(target).to(logits.device, non_blocking=True)
            pred = at_original_resolution(logits[b], tuple(target.shape), self.keep_aspect)
            metric.update(pred[None], target[None], batch["class_ids"][b : b + 1])


def evaluate(
    model: nn.Module,
    encoder: Encoder,
    loader: Iterable[dict[str, Any]],
    metric: FewShotIoU,
    scoring: Scoring,
    device: torch.device,
    amp: str = "none",
    desc: str = "test",
) -> dict[str, Any]:
    """Runs every batch of episodes through `model`, its backbone features from `encoder`, and returns
    `metric.compute()` (summed over processes)."""
    with inference_context(model):
        for batch in tqdm(loader, desc=desc, leave=False, disable=not distributed.is_main()):
            batch = to_device(batch, device)
            with autocast(amp, device):
                query_feats, support_feats = encode_episodes(encoder, batch)
                logits = forward_episodes(model, batch, query_feats, support_feats)
            scoring.update(metric, logits, batch)
    metric.all_reduce()
    return metric.compute()


def evaluate_fold(
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
    encoder = build_encoder(cfg, model, datasets[0])
    batch_size = cfg.eval.batch_size * (1 + cfg.data.shots)  # the largest backbone batch of an uncached evaluation
    indices = [shard_indices(len(dataset)) for dataset in datasets]
    served = encoder.prepare(datasets, indices, batch_size, eval_workers(cfg, device), device, cfg.eval.amp)
    _, novel = datasets[0].source.fold_classes(cfg.data.fold)
    scoring = Scoring.from_config(cfg.data)
    per_seed = []
    for seed, dataset in zip(seeds, served, strict=True):
        metric = FewShotIoU(novel, device=device)
        loader = episode_loader(dataset, cfg, device)
        scores = evaluate(model, encoder, loader, metric, scoring, device, cfg.eval.amp, desc=f"seed {seed}")
        per_seed.append({"seed": seed, **scores})
        log.info("seed %d: mIoU %.1f  FB-IoU %.1f", seed, scores["miou"], scores["fbiou"])
        if scores["absent_classes"]:
            log.warning(
                "seed %d: classes %s had no test episode among %d: mIoU is the mean over the other %d classes "
                "(absent_classes in results.json; raise data.episodes)",
                seed, scores["absent_classes"], scores["episodes"], len(novel) - len(scores["absent_classes"]),
            )  # fmt: skip
    encoder.flush()
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

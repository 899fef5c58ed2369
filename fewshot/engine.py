"""The hot path shared by training and testing: device placement, autocast, the training step, evaluation."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import distributed
from .config import ConfigError
from .metrics import FewShotIoU, predict_mask

log = logging.getLogger(__name__)

BATCH_TENSORS = ("query_image", "query_mask", "support_images", "support_masks", "class_ids")
MASKS = ("query_mask", "support_masks")  # uint8 on the way (8x less to pin and copy), int64 on the device


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when it is there, else the CPU; an explicit CUDA device without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast as configured (`train.amp`); fp16 is CUDA-only."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs CUDA; use train.amp=bf16 or none on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def place_model(model: nn.Module, device: torch.device, amp: str) -> nn.Module:
    """`model` on `device`, with channels-last weights on CUDA under bf16 / fp16 autocast: convolutions (CNN
    backbones) then run faster (timm ResNet-50 at 384 px on an H100, bf16: 0.33 -> 0.27 ms per image); in fp32 and
    on the CPU channels-last does not help, and ViTs are indifferent to it."""
    model = model.to(device)
    if device.type == "cuda" and amp != "none":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on `device` (a batch without pixels has no images); masks become int64 there."""
    out = dict(batch)
    for key in BATCH_TENSORS:
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    for key in MASKS:
        out[key] = out[key].long()
    return out


@contextlib.contextmanager
def inference_context(model: nn.Module) -> Iterator[None]:
    """Eval mode and inference_mode for the block, then the model's previous mode again."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


Encoder = Callable[[Tensor, "list[str] | None"], "list[Tensor]"]


def encode_episodes(encode: Encoder, batch: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
    """Backbone features of a batch's queries [B,C,h,w] and supports [B,S,C,h,w] through `encode(images, ids)`.

    A batch without pixels takes its features by id from `encode.lookup(ids, device)`, a feature cache.
    """
    B, S = batch["support_masks"].shape[:2]
    query_ids = batch.get("query_id")
    support_ids = [i for ids in batch["support_ids"] for i in ids] if "support_ids" in batch else None
    if "query_image" not in batch:
        if not hasattr(encode, "lookup") or query_ids is None or support_ids is None:
            raise ValueError(
                "a batch without images (an EpisodeDataset built from masks in memory) needs its ids and a feature "
                "cache that holds their features; load the images or pass the cache as `encode`"
            )
        feats = encode.lookup([*query_ids, *support_ids], batch["support_masks"].device)
        return [f[:B] for f in feats], [f[B:].unflatten(0, (B, S)) for f in feats]  # (B, S, C, h, w)
    query_image, support_images = batch["query_image"], batch["support_images"]
    supports = support_images.flatten(0, 1)  # (B*S, 3, H, W)
    if query_image.shape[1:] == supports.shape[1:] and query_image.dtype == supports.dtype:
        ids = None if query_ids is None or support_ids is None else [*query_ids, *support_ids]
        feats = encode(torch.cat([query_image, supports]), ids)  # one pass: a cache encodes each unique image once
        query_feats, support_feats = [f[:B] for f in feats], [f[B:] for f in feats]
    else:
        query_feats, support_feats = encode(query_image, query_ids), encode(supports, support_ids)
    return query_feats, [f.unflatten(0, (B, S)) for f in support_feats]  # (B, S, C, h, w)


class TrainStep(nn.Module):
    """One training forward, loss included, as a module so DistributedDataParallel can wrap it.

    `encode` maps images [N,3,H,W] to backbone features; by default the model's own, a feature cache can stand in.
    """

    def __init__(self, model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor], encode=None):
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.encode = encode or (lambda images, ids=None: model.encode(images))

    def forward(self, batch: dict[str, Any]) -> Tensor:
        query_feats, support_feats = encode_episodes(self.encode, batch)
        logits = self.model.forward_features(
            query_feats, support_feats, batch["support_masks"], batch["class_ids"], batch["query_mask"].shape[-2:]
        )
        loss = self.criterion(logits, batch["query_mask"])
        return loss + self.model.auxiliary_loss(query_feats, support_feats, batch["support_masks"], logits)


def score_at_original_resolution(logits: Tensor, size: tuple[int, int], keep_aspect: bool) -> Tensor:
    """logits [2,S,S] of a resized query -> prediction [H0,W0] at the label's original resolution.

    With keep-aspect resizing the image sits in the top-left corner of the padded square; that part is cropped first.
    """
    H0, W0 = size
    if keep_aspect:
        S = logits.shape[-1]
        scale = S / max(H0, W0)
        logits = logits[:, : max(1, round(H0 * scale)), : max(1, round(W0 * scale))]
    logits = F.interpolate(logits[None].float(), size=(H0, W0), mode="bilinear", align_corners=False)[0]
    return predict_mask(logits)


def evaluate(
    model: nn.Module,
    loader: Any,
    metric: FewShotIoU,
    device: torch.device,
    amp: str = "none",
    keep_aspect: bool = False,
    desc: str = "test",
    encode: Encoder | None = None,
) -> dict[str, Any]:
    """Runs every batch of episodes through `model` and returns `metric.compute()` (summed over processes).

    `encode(images, ids) -> features` replaces the model's backbone pass when given (a feature cache); batches
    without pixels then take their features from it by id.
    """
    with inference_context(model):
        for batch in tqdm(loader, desc=desc, leave=False, disable=not distributed.is_main()):
            batch = to_device(batch, device)
            with autocast(amp, device):
                if encode is None:
                    logits = model(
                        batch["query_image"], batch["support_images"], batch["support_masks"], batch["class_ids"]
                    )
                else:
                    query_feats, support_feats = encode_episodes(encode, batch)
                    masks, size = batch["support_masks"], batch["query_mask"].shape[-2:]
                    logits = model.forward_features(query_feats, support_feats, masks, batch["class_ids"], size)
            if "query_mask_original" in batch:
                for b, target in enumerate(batch["query_mask_original"]):
                    target = torch.as_tensor(target).to(device, non_blocking=True)
                    pred = score_at_original_resolution(logits[b], tuple(target.shape), keep_aspect)
                    metric.update(pred[None], target[None], batch["class_ids"][b : b + 1])
            else:
                metric.update(predict_mask(logits), batch["query_mask"], batch["class_ids"])
    metric.all_reduce()
    return metric.compute()

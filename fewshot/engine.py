"""The hot path shared by training and testing: device placement, autocast, an episode batch's forward, the
training step. Evaluation (fewshot.evaluation.evaluate) runs the same `encode_episodes` -> `forward_episodes`."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .config import ConfigError

if TYPE_CHECKING:
    from .cache import Encoder

log = logging.getLogger(__name__)

BATCH_TENSORS = ("images", "query_mask", "support_masks", "class_ids")
MASKS = ("query_mask", "support_masks")  # uint8 on the way (8x less to pin and copy), int64 on the device


def timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """`fn()` and the seconds it takes, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds `fn()` takes, the device synchronised before and after."""
    return timed_call(fn, device)[1]


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
    """The batch with its tensors on `device`; masks become int64 there."""
    out = dict(batch)
    for key in BATCH_TENSORS:
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


def encode_episodes(encoder: Encoder, batch: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
    """Backbone features of a batch's queries [B,C,h,w] and supports [B,S,C,h,w], per layer, from `encoder`: it
    encodes the pixels the batch brings (`images`, named by `image_ids`) and serves every id, cached or not."""
    B, S = batch["support_masks"].shape[:2]
    ids = [*batch["query_id"], *(image_id for ids in batch["support_ids"] for image_id in ids)]
    feats = encoder.features(batch["images"], batch["image_ids"], ids)
    return [f[:B] for f in feats], [f[B:].unflatten(0, (B, S)) for f in feats]  # (B, S, C, h, w)


def forward_episodes(
    model: nn.Module, batch: dict[str, Any], query_feats: list[Tensor], support_feats: list[Tensor]
) -> Tensor:
    """Logits [B,2,H,W] of a batch's episodes from their backbone features (`encode_episodes`): the model's head and
    shot fusion (`forward_features`), at the size of the query masks."""
    masks, size = batch["support_masks"], batch["query_mask"].shape[-2:]
    return model.forward_features(query_feats, support_feats, masks, batch["class_ids"], size)


class TrainStep(nn.Module):
    """One training forward, loss included, as a module so DistributedDataParallel can wrap it.

    `encoder` (fewshot.cache.Encoder) gives the backbone features, from the model's backbone or its feature cache.
    """

    def __init__(self, model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor], encoder: Encoder):
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.encoder = encoder

    def forward(self, batch: dict[str, Any]) -> Tensor:
        query_feats, support_feats = encode_episodes(self.encoder, batch)
        logits = forward_episodes(self.model, batch, query_feats, support_feats)
        loss = self.criterion(logits, batch["query_mask"])
        return loss + self.model.auxiliary_loss(query_feats, support_feats, batch["support_masks"], logits)

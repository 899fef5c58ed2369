"""Zero-shot segmentation from class names: DenseCLIP features against text embeddings, per pixel.

The recipe shared by SCLIP, ClearCLIP and NACLIP: resize the short side (`short_side`), slide a `window` with
`stride` over the image (or take it whole with window 0), score every patch by cosine similarity to each prompt,
upsample the scores bilinearly and average overlapping windows, resize them to the input size, take the maximum over
each class's synonyms and a softmax over classes at temperature `logit_scale`. Background is a prompt set
(`prompt`), a probability threshold (`threshold`: background where no class reaches it) or both.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Background, ZeroShotConfig
from ..text import ClassEmbeddings, background_words, parse_classes
from .dense_clip import DenseCLIP

log = logging.getLogger(__name__)

BACKGROUND_MODES = get_args(Background)


class ZeroShotSegmenter(nn.Module):
    """Images -> per-pixel scores over background and N classes.

    Args:
        dense: the DenseCLIP feature extractor.
        classes: N classes, each a name, "a,b" synonyms or a list of synonyms.
        background: prompt | threshold | both.
        background_prompts: words of the background class; None = fewshot.text.BACKGROUND_WORDS minus the classes.
        max_batch: windows encoded per forward pass.
    """

    def __init__(
        self,
        dense: DenseCLIP,
        classes: Sequence[str | Sequence[str]],
        templates: str = "imagenet",
        background: str = "prompt",
        background_prompts: Sequence[str] | None = None,
        threshold: float = 0.5,
        logit_scale: float = 40.0,
        short_side: int = 336,
        window: int = 224,
        stride: int = 112,
        max_batch: int = 16,
    ):
        super().__init__()
        if background not in BACKGROUND_MODES:
            raise KeyError(f"unknown background mode {background!r}; choose from {list(BACKGROUND_MODES)}")
        parsed = parse_classes(classes)
        if background == "threshold" and len(parsed) < 2:
            raise ValueError(
                "zeroshot.background=threshold needs at least 2 classes (a softmax over one class is always 1); "
                "use zeroshot.background=prompt or both"
            )
        if not 0.0 < threshold < 1.0 and background != "prompt":
            raise ValueError(f"zeroshot.threshold={threshold} must lie strictly between 0 and 1")
        if window and (stride < 1 or stride > window):
            raise ValueError(f"zeroshot.stride={stride} must be in 1..window ({window}); or set zeroshot.window=0")
        self.dense, self.classes, self.background = dense, parsed, background
        self.threshold, self.logit_scale = threshold, logit_scale
        self.short_side, self.window, self.stride, self.max_batch = short_side, window, stride, max_batch
        text = dense.text.encode(parsed, templates)
        rows, owner = [text.embeddings], [text.owner + 1]  # class i is channel i + 1; 0 is background
        if background != "threshold":
            words = tuple(background_prompts) if background_prompts else background_words(parsed)
            rows.append(dense.text.encode_names(words, templates))
            owner.append(torch.zeros(len(words), dtype=torch.long))
        self.register_buffer("text_embeddings", torch.cat(rows), persistent=False)  # (M, D)
        self.register_buffer("owner", torch.cat(owner), persistent=False)  # (M,) channel of each prompt row
        self.identity = (
            f"zeroshot:{dense.method}|{dense.name}|{dense.pretrained}|{templates}|{background}"
            f"|t{threshold:g}|s{logit_scale:g}|short{short_side}|win{window}/{stride}"
        )

    @classmethod
    def from_config(
        cls,
        cfg: ZeroShotConfig,
        classes: Sequence[str | Sequence[str]],
        dense: DenseCLIP | None = None,
        device: torch.device | str | None = None,
    ) -> ZeroShotSegmenter:
        """A segmenter as `zeroshot.*` configures it, on `device` (the prompts are encoded there: thousands of
        template sentences are slow on a CPU); `dense` reuses an already built DenseCLIP of the same settings."""
        dense = dense or DenseCLIP(cfg.model, cfg.pretrained, cfg.method)
        if device is not None:
            dense.to(device)
        if (dense.name, dense.pretrained, dense.method) != (cfg.model, cfg.pretrained, cfg.method):
            raise ValueError(
                f"DenseCLIP ({dense.name}, {dense.pretrained}, {dense.method}) does not match zeroshot.model / "
                f"pretrained / method ({cfg.model}, {cfg.pretrained}, {cfg.method})"
            )
        segmenter = cls(
            dense, classes, templates=cfg.templates, background=cfg.background,
            background_prompts=cfg.background_words or None, threshold=cfg.threshold, logit_scale=cfg.logit_scale,
            short_side=cfg.short_side, window=cfg.window, stride=cfg.stride,
        )  # fmt: skip
        return segmenter if device is None else segmenter.to(device)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def forward(self, images: Tensor) -> Tensor:
        """images [B,3,H,W] uint8 or float in [0,1] -> log-probabilities [B, 1+N, H, W]; channel 0 is background,
        channel i the i-th class. With a threshold, the background channel is log(threshold): argmax gives labels."""
        H, W = images.shape[-2:]
        images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        if self.short_side:
            scale = self.short_side / min(H, W)
            images = F.interpolate(
                images,
                size=(max(1, round(H * scale)), max(1, round(W * scale))),
                mode="bilinear",
                align_corners=False,
                antialias=scale < 1,
            )
        similarity = self._similarity(images)  # (B, M, h, w), cosine per prompt row
        similarity = F.interpolate(similarity, size=(H, W), mode="bilinear", align_corners=False)
        scores = self._per_channel(similarity) * self.logit_scale  # (B, 1 + N, H, W)
        if self.background == "threshold":
            log_probs = scores[:, 1:].log_softmax(1)
            background = torch.full_like(log_probs[:, :1], math.log(self.threshold))
            return torch.cat([background, log_probs], dim=1)
        log_probs = scores.log_softmax(1)
        if self.background == "both":
            background = log_probs[:, :1].clamp(min=math.log(self.threshold))
            log_probs = torch.cat([background, log_probs[:, 1:]], dim=1)
        return log_probs

    def predict(self, images: Tensor) -> Tensor:
        """images [B,3,H,W] -> labels [B,H,W] long: 0 background, i the i-th class (1-based)."""
        return self(images).argmax(1)

    def _per_channel(self, similarity: Tensor) -> Tensor:
        """Prompt rows [B, M, H, W] -> channels [B, 1+N, H, W], the maximum over each channel's rows (channel 0 is
        -inf without background prompts)."""
        channels = [("background",), *self.classes]
        return ClassEmbeddings(self.text_embeddings, self.owner, channels).reduce(similarity)

    def _similarity(self, images: Tensor) -> Tensor:
        """images [B,3,H,W] in [0,1] -> cosine similarities [B, M, H, W], sliding windows averaged."""
        B, _, H, W = images.shape
        boxes = window_boxes(H, W, self.window, self.stride)
        crops = torch.stack([images[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in boxes], dim=1).flatten(0, 1)
        sims = torch.cat([self._encode(chunk) for chunk in crops.split(self.max_batch)])  # (B * n, M, ch, cw)
        sims = sims.unflatten(0, (B, len(boxes)))  # (B, n, M, ch, cw)
        if len(boxes) == 1:
            return sims[:, 0]
        total = images.new_zeros(B, sims.shape[2], H, W)
        count = images.new_zeros(1, 1, H, W)
        for i, (y0, y1, x0, x1) in enumerate(boxes):
            total[:, :, y0:y1, x0:x1] += sims[:, i]
            count[:, :, y0:y1, x0:x1] += 1
        return total / count

    def _encode(self, crops: Tensor) -> Tensor:
        """crops [n,3,h,w] -> similarities [n, M, h, w]; crops are resized to a multiple of the patch first."""
        h, w = crops.shape[-2:]
        ph, pw = self.dense.patch_size
        size = (max(ph, math.ceil(h / ph) * ph), max(pw, math.ceil(w / pw) * pw))
        if size != (h, w):
            crops = F.interpolate(crops, size=size, mode="bilinear", align_corners=False)
        features = self.dense.encode_image_dense(crops)  # (n, D, h/p, w/p)
        sims = torch.einsum("ndhw,md->nmhw", features, self.text_embeddings.to(features.dtype))
        return F.interpolate(sims, size=(h, w), mode="bilinear", align_corners=False)


def window_boxes(H: int, W: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Sliding-window crops (y0, y1, x0, x1) covering an H x W image; window 0 = the whole image. Windows at the
    border are shifted inside, so every crop has size min(H, window) x min(W, window)."""
    if not window:
        return [(0, H, 0, W)]

    def starts(n: int) -> list[int]:
        if n <= window:
            return [0]
        steps = math.ceil((n - window) / stride)
        return [min(i * stride, n - window) for i in range(steps + 1)]

    wh, ww = min(H, window), min(W, window)
    return [(y, y + wh, x, x + ww) for y in starts(H) for x in starts(W)]

"""Zero-shot segmentation from class names: dense CLIP features against text embeddings, per pixel.

The recipe of SCLIP, NACLIP and ClearCLIP (SCLIP's `clip_segmentor.py`): resize the image so its short side is
`short_side` (long side at most `long_side`, sizes int(x * s + 0.5), bilinear without antialiasing: mmseg's
`Resize(scale=(long_side, short_side), keep_ratio=True)`; `resize="mmcv"` rounds to uint8 as cv2 does), slide a
`window` with `stride` over it (or take it whole with window 0), score every patch by cosine similarity to each
prompt row (a crop side that is not a multiple of the patch follows `remainder`: floor drops the remainder as CLIP's
patch convolution does, centre / corner pad it as ClearCLIP / MaskCLIP), upsample the scores bilinearly, average
overlapping windows and resize them to the input size; optionally refine them with PAMR (NACLIP). Then a softmax at
temperature `logit_scale` over every prompt row (all synonyms of all classes and the background words), and a
class's probability is the maximum over its rows; SCLIP's `area_threshold` drops small classes. Background is a
prompt set (`prompt`), a probability threshold (`threshold`: background where no class reaches it), both, or absent
(`none`, for benchmarks without a background class). The official settings per benchmark are the presets of
fewshot/zeroshot/benchmarks/presets.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Protocol, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Background, ZeroShotConfig
from ..text import ClassEmbeddings, background_words, parse_classes
from .refine import area_keep, pamr

log = logging.getLogger(__name__)

BACKGROUND_MODES = get_args(Background)
REMAINDERS = ("floor", "centre", "corner")
RESIZES = ("torch", "mmcv")
MAX_LONG_SIDE = 2048  # the long-side bound of mmseg's Resize(scale=(2048, short_side)) in the published configs


class DenseFeatures(Protocol):
    """What the segmenter needs of a dense feature extractor (a `DenseCLIP`, or any other image-text model)."""

    patch_size: int  # input sides are multiples of this
    identity: str  # names the model, its weights and its method in the protocol

    def __call__(self, images: Tensor) -> Tensor:
        """images [n, 3, h, w] in [0, 1], sides multiples of patch_size -> L2-normalised [n, D, h/p, w/p]."""
        ...

    def encode_text(
        self, classes: Sequence[str | Sequence[str]], templates: str | Sequence[str] | None
    ) -> ClassEmbeddings:
        """Classes with synonyms -> one L2-normalised row per synonym in the same space."""
        ...


class ZeroShotSegmenter(nn.Module):
    """Images -> per-pixel scores over background and N classes.

    Args:
        dense: the dense feature extractor (e.g. `DenseCLIP.from_config(cfg.zeroshot)`), on the device where the
            prompts should be encoded.
        classes: N classes, each a name, "a,b" synonyms or a list of synonyms.
        background: prompt | threshold | both | none (no background channel: channel 0 is -inf, for benchmarks
            without a background class).
        background_prompts: words of the background class; None = fewshot.text.BACKGROUND_WORDS minus the classes.
        long_side: the bound on the long side of the resize (mmseg's scale=(long_side, short_side), keep ratio).
        max_batch: windows encoded per forward pass.
        area_threshold: SCLIP's `area_thd` (fewshot.zeroshot.refine.area_filter); 0 = off.
        pamr_steps, pamr_dilations: PAMR on the cosine scores before the softmax (NACLIP); 0 steps = off.
        remainder: a window side that is not a patch multiple: floor (drop the remainder, as CLIP's patch
            convolution does: SCLIP, NACLIP), centre (pad it centred with the mean colour and cut the padding from
            the scores: ClearCLIP) or corner (pad bottom-right and stretch the padded grid's scores over the crop:
            MaskCLIP's mmseg ViT).
        resize: the short-side resize: torch (bilinear on floats) or mmcv (bilinear on the uint8 image, rounded back
            to uint8 as mmcv's cv2 resize does).
        shared_background_words: allow background words that also name a class (SCLIP's COCO-Object file has 'bed'
            in both); off, such a word is an error.
    """

    def __init__(
        self,
        dense: DenseFeatures,
        classes: Sequence[str | Sequence[str]],
        templates: str = "imagenet",
        background: str = "prompt",
        background_prompts: Sequence[str] | None = None,
        threshold: float = 0.5,
        logit_scale: float = 40.0,
        short_side: int = 336,
        long_side: int = MAX_LONG_SIDE,
        window: int = 224,
        stride: int = 112,
        max_batch: int = 16,
        area_threshold: float = 0.0,
        pamr_steps: int = 0,
        pamr_dilations: Sequence[int] = (8, 16),
        remainder: str = "floor",
        resize: str = "torch",
        shared_background_words: bool = False,
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
        if not 0.0 < threshold < 1.0 and background in ("threshold", "both"):
            raise ValueError(f"zeroshot.threshold={threshold} must lie strictly between 0 and 1")
        if remainder not in REMAINDERS or resize not in RESIZES:
            raise KeyError(f"remainder={remainder!r} / resize={resize!r}; choose from {REMAINDERS} / {RESIZES}")
        if not 0.0 <= area_threshold < 1.0:
            raise ValueError(f"area_threshold={area_threshold} must lie in [0, 1)")
        if window and (stride < 1 or stride > window):
            raise ValueError(f"zeroshot.stride={stride} must be in 1..window ({window}); or set zeroshot.window=0")
        self.dense, self.classes, self.background = dense, parsed, background
        self.threshold, self.logit_scale = threshold, logit_scale
        self.short_side, self.window, self.stride, self.max_batch = short_side, window, stride, max_batch
        self.long_side = long_side
        self.area_threshold, self.pamr_steps, self.pamr_dilations = area_threshold, pamr_steps, tuple(pamr_dilations)
        self.remainder, self.resize = remainder, resize
        text = dense.encode_text(parsed, templates)
        rows, owner = [text.embeddings], [text.owner + 1]  # class i is channel i + 1; 0 is background
        if background in ("prompt", "both"):
            words = tuple(background_prompts) if background_prompts else background_words(parsed)
            clash = sorted({w.lower() for w in words} & {s.lower() for synonyms in parsed for s in synonyms})
            if clash and not shared_background_words:
                raise ValueError(
                    f"background words {clash} also name a class; leave them out of zeroshot.background_words"
                )
            background_rows = dense.encode_text([words], templates).embeddings
            rows.append(background_rows)
            owner.append(torch.zeros(len(background_rows), dtype=torch.long))
        self.register_buffer("text_embeddings", torch.cat(rows), persistent=False)  # (M, D)
        self.register_buffer("owner", torch.cat(owner), persistent=False)  # (M,) channel of each prompt row
        self.identity = (
            f"zeroshot:{dense.identity}|{templates}|{background}"
            f"|t{threshold:g}|s{logit_scale:g}|short{short_side}|win{window}/{stride}"
        )
        extras = (area_threshold, pamr_steps, remainder != "floor", resize != "torch", long_side != MAX_LONG_SIDE)
        if any(extras):  # the settings beyond the codebase's original ones, named only when used
            self.identity += f"|area{area_threshold:g}|pamr{pamr_steps}|{remainder}|{resize}|long{long_side}"

    @classmethod
    def from_config(
        cls, cfg: ZeroShotConfig, classes: Sequence[str | Sequence[str]], dense: DenseFeatures
    ) -> ZeroShotSegmenter:
        """A segmenter over `dense` as the `zeroshot.*` settings configure it."""
        return cls(
            dense, classes, templates=cfg.templates, background=cfg.background,
            background_prompts=cfg.background_words or None, threshold=cfg.threshold, logit_scale=cfg.logit_scale,
            short_side=cfg.short_side, window=cfg.window, stride=cfg.stride,
        )  # fmt: skip

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def forward(self, images: Tensor) -> Tensor:
        """images [B,3,H,W] uint8 or float in [0,1] -> log-probabilities [B, 1+N, H, W]; channel 0 is background,
        channel i the i-th class: the log of the maximum, over the channel's prompt rows, of the softmax over all
        rows (so channels need not sum to 1). With a threshold, background is at least log(threshold)."""
        H, W = images.shape[-2:]
        images = self._rescaled(images)
        similarity = self._similarity(images, (H, W))  # (B, M, H, W), cosine per prompt row
        if self.pamr_steps:  # on the resized image brought to the output size, as NACLIP does (the official guide is
            # normalised per channel, which leaves PAMR unchanged up to its 1e-8)
            guide = F.interpolate(images, size=(H, W), mode="bilinear", align_corners=False)
            similarity = pamr(guide, similarity, self.pamr_steps, self.pamr_dilations)
        log_probs = self._per_channel(similarity.mul_(self.logit_scale).log_softmax(1))  # (B, 1 + N, H, W)
        if self.area_threshold:  # zeroed probabilities are -inf here
            log_probs = log_probs.masked_fill(~area_keep(log_probs, self.area_threshold)[:, :, None, None], -math.inf)
        if self.background in ("prompt", "none"):
            return log_probs
        floor = math.log(self.threshold)
        if self.background == "threshold":  # no background rows: channel 0 is -inf
            return torch.cat([torch.full_like(log_probs[:, :1], floor), log_probs[:, 1:]], dim=1)
        log_probs[:, 0].clamp_(min=floor)
        return log_probs

    def _rescaled(self, images: Tensor) -> Tensor:
        """images [B,3,H,W] uint8 or [0,1] -> [0,1] float with the short side `short_side` (see `resize`)."""
        H, W = images.shape[-2:]
        scale = 255.0 if images.dtype == torch.uint8 else 1.0
        images = images.float()
        size = rescaled_size(H, W, self.short_side, self.long_side) if self.short_side else (H, W)
        if size != (H, W):
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            if self.resize == "mmcv":  # cv2 resizes the uint8 image and rounds (saturating) back to uint8
                images = (images * (255.0 / scale)).round().clamp(0, 255) * (scale / 255.0)
        return images / scale

    def predict(self, images: Tensor) -> Tensor:
        """images [B,3,H,W] -> labels [B,H,W] long: 0 background, i the i-th class (1-based)."""
        return self(images).argmax(1)

    def _per_channel(self, rows: Tensor) -> Tensor:
        """Per prompt row [B, M, H, W] -> channels [B, 1+N, H, W], the maximum over each channel's rows (channel 0 is
        -inf without background prompts)."""
        channels = [("background",), *self.classes]
        return ClassEmbeddings(self.text_embeddings, self.owner, channels).reduce(rows)

    def _similarity(self, images: Tensor, out_size: tuple[int, int]) -> Tensor:
        """images [B,3,h,w] in [0,1] -> cosine similarities [B, M, *out_size]. The whole image (window 0) is
        upsampled from its patch grid to out_size directly; windows to their crop, averaged, then to out_size."""
        B, _, h, w = images.shape
        if not self.window:
            return torch.cat([self._encode(chunk, out_size) for chunk in images.split(self.max_batch)])
        boxes = window_boxes(h, w, self.window, self.stride)
        crops = torch.stack([images[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in boxes], dim=1).flatten(0, 1)
        crop_size = crops.shape[-2:]
        sims = torch.cat([self._encode(chunk, crop_size) for chunk in crops.split(self.max_batch)])
        sims = sims.unflatten(0, (B, len(boxes)))  # (B, n, M, ch, cw)
        total = images.new_zeros(B, sims.shape[2], h, w)
        count = images.new_zeros(1, 1, h, w)
        for i, (y0, y1, x0, x1) in enumerate(boxes):
            total[:, :, y0:y1, x0:x1] += sims[:, i]
            count[:, :, y0:y1, x0:x1] += 1
        return F.interpolate(total / count, size=out_size, mode="bilinear", align_corners=False)

    def _encode(self, crops: Tensor, out_size: tuple[int, int]) -> Tensor:
        """crops [n,3,h,w] -> similarities [n, M, *out_size]. A side that is not a patch multiple is handled by
        `remainder`; a side shorter than one patch is resized up to it under floor."""
        h, w = crops.shape[-2:]
        p = self.dense.patch_size
        if (h % p or w % p) and self.remainder != "floor":
            return self._encode_padded(crops, out_size)
        crops = crops[..., : h - h % p if h >= p else h, : w - w % p if w >= p else w]
        if min(h, w) < p:
            crops = F.interpolate(crops, size=(max(p, crops.shape[-2]), max(p, crops.shape[-1])), mode="bilinear")
        return self._scores(crops, out_size)

    def _encode_padded(self, crops: Tensor, out_size: tuple[int, int]) -> Tensor:
        """Pads to the next patch multiple with the mean colour (zero after normalisation, as the official code pads
        the normalised image): centred with the padding cut from the scores, or bottom-right with the padded grid's
        scores resized to out_size."""
        h, w = crops.shape[-2:]
        p = self.dense.patch_size
        dh, dw = -h % p, -w % p
        top, left = (dh // 2, dw // 2) if self.remainder == "centre" else (0, 0)
        mean = torch.tensor(getattr(self.dense, "mean", (0.5, 0.5, 0.5)), device=crops.device).view(1, 3, 1, 1)
        padded = F.pad(crops - mean, (left, dw - left, top, dh - top)) + mean
        if self.remainder == "corner":
            return self._scores(padded, out_size)
        sims = self._scores(padded, (h + dh, w + dw))[..., top : top + h, left : left + w]
        return sims if (h, w) == tuple(out_size) else F.interpolate(sims, size=out_size, mode="bilinear")

    def _scores(self, crops: Tensor, out_size: tuple[int, int]) -> Tensor:
        features = self.dense(crops)  # (n, D, h/p, w/p)
        sims = torch.einsum("ndhw,md->nmhw", features, self.text_embeddings.to(features.dtype))
        return F.interpolate(sims, size=out_size, mode="bilinear", align_corners=False)


def rescaled_size(H: int, W: int, short_side: int, long_side: int = MAX_LONG_SIDE) -> tuple[int, int]:
    """(H', W') with the short side `short_side` and the long side at most `long_side`, aspect kept, each side
    int(x * scale + 0.5): mmcv's `rescale_size` for scale=(long_side, short_side)."""
    scale = min(short_side / min(H, W), long_side / max(H, W))
    return max(1, int(H * scale + 0.5)), max(1, int(W * scale + 0.5))


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

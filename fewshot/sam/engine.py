"""SAM as a promptable mask decoder over image embeddings computed once: `SamEngine`, on transformers' `SamModel`.

The pre- and post-processing are the official ones (segment_anything `SamPredictor`, equal to transformers'
`SamProcessor`): the longest side is resized to the model's input size S (bilinear with antialiasing on uint8 pixels,
sides rounded with int(x + 0.5)), ImageNet-normalised on [0, 255], zero-padded bottom / right to S x S; prompt
coordinates are scaled by the same factors; low-resolution mask logits are upsampled to S x S, cropped to the resized
image and resized to the original size (both bilinear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

MEAN = (123.675, 116.28, 103.53)  # official pixel_mean / pixel_std, on [0, 255]
STD = (58.395, 57.12, 57.375)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resized_size(original_size: tuple[int, int], side: int) -> tuple[int, int]:
    """(H, W) -> the size whose longest side is `side` (ResizeLongestSide.get_preprocess_shape); an image whose short
    side would round to 0 px is an error naming its size."""
    height, width = original_size
    if min(height, width) < 1:
        raise ValueError(f"an image of {height} x {width} px is empty: SAM needs at least 1 px on each side")
    scale = side * 1.0 / max(height, width)
    size = int(height * scale + 0.5), int(width * scale + 0.5)
    if min(size) < 1:
        short = min(height, width)
        need = next(n for n in range(short, max(height, width) + 1) if int(n * scale + 0.5) >= 1)
        raise ValueError(
            f"an image of {height} x {width} px is too thin for SAM at {side} px: its {short} px side becomes "
            f"{short * scale:.2f} px and rounds to 0; crop its long side or pad the short one to at least {need} px"
        )
    return size


def check_inside(coords: Tensor, original_size: tuple[int, int], what: str, used: Tensor | None = None) -> None:
    """Raises when a prompt coordinate (x, y) [..., 2] (where `used` [...] is true) lies outside an image of
    `original_size` (0 <= x <= W, 0 <= y <= H), naming the first such value and the size."""
    height, width = original_size
    x, y = coords[..., 0], coords[..., 1]
    outside = ~((x >= 0) & (x <= width) & (y >= 0) & (y <= height))  # NaN counts as outside
    if used is not None:
        outside &= used
    if outside.any():
        bad_x, bad_y = coords[outside][0].tolist()
        raise ValueError(
            f"{what} (x={bad_x:g}, y={bad_y:g}) lies outside the {height} x {width} image (x in [0, {width}], y in "
            f"[0, {height}]): give prompts in the pixels of the image they are for"
        )


class SamEngine(nn.Module):
    """A frozen SAM: `embed` images once, then `decode` / `predict` any number of prompts on the embeddings.

    Args:
        model: a transformers `SamModel` (weights.load_sam_model).
        identity: names the model and its weights; keys feature caches.
        points_per_batch: most prompts per decoder call (prompts are chunked along P).
        dtype: fp32 (the published numbers) or bf16 (the encoder and decoder run in bfloat16; outputs are float32).
            SAM runs in this dtype whatever autocast surrounds it (eval.amp sets the feature backbone's).
    """

    def __init__(self, model: nn.Module, identity: str, points_per_batch: int = 64, dtype: str = "fp32"):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"model.sam.dtype={dtype!r} is not valid; choose from {sorted(DTYPES)}")
        if points_per_batch < 1:
            raise ValueError(f"model.sam.points_per_batch={points_per_batch} must be at least 1")
        self.model = model.to(DTYPES[dtype]).eval().requires_grad_(False)
        self.identity = identity
        self.points_per_batch = points_per_batch
        self.dtype = DTYPES[dtype]
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    frozen = True

    def train(self, mode: bool = True) -> SamEngine:
        """SAM stays in eval mode whatever the caller asks."""
        return super().train(False)

    @property
    def image_size(self) -> int:
        """The side S of SAM's square input."""
        return int(self.model.config.vision_config.image_size)

    @property
    def mask_size(self) -> int:
        """The side of the low-resolution mask logits (4x the embedding grid)."""
        return 4 * int(self.model.config.prompt_encoder_config.image_embedding_size)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (or float in [0, 1], rounded to uint8) images [N, 3, H, W] -> normalised, padded [N, 3, S, S]."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"SAM images {tuple(images.shape)} must be [N, 3, H, W]")
        if images.dtype != torch.uint8:
            images = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
        size = resized_size(tuple(images.shape[-2:]), self.image_size)
        if size != tuple(images.shape[-2:]):
            images = TF.resize(images, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
        x = (images.float() - self.mean) / self.std
        return F.pad(x, (0, self.image_size - size[1], 0, self.image_size - size[0]))

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] -> image embeddings [N, C, e, e] (float32; C = 256, e = 64 for the official SAMs)."""
        pixels = self.preprocess(images).to(self.dtype)
        with torch.autocast(pixels.device.type, enabled=False):  # model.sam.dtype decides, not eval.amp
            return self.model.get_image_embeddings(pixels).float()

    def to_frame(self, coords: Tensor, original_size: tuple[int, int]) -> Tensor:
        """(x, y) pixel coordinates [..., 2] of an image of `original_size` -> SAM's input frame (apply_coords)."""
        height, width = original_size
        new_h, new_w = resized_size(original_size, self.image_size)
        scale = coords.new_tensor([new_w / width, new_h / height])
        return coords.float() * scale

    @torch.no_grad()
    def decode(
        self,
        embeddings: Tensor,
        original_size: tuple[int, int],
        points: Tensor | None = None,
        labels: Tensor | None = None,
        boxes: Tensor | None = None,
        mask_logits: Tensor | None = None,
        multimask: bool = True,
        attn_sim: Tensor | None = None,
        target: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Prompts -> low-resolution mask logits [N, P, M, l, l] and predicted IoU [N, P, M] (M = 3 or 1).

        Args:
            embeddings: [N, C, e, e] from `embed`.
            original_size: (H, W) of the images the prompts are given on.
            points: [N, P, K, 2] (x, y) in original pixels; P prompts of K points per image.
            labels: [N, P, K]: 1 foreground, 0 background, -1 not a point, -10 padding; None = all foreground.
            boxes: [N, P, 4] (x0, y0, x1, y1) in original pixels.
            mask_logits: [N, P, l, l] low-resolution logits, one mask prompt per prompt (as the official decoder).
            multimask: three masks per prompt (True) or the single-mask output.
            attn_sim: [N, 1, 1, e*e] PerSAM's target-guided attention (fewshot.sam.persam: its own semantics, not
                transformers' attention_similarity); target: [N, 1, C] PerSAM's target-semantic prompt.
        """
        N = embeddings.shape[0]
        P = next((t.shape[1] for t in (points, boxes, mask_logits) if t is not None), None)
        if P is None:
            raise ValueError("SamEngine.decode needs at least one prompt: points, boxes or mask_logits")
        if points is not None:
            if points.dim() != 4 or points.shape[:2] != (N, P) or points.shape[-1] != 2:
                raise ValueError(f"points {tuple(points.shape)} must be [N={N}, P={P}, K, 2] (x, y)")
            labels = torch.ones(points.shape[:-1], dtype=torch.long, device=points.device) if labels is None else labels
            if labels.shape != points.shape[:-1]:
                raise ValueError(f"labels {tuple(labels.shape)} must be {tuple(points.shape[:-1])} (one per point)")
            check_inside(points, original_size, "a point prompt", used=labels >= 0)  # not padding (-10) or -1
            points = self.to_frame(points, original_size)
        if boxes is not None:
            if boxes.shape != (N, P, 4):
                raise ValueError(f"boxes {tuple(boxes.shape)} must be [N={N}, P={P}, 4] (x0, y0, x1, y1)")
            check_inside(boxes.reshape(N, P, 2, 2), original_size, "a box corner")
            boxes = self.to_frame(boxes.reshape(N, P, 2, 2), original_size).reshape(N, P, 4)
        if mask_logits is not None and mask_logits.shape != (N, P, self.mask_size, self.mask_size):
            raise ValueError(
                f"mask_logits {tuple(mask_logits.shape)} must be [N={N}, P={P}, {self.mask_size}, {self.mask_size}]"
            )
        step = self.points_per_batch
        guidance = (attn_sim, target)
        chunks = [
            self._decode_chunk(embeddings, points, labels, boxes, mask_logits, multimask, slice(start, start + step),
                               guidance)
            for start in range(0, P, step)
        ]  # fmt: skip
        return torch.cat([c[0] for c in chunks], dim=1), torch.cat([c[1] for c in chunks], dim=1)

    def _decode_chunk(
        self,
        embeddings: Tensor,
        points: Tensor | None,
        labels: Tensor | None,
        boxes: Tensor | None,
        mask_logits: Tensor | None,
        multimask: bool,
        part: slice,
        guidance: tuple[Tensor | None, Tensor | None] = (None, None),
    ) -> tuple[Tensor, Tensor]:
        """One decoder call on the prompts `part` of every image. transformers adds one mask prompt per image before
        repeating it over the prompts, so prompts with their own mask prompt go one per batch entry."""
        dtype = self.dtype
        points = None if points is None else points[:, part].to(dtype)
        labels = None if labels is None else labels[:, part]
        boxes = None if boxes is None else boxes[:, part].to(dtype)
        masks = None if mask_logits is None else mask_logits[:, part].to(dtype)
        N, P = embeddings.shape[0], next(t.shape[1] for t in (points, boxes, masks) if t is not None)
        if masks is not None:  # (N*P, 1, ...): one prompt per batch entry
            masks = masks.reshape(N * P, 1, *masks.shape[-2:])
            embeddings = embeddings.repeat_interleave(P, dim=0)
            points = None if points is None else points.flatten(0, 1)[:, None]
            labels = None if labels is None else labels.flatten(0, 1)[:, None]
            boxes = None if boxes is None else boxes.flatten(0, 1)[:, None]
        if any(g is not None for g in guidance) and masks is not None:
            raise ValueError("PerSAM guidance (attn_sim, target) is not combined with mask prompts")
        with torch.autocast(embeddings.device.type, enabled=False):  # model.sam.dtype decides, not eval.amp
            if any(g is not None for g in guidance):
                from fewshot.sam.persam import guided_forward

                attn_sim, target = (None if g is None else g.to(dtype) for g in guidance)
                embeddings = embeddings.to(dtype)
                out = guided_forward(self.model, embeddings, points, labels, boxes, multimask, attn_sim, target)
            else:
                out = self.model(
                    image_embeddings=embeddings.to(dtype),
                    input_points=points,
                    input_labels=labels,
                    input_boxes=boxes,
                    input_masks=masks,
                    multimask_output=multimask,
                )
        low_res, iou = out.pred_masks.float(), out.iou_scores.float()
        return low_res.reshape(N, P, *low_res.shape[2:]), iou.reshape(N, P, -1)

    def postprocess(self, low_res: Tensor, original_size: tuple[int, int]) -> Tensor:
        """Low-resolution logits [..., l, l] -> logits [..., H, W] at `original_size` (Sam.postprocess_masks)."""
        lead = low_res.shape[:-2]
        x = low_res.reshape(-1, 1, *low_res.shape[-2:]).float()
        x = F.interpolate(x, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        height, width = resized_size(original_size, self.image_size)
        x = x[..., :height, :width]
        if (height, width) != tuple(original_size):  # a same-size bilinear resize is the identity: skip its pass
            x = F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)
        return x.reshape(*lead, *original_size)

    def predict(
        self,
        embeddings: Tensor,
        original_size: tuple[int, int],
        points: Tensor | None = None,
        labels: Tensor | None = None,
        boxes: Tensor | None = None,
        mask_logits: Tensor | None = None,
        multimask: bool = True,
        attn_sim: Tensor | None = None,
        target: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """`decode`, post-processed: mask logits [N, P, M, H, W] at `original_size` (> 0 is the mask) and predicted
        IoU [N, P, M]. The arguments are `decode`'s."""
        low_res, iou = self.decode(embeddings, original_size, points, labels, boxes, mask_logits, multimask, attn_sim,
                                   target)  # fmt: skip
        return self.postprocess(low_res, original_size), iou

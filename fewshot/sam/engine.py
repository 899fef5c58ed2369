"""SAM as a promptable mask decoder over image embeddings computed once: `SamEngine` on transformers' `SamModel`
(SAM 1), `Sam2Engine` on its `Sam2Model` (SAM 2.1), with one interface.

SAM 1's pre- and post-processing are the official ones (segment_anything `SamPredictor`, equal to transformers'
`SamProcessor`): the longest side is resized to the model's input size S (bilinear with antialiasing on uint8 pixels,
sides rounded with int(x + 0.5)), ImageNet-normalised on [0, 255], zero-padded bottom / right to S x S; prompt
coordinates are scaled by the same factors; low-resolution mask logits are upsampled to S x S, cropped to the resized
image and resized to the original size (both bilinear). SAM 2's are in `Sam2Engine`.

Embeddings are one tensor [N, C, e, e] (SAM 1) or the list of SAM 2's 3 maps [N, C_i, h_i, w_i], high resolution
first; `pick` selects images from either.
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
Embeddings = Tensor | list[Tensor]  # SAM 1: [N, C, e, e]; SAM 2: 3 maps [N, C_i, h_i, w_i], high resolution first


def _each(embeddings: Embeddings, fn) -> Embeddings:
    return fn(embeddings) if isinstance(embeddings, Tensor) else [fn(e) for e in embeddings]


def pick(embeddings: Embeddings, index: int | slice | Tensor | None) -> Embeddings:
    """The embeddings of the images `index`, indexed as a tensor's first dimension: an int drops the image dimension
    (one image's embeddings), a slice or index tensor keeps it, None adds one (one image's -> a batch of one)."""
    return _each(embeddings, lambda e: e[index])


def num_images(embeddings: Embeddings) -> int:
    """N of embeddings [N, ...] (SAM 1) or of SAM 2's maps."""
    return (embeddings if isinstance(embeddings, Tensor) else embeddings[0]).shape[0]


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
        model: a transformers `SamModel` (weights.load_sam_model; `Sam2Engine` takes a `Sam2Model`).
        identity: names the model and its weights; keys feature caches.
        points_per_batch: most prompts per decoder call (prompts are chunked along P).
        dtype: fp32 (the published numbers) or bf16 (the encoder and decoder run in bfloat16; outputs are float32).
            SAM runs in this dtype whatever autocast surrounds it (eval.amp sets the feature backbone's).
    """

    family = "sam"  # fewshot.sam.weights.FAMILIES
    pixel_mean, pixel_std = MEAN, STD

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
        self.register_buffer("mean", torch.tensor(self.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.pixel_std).view(1, 3, 1, 1), persistent=False)

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

    @property
    def channels(self) -> list[int]:
        """The channels of each embedding map (SAM 1: one)."""
        return [int(self.model.config.vision_config.output_channels)]

    def frame_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) an image of `original_size` takes in SAM's S x S input frame (the longest side S)."""
        return resized_size(original_size, self.image_size)

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
        new_h, new_w = self.frame_size(original_size)
        scale = coords.new_tensor([new_w / width, new_h / height])
        return coords.float() * scale

    @torch.no_grad()
    def decode(
        self,
        embeddings: Embeddings,
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
            embeddings: from `embed`: [N, C, e, e] (SAM 1) or SAM 2's 3 maps.
            original_size: (H, W) of the images the prompts are given on.
            points: [N, P, K, 2] (x, y) in original pixels; P prompts of K points per image.
            labels: [N, P, K]: 1 foreground, 0 background, -1 not a point, -10 padding; None = all foreground.
            boxes: [N, P, 4] (x0, y0, x1, y1) in original pixels.
            mask_logits: [N, P, l, l] low-resolution logits, one mask prompt per prompt (as the official decoder).
            multimask: three masks per prompt (True) or the single-mask output.
            attn_sim: [N, 1, 1, e*e] PerSAM's target-guided attention (fewshot.sam.persam: its own semantics, not
                transformers' attention_similarity); target: [N, 1, C] PerSAM's target-semantic prompt.
        """
        N = num_images(embeddings)
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
        embeddings: Embeddings,
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
        N, P = num_images(embeddings), next(t.shape[1] for t in (points, boxes, masks) if t is not None)
        if masks is not None:  # (N*P, 1, ...): one prompt per batch entry
            masks = masks.reshape(N * P, 1, *masks.shape[-2:])
            embeddings = _each(embeddings, lambda e: e.repeat_interleave(P, dim=0))
            points = None if points is None else points.flatten(0, 1)[:, None]
            labels = None if labels is None else labels.flatten(0, 1)[:, None]
            boxes = None if boxes is None else boxes.flatten(0, 1)[:, None]
        if any(g is not None for g in guidance) and masks is not None:
            raise ValueError("PerSAM guidance (attn_sim, target) is not combined with mask prompts")
        with torch.autocast(self.mean.device.type, enabled=False):  # model.sam.dtype decides, not eval.amp
            if any(g is not None for g in guidance):
                if self.family != "sam":
                    raise ValueError(
                        "PerSAM's target-guided decoder (attn_sim, target) is defined on SAM 1's mask decoder; this "
                        f"engine is {self.family} ({self.identity})"
                    )
                from fewshot.sam.persam import guided_forward

                attn_sim, target = (None if g is None else g.to(dtype) for g in guidance)
                embeddings = embeddings.to(dtype)
                out = guided_forward(self.model, embeddings, points, labels, boxes, multimask, attn_sim, target)
                low_res, iou = out.pred_masks, out.iou_scores
            else:
                low_res, iou = self._forward(_each(embeddings, lambda e: e.to(dtype)), points, labels, boxes, masks,
                                             multimask)  # fmt: skip
        low_res, iou = low_res.float(), iou.float()
        return low_res.reshape(N, P, *low_res.shape[2:]), iou.reshape(N, P, -1)

    def _forward(
        self, embeddings: Embeddings, points: Tensor | None, labels: Tensor | None, boxes: Tensor | None,
        masks: Tensor | None, multimask: bool,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """transformers' forward on embeddings and prompts in SAM's frame -> (low-res logits, IoU)."""
        out = self.model(image_embeddings=embeddings, input_points=points, input_labels=labels, input_boxes=boxes,
                         input_masks=masks, multimask_output=multimask)  # fmt: skip
        return out.pred_masks, out.iou_scores

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
        embeddings: Embeddings,
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


class Sam2Engine(SamEngine):
    """A frozen SAM 2.1 (transformers' `Sam2Model`) with SamEngine's interface, and SAM 2's own processing, as the
    official `SAM2ImagePredictor` (sam2/sam2_image_predictor.py, sam2/utils/transforms.py) and transformers'
    `Sam2Processor` do it:
    - images: to float on [0, 1], resized to the S x S square without keeping the aspect or padding (bilinear with
      antialiasing, torchvision's Resize), ImageNet-normalised on [0, 1]. The official predictor resizes the float
      image, Sam2Processor the uint8 one (a rounding apart, up to 1 / 255 per pixel before normalising): the official
      order is kept;
    - prompts: (x, y) -> (x * S / W, y * S / H);
    - `embed` -> the 3 maps of `Sam2Model.get_image_embeddings` (the two high-resolution ones already through the
      decoder's conv_s0 / conv_s1, the no-memory embedding added to the last), passed back whole as
      `image_embeddings`;
    - predicted IoU is SAM 2's: through a sigmoid (in [0, 1]; SAM 1's is a raw regression); single-mask output falls
      back to the best multimask output when the single mask is unstable (`dynamic_multimask_via_stability`, as
      the official `build_sam2` sets it);
    - low-resolution logits are resized straight to the original size (bilinear). `decode` returns them as
      `Sam2Model` does (the official predictor clamps the low-res logits it returns to [-32, 32]).
    A mask prompt counts one per prompt, as with SAM 1; alone, it is decoded with no sparse token, as officially.
    """

    family = "sam2"
    pixel_mean, pixel_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SAM2Transforms, on [0, 1]

    @property
    def image_size(self) -> int:
        return int(self.model.config.prompt_encoder_config.image_size)

    @property
    def mask_size(self) -> int:
        prompt = self.model.config.prompt_encoder_config
        return 4 * int(prompt.image_size) // int(prompt.patch_size)

    @property
    def channels(self) -> list[int]:
        """The channels of the 3 maps: conv_s0's, conv_s1's and the FPN width."""
        width = int(self.model.config.vision_config.fpn_hidden_size)
        return [width // 8, width // 4, width]

    def frame_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """Every image fills SAM 2's S x S frame."""
        return self.image_size, self.image_size

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (or float in [0, 1], rounded to uint8) images [N, 3, H, W] -> normalised [N, 3, S, S]."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"SAM 2 images {tuple(images.shape)} must be [N, 3, H, W]")
        if images.dtype != torch.uint8:
            images = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
        x = images.float() / 255
        side = self.image_size
        if tuple(x.shape[-2:]) != (side, side):
            x = TF.resize(x, [side, side], interpolation=InterpolationMode.BILINEAR, antialias=True)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def embed(self, images: Tensor) -> list[Tensor]:
        """images [N, 3, H, W] -> SAM 2's 3 maps (float32): [N, C/8, S/4, S/4], [N, C/4, S/8, S/8], [N, C, S/16,
        S/16] (C = 256, S = 1024 for the official sizes)."""
        pixels = self.preprocess(images).to(self.dtype)
        with torch.autocast(pixels.device.type, enabled=False):  # model.sam.dtype decides, not eval.amp
            return [e.float() for e in self.model.get_image_embeddings(pixels)]

    def _forward(
        self, embeddings: Embeddings, points: Tensor | None, labels: Tensor | None, boxes: Tensor | None,
        masks: Tensor | None, multimask: bool,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Sam2Model's forward; a mask prompt alone is decoded with no sparse token, as the official predictor does
        (Sam2Model.forward would add a not-a-point token, which changes every attention: about 0.15 off in logits)."""
        if points is not None or boxes is not None:
            return super()._forward(embeddings, points, labels, boxes, masks, multimask)
        model, count = self.model, masks.shape[0]
        sparse = masks.new_zeros(count, 1, 0, model.config.prompt_encoder_config.hidden_size)
        positional = model.get_image_wide_positional_embeddings().repeat(count, 1, 1, 1)
        low_res, iou, _, _ = model.mask_decoder(
            image_embeddings=embeddings[-1], image_positional_embeddings=positional, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=model.prompt_encoder.mask_embed(masks), multimask_output=multimask,
            high_resolution_features=embeddings[:-1],
        )  # fmt: skip
        return low_res, iou

    def postprocess(self, low_res: Tensor, original_size: tuple[int, int]) -> Tensor:
        """Low-resolution logits [..., l, l] -> logits [..., H, W] at `original_size` (SAM2Transforms.postprocess_masks,
        Sam2Processor.post_process_masks)."""
        lead = low_res.shape[:-2]
        x = low_res.reshape(-1, 1, *low_res.shape[-2:]).float()
        x = F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)
        return x.reshape(*lead, *original_size)

"""SAM-based few-shot methods as models of their own, which the evaluation treats like any FewShotSegmenter.

Their heads do not fit the feature-head contract of fewshot.heads (features in, logits out): they prompt SAM, so they
need SAM's image embeddings and the query's pixel size. They enter the codebase as follows:
- `SamPairBackbone` encodes an image once for both encoders: the feature backbone (DINOv2) at its own square size
  (`model.gfsam.dino_size`, bilinear resize) and SAM at its own (`model.sam.image_size`). Its `forward` returns the
  backbone's maps followed by SAM's (one embedding for SAM 1, 3 maps for SAM 2), and its `identity` names both, so the
  feature cache (fewshot.cache.Encoder, memory or disk) holds SAM embeddings like any backbone feature: one encode per
  unique image. `split` parts a (cached) list into the backbone's maps and SAM's embeddings.
- `SamSegmenter(FewShotSegmenter)` passes the SAM engine and the query size to its head (`head_logits`); shot
  fusion, `forward`, `encode` and `protocol_fields` are FewShotSegmenter's.
- `fewshot.sam.SAM_HEADS` names them; `fewshot.heads.MODEL_HEADS` (the `model.head` registry) holds both kinds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.backbones import Backbone, build_backbone
from fewshot.config import ModelConfig
from fewshot.model import FewShotSegmenter
from fewshot.sam import Embeddings, SamEngine, pick
from fewshot.sam.gfsam import gfsam_mask, grid_to_pixels
from fewshot.sam.persam import persam, persam_f
from fewshot.sam.refine import RefinedSegmenter, refiner_from_config


class SamPairBackbone(nn.Module):
    """A frozen feature backbone at `size` x `size` (bilinear, `antialias` or not; 0: the input size; None: SAM only)
    and a SAM engine, in one encode pass.

    forward(images [N, 3, H, W] float in [0, 1]) -> backbone maps + SAM's: [embedding [N, C, e, e]] (SAM 1) or its
    3 maps (SAM 2); `split` parts such a list (or its cached, per-shot [B, S, ...] form) again.
    """

    def __init__(self, main: Backbone | None, sam: SamEngine, size: int, antialias: bool = False):
        super().__init__()
        self.main, self.sam, self.size, self.antialias = main, sam, size, antialias
        if main is None:
            self.identity = sam.identity
        else:
            resize = f"@{size}{'aa' if antialias else ''}" if size else ""
            self.identity = f"{main.identity}{resize}+{sam.identity}"

    @property
    def channels(self) -> list[int]:
        return [*(self.main.channels if self.main is not None else []), *self.sam.channels]

    def split(self, feats: list[Tensor]) -> tuple[list[Tensor], Embeddings]:
        """forward's list -> (the backbone's maps, SAM's embeddings: one tensor for SAM 1, the list of 3 maps for SAM
        2), whatever the leading dimensions."""
        count = len(self.sam.channels)
        if len(feats) != len(self.channels):
            raise ValueError(f"{len(feats)} feature maps for a SAM pair backbone of {len(self.channels)}")
        sam = feats[-count:]
        return list(feats[:-count]), sam[0] if self.sam.family == "sam" else list(sam)

    @property
    def frozen(self) -> bool:
        """SAM is always frozen; the feature backbone as configured (model.backbone.frozen)."""
        return getattr(self.main, "frozen", True)

    def train(self, mode: bool = True) -> SamPairBackbone:
        super().train(False)
        if self.main is not None:
            self.main.train(mode)  # a frozen backbone stays in eval mode by itself
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        feats: list[Tensor] = []
        if self.main is not None:
            resized = images
            if self.size:  # 0: the backbone takes the episode images as they are
                resized = F.interpolate(
                    images, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=self.antialias
                )
            feats = list(self.main(resized))
        embeddings = self.sam.embed(images)
        return [*feats, *([embeddings] if isinstance(embeddings, Tensor) else embeddings)]


class GfsamHead(nn.Module):
    """GF-SAM (fewshot.sam.gfsam) on the backbone's last map and the query's SAM embeddings: binary logits [B, 2, H,
    W]. SAM 1 or SAM 2: the prompts are the same, the engine decodes them."""

    def __init__(self, max_points: int = 128, token_norm: bool = True):
        super().__init__()
        self.max_points, self.token_norm = max_points, token_norm

    @classmethod
    def from_config(cls, model_cfg: ModelConfig) -> GfsamHead:
        return cls(model_cfg.gfsam.max_points, model_cfg.gfsam.token_norm)

    def forward(
        self,
        query_feats: list[Tensor],
        support_feats: list[Tensor],
        query_sam: Embeddings,
        support_sam: Embeddings,
        support_masks: Tensor,
        sam: SamEngine,
        out_size: tuple[int, int],
    ) -> Tensor:
        """Backbone maps of the queries [B, C, h, w] and supports [B, S, C, h, w], SAM embeddings of both
        (SamPairBackbone.split), support masks [B, S, H, W] -> logits [B, 2, H, W]."""
        query, supports, embeddings = query_feats[-1].float(), support_feats[-1].float(), query_sam
        grid = tuple(query.shape[-2:])
        out = []
        for b in range(query.shape[0]):

            def segment(points: Tensor, b: int = b) -> Tensor:
                frame = sam.frame_size(out_size)
                pixels = grid_to_pixels(points, grid, sam.image_size, out_size, frame)[None, :, None]  # (1, n, 1, 2)
                logits, _ = sam.predict(pick(embeddings, slice(b, b + 1)), out_size, points=pixels, multimask=False)
                return logits[0, :, 0] > 0  # (n, H, W)

            fg = (support_masks[b] == 1).float()
            out.append(gfsam_mask(query[b], supports[b], fg, segment, out_size, self.max_points, self.token_norm))
        mask = torch.stack(out).float()  # (B, H, W)
        return torch.stack([torch.zeros_like(mask), 2 * mask - 1], dim=1)


class PersamHead(nn.Module):
    """PerSAM (`fit=False`) or PerSAM-F (fewshot.sam.persam) on SAM embeddings only: logits [B, 2, H, W] with channel
    1 the SAM logit of the chosen mask. SAM 1 only (PerSAM's guided decoder is SAM 1's; fewshot.config refuses a SAM
    2 name)."""

    uses_backbone = False

    def __init__(self, fit: bool = False, iters: int = 1000, lr: float = 1e-3, eps: float = 1e-4):
        super().__init__()
        self.fit, self.iters, self.lr, self.eps = fit, iters, lr, eps

    @classmethod
    def from_config(cls, model_cfg: ModelConfig) -> PersamHead:
        f = model_cfg.persam_f
        return cls(model_cfg.head == "persam_f", f.iters, f.lr, f.eps)

    def forward(
        self,
        query_feats: list[Tensor],
        support_feats: list[Tensor],
        query_sam: Tensor,
        support_sam: Tensor,
        support_masks: Tensor,
        sam: SamEngine,
        out_size: tuple[int, int],
    ) -> Tensor:
        """As GfsamHead's (query_feats, support_feats: none, SAM is the only encoder)."""
        if sam.family != "sam":
            raise ValueError(f"PerSAM is a SAM 1 method; the engine is {sam.family} ({sam.identity})")
        out = []
        for b in range(query_sam.shape[0]):
            query, supports, masks = query_sam[b], support_sam[b], support_masks[b] == 1
            if self.fit:
                out.append(persam_f(sam, query, supports, masks, out_size, self.iters, self.lr, self.eps))
            else:
                out.append(persam(sam, query, supports, masks, out_size))
        logit = torch.stack(out)  # (B, H, W)
        return torch.stack([torch.zeros_like(logit), logit], dim=1)


HEAD_CLASSES = {"gfsam": GfsamHead, "persam": PersamHead, "persam_f": PersamHead}  # fewshot.sam.SAM_HEADS


class SamSegmenter(FewShotSegmenter):
    """A FewShotSegmenter whose head prompts SAM: `backbone` is a SamPairBackbone; the head gets the engine and the
    query size."""

    def __init__(self, backbone: SamPairBackbone, head: nn.Module, shot_fusion: str, head_name: str, record: dict):
        super().__init__(backbone, head, shot_fusion=shot_fusion, head_name=head_name)
        self.record = record

    def protocol_fields(self) -> dict[str, Any]:
        """Both encoders, their weights and input sizes (results' protocol)."""
        return dict(self.record)

    def head_logits(
        self,
        query_feats: list[Tensor],
        support_feats: list[Tensor],
        support_masks: Tensor,
        class_ids: Tensor | None,
        out_size: tuple[int, int],
    ) -> Tensor:
        query_maps, query_sam = self.backbone.split(query_feats)
        support_maps, support_sam = self.backbone.split(support_feats)
        return self.head(query_maps, support_maps, query_sam, support_sam, support_masks, self.backbone.sam, out_size)


def _engine(model_cfg: ModelConfig) -> tuple[SamEngine, dict[str, Any]]:
    """The SAM of `model_cfg.sam` and its protocol record."""
    sam, _, record = refiner_from_config(model_cfg, "model")
    return sam, record["sam"]


def build_sam_model(model_cfg: ModelConfig, device: torch.device | str | None = None) -> SamSegmenter:
    """The SAM-based model `model_cfg.head` names (SAM_HEADS), with `model_cfg.sam` and `model_cfg.backbone`."""
    if model_cfg.refine != "none":
        raise ValueError(
            f"model.refine={model_cfg.refine} refines a feature head's coarse mask; model.head={model_cfg.head} "
            "already predicts with SAM: set model.refine=none"
        )
    sam, sam_record = _engine(model_cfg)
    head = HEAD_CLASSES[model_cfg.head].from_config(model_cfg)
    record: dict[str, Any] = {"sam": sam_record}
    if getattr(head, "uses_backbone", True):
        main, size = build_backbone(model_cfg.backbone), model_cfg.gfsam.dino_size
        g = model_cfg.gfsam
        antialias = g.dino_resize == "antialias"
        record["backbone_image_size"] = size
        record["gfsam"] = {"max_points": g.max_points, "token_norm": g.token_norm, "dino_resize": g.dino_resize}
    else:  # SAM is the only encoder
        main, size, antialias = None, 0, False
        record.update(backbone="none", pretrained=sam_record["pretrained"])
        record["kshot"] = "mean of per-shot targets (not official: 1-shot)"
        if model_cfg.head == "persam_f":
            record["persam_f"] = {"iters": model_cfg.persam_f.iters, "lr": model_cfg.persam_f.lr}
    pair = SamPairBackbone(main, sam, size, antialias)
    model = SamSegmenter(pair, head, model_cfg.shot_fusion, model_cfg.head, record)
    return model.to(device)


def build_refined_model(
    model_cfg: ModelConfig,
    class_names: dict[int, str] | None = None,
    device: torch.device | str | None = None,
    state: dict[str, Tensor] | None = None,
) -> nn.Module:
    """A feature head (fewshot.heads.HEADS) on `model_cfg.backbone` whose masks SAM refines (model.refine=sam)."""
    from fewshot.heads import build_head
    from fewshot.text import StoredText

    sam, refine, record = refiner_from_config(model_cfg, "model")
    main = build_backbone(model_cfg.backbone).to(device)
    text = StoredText.from_state(state, "head.") or (main if hasattr(main, "encode_text") else None)
    head = build_head(model_cfg, main.channels, class_names, text)
    pair = SamPairBackbone(main, sam, 0)
    return RefinedSegmenter(pair, head, model_cfg.shot_fusion, model_cfg.head, refine, record).to(device)

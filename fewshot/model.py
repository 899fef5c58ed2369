"""The few-shot segmenter: a frozen backbone, a head, and the shot fusion between them.

`forward(query_image, support_images, support_masks)` encodes query and supports in one backbone pass and hands the
features to `forward_features`, which a feature cache can call directly. Shot fusion (`model.shot_fusion`):
- "model": the head sees all K supports at once.
- "vote" (HSNet): K 1-shot passes; a pixel is foreground where its vote count >= 0.5 x the episode's maximum vote
  (maximum clamped to >= 1). The result is returned as logits [0, votes - 0.5 max + 0.25], whose argmax is exactly that
  mask (vote counts are integers, so the 0.25 margin turns the >= into a strict >). These logits carry no gradient.
  With one support both modes are the same plain pass.
"""

from __future__ import annotations

import contextlib
from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.backbones import Backbone, build_backbone
from fewshot.config import ModelConfig, ShotFusion
from fewshot.heads import build_head
from fewshot.metrics import predict_mask
from fewshot.sam import SAM_HEADS
from fewshot.text import StoredText

SHOT_FUSIONS = get_args(ShotFusion)


def _as_float(images: Tensor) -> Tensor:
    """uint8 [..., 3, H, W] -> float in [0, 1]; floating images are assumed to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.float() / 255
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    return images


class FewShotSegmenter(nn.Module):
    """Frozen backbone + head; `identity` ("<backbone identity>|<head name>") goes into results' protocol."""

    def __init__(self, backbone: Backbone, head: nn.Module, shot_fusion: str = "model", head_name: str = "head"):
        super().__init__()
        if shot_fusion not in SHOT_FUSIONS:
            raise ValueError(f"model.shot_fusion={shot_fusion!r} is not valid; choose from {list(SHOT_FUSIONS)}")
        self.backbone = backbone
        self.head = head
        self.shot_fusion = shot_fusion
        self.identity = f"{backbone.identity}|{head_name}"
        if self.frozen:
            backbone.requires_grad_(False)

    def protocol_fields(self) -> dict[str, Any]:
        """What results' protocol records beyond `cfg.model` (fewshot.provenance): a head that ignores the supports
        (the text head without model.text.use_supports) scores zero-shot, so its numbers go in the 0-shot column."""
        return {} if getattr(self.head, "use_supports", True) else {"shots": 0}

    @property
    def frozen(self) -> bool:
        return getattr(self.backbone, "frozen", True)

    def encode(self, images: Tensor) -> list[Tensor]:
        """images [N, 3, H, W] uint8 or float in [0, 1] -> per layer [N, C_l, h_l, w_l].

        A frozen backbone runs under `torch.no_grad`, or `torch.inference_mode` when the model is in eval mode and
        gradients are off (inference tensors cannot enter autograd later: clone them before training on them).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images {tuple(images.shape)} must be [N, 3, H, W]")
        images = _as_float(images)
        if not self.frozen:
            context = contextlib.nullcontext()
        elif not self.training and not torch.is_grad_enabled():
            context = torch.inference_mode()
        else:
            context = torch.no_grad()
        with context:
            return self.backbone(images)

    def forward(
        self, query_image: Tensor, support_images: Tensor, support_masks: Tensor, class_ids: Tensor | None = None
    ) -> Tensor:
        """Logits [B, 2, H, W] at the query size.

        Args:
            query_image: [B, 3, H, W] uint8 or float in [0, 1].
            support_images: [B, S, 3, Hs, Ws].
            support_masks: [B, S, Hs, Ws] in {0, 1, 255}.
            class_ids: [B] or None (used by text-conditioned heads).
        """
        if query_image.dim() != 4 or support_images.dim() != 5 or support_images.shape[0] != query_image.shape[0]:
            raise ValueError(
                f"query_image {tuple(query_image.shape)} and support_images {tuple(support_images.shape)} must be "
                "[B, 3, H, W] and [B, S, 3, Hs, Ws] with the same B"
            )
        if support_masks.shape != (*support_images.shape[:2], *support_images.shape[-2:]):
            raise ValueError(
                f"support_masks {tuple(support_masks.shape)} do not match support_images "
                f"{tuple(support_images.shape)}: expected [B, S, Hs, Ws] with the images' B, S, Hs, Ws"
            )
        B, S = support_images.shape[:2]
        query, supports = _as_float(query_image), _as_float(support_images.flatten(0, 1))  # (B*S, 3, Hs, Ws)
        if query.shape[-2:] == supports.shape[-2:] and query.dtype == supports.dtype:
            feats = self.encode(torch.cat([query, supports]))  # one backbone pass for query and supports
            query_feats = [f[:B] for f in feats]
            support_feats = [f[B:].unflatten(0, (B, S)) for f in feats]
        else:
            query_feats = self.encode(query)
            support_feats = [f.unflatten(0, (B, S)) for f in self.encode(supports)]
        return self.forward_features(query_feats, support_feats, support_masks, class_ids, query_image.shape[-2:])

    def forward_features(
        self,
        query_feats: list[Tensor],
        support_feats: list[Tensor],
        support_masks: Tensor,
        class_ids: Tensor | None,
        out_size: tuple[int, int],
    ) -> Tensor:
        """Everything after the backbone: head and shot fusion -> logits [B, 2, *out_size].

        Args:
            query_feats: per layer [B, C_l, h_l, w_l].
            support_feats: per layer [B, S, C_l, h_l, w_l].
            support_masks: [B, S, Hs, Ws] in {0, 1, 255}.
            class_ids: [B] or None.
            out_size: (H, W) of the query image.
        """
        out_size = tuple(out_size)
        B, S = support_masks.shape[:2]
        if self.shot_fusion == "model" or S == 1:
            return self.head_logits(query_feats, support_feats, support_masks, class_ids, out_size)
        queries = [f.repeat_interleave(S, dim=0) for f in query_feats]  # (B*S, C, h, w): query once per shot
        supports = [f.flatten(0, 1)[:, None] for f in support_feats]  # (B*S, 1, C, h, w)
        ids = class_ids.repeat_interleave(S) if class_ids is not None else None
        logits = self.head_logits(queries, supports, support_masks.flatten(0, 1)[:, None], ids, out_size)
        votes = predict_mask(logits).view(B, S, *out_size).sum(dim=1).float()  # (B, H, W)
        max_vote = votes.flatten(1).amax(dim=1).clamp_min(1)[:, None, None]  # (B, 1, 1)
        fg = votes - 0.5 * max_vote + 0.25
        return torch.stack([torch.zeros_like(fg), fg], dim=1).detach()

    def head_logits(
        self,
        query_feats: list[Tensor],
        support_feats: list[Tensor],
        support_masks: Tensor,
        class_ids: Tensor | None,
        out_size: tuple[int, int],
    ) -> Tensor:
        """The head's logits at `out_size` [B, 2, H, W] (bilinear from the head's resolution); a model whose head
        needs more than the features (fewshot.sam.model.SamSegmenter) overrides this."""
        logits = self.head(query_feats, support_feats, support_masks, class_ids)
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)

    def auxiliary_loss(
        self, query_feats: list[Tensor], support_feats: list[Tensor], support_masks: Tensor, logits: Tensor
    ) -> Tensor:
        """The head's weighted auxiliary loss (e.g. PANet alignment), 0 for a head without one; logits [B, 2, H, W]
        from `forward`."""
        own = getattr(self.head, "auxiliary_loss", None)
        if own is None:
            return logits.new_zeros((), dtype=torch.float32)
        return own(query_feats, support_feats, support_masks, logits)


def build_model(
    model_cfg: ModelConfig,
    class_names: dict[int, str] | None = None,
    device: torch.device | str | None = None,
    state: dict[str, Tensor] | None = None,
) -> FewShotSegmenter:
    """Backbone from `model_cfg.backbone`, head from `model_cfg.head`, shot fusion from `model_cfg.shot_fusion`.

    Args:
        class_names: {class id: name} of the dataset, for text-conditioned heads.
        device: where the model is built; a text head's class prompts are encoded there, by the backbone's own text
            tower (None: the CPU).
        state: the checkpoint weights the model is about to load (`checkpoint.read_weights`): class embeddings it
            holds are used as they are, so no prompt is encoded. Loading the weights stays with the caller.
    """
    if model_cfg.head in SAM_HEADS:  # a model class of its own: the head prompts SAM
        from fewshot.sam.model import build_sam_model

        return build_sam_model(model_cfg, device)
    if model_cfg.refine == "sam":  # the head's masks refined by SAM (fewshot.sam.refine)
        from fewshot.sam.model import build_refined_model

        return build_refined_model(model_cfg, class_names, device, state)
    backbone = build_backbone(model_cfg.backbone).to(device)
    text = StoredText.from_state(state, "head.") or (backbone if hasattr(backbone, "encode_text") else None)
    head = build_head(model_cfg, backbone.channels, class_names, text)
    model = FewShotSegmenter(backbone, head, shot_fusion=model_cfg.shot_fusion, head_name=model_cfg.head)
    return model.to(device)

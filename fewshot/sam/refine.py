"""`model.refine=sam`: SAM refines any feature head's coarse mask at test time (a project-defined, training-free step;
no official method is reproduced). Per query, from the head's foreground probability p at the query size:

1. no pixel with p > 0.5: the head's output stands;
2. prompts: a positive point at argmax p, a negative one at argmin p, and the box of the largest 8-connected
   component of p > 0.5;
3. SAM, multimask; the mask chosen by `select`: its predicted IoU (iou_pred) or its IoU with p > 0.5 (agreement);
4. with `cascade`, one more step as PerSAM's: the same points, the chosen mask's box and its low-res logits as the
   mask prompt;
5. the SAM mask replaces the head's only when its IoU with p > 0.5 is at least `accept_iou`.

In training the head's logits pass unrefined (SAM's masks carry no gradient), so a head trains as without refinement
and a checkpoint trained without it loads as it is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.model import FewShotSegmenter
from fewshot.sam.engine import Embeddings, pick


def components(mask: Tensor) -> Tensor:
    """8-connected component labels of a boolean mask [H, W] (0 = background; a component's label is its largest
    flat index + 1), by max-label propagation."""
    H, W = mask.shape
    labels = torch.where(mask, torch.arange(1, H * W + 1, device=mask.device).view(H, W), 0).float()[None, None]
    while True:
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * mask
        if torch.equal(grown, labels):
            return labels[0, 0].long()
        labels = grown


def largest_component_box(mask: Tensor) -> Tensor:
    """(x0, y0, x1, y1) of the largest 8-connected component of a non-empty boolean mask [H, W] (ties: the first
    label found by torch.unique's order)."""
    labels = components(mask)
    values, counts = torch.unique(labels[labels > 0], return_counts=True)
    ys, xs = torch.nonzero(labels == values[counts.argmax()], as_tuple=True)
    return torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boolean masks [..., H, W] against [H, W] -> [...]."""
    inter = (a & b).flatten(-2).sum(-1).float()
    union = (a | b).flatten(-2).sum(-1).float()
    return inter / union.clamp_min(1)


def refine_query(
    sam, embedding: Embeddings, logits: Tensor, accept_iou: float = 0.5, select: str = "iou_pred", cascade: bool = True
) -> Tensor:
    """One query's logits [2, H, W] refined by SAM (see the module docstring) -> logits [2, H, W].

    `sam` has `decode(embeddings, size, points, labels, boxes, mask_logits, multimask)` and `postprocess(low_res,
    size)` (a fewshot.sam.SamEngine); `embedding` is the query's SAM embedding (fewshot.sam.pick(embeddings, b)):
    [C, e, e] for SAM 1, the list of 3 maps for SAM 2."""
    size = tuple(logits.shape[-2:])
    prob = logits.float().softmax(dim=0)[1]
    head = prob > 0.5
    if not head.any():
        return logits
    width = size[1]
    flat = torch.stack([prob.flatten().argmax(), prob.flatten().argmin()])
    points = torch.stack([flat % width, flat // width], dim=1).float()[None, None]  # (1, 1, 2, 2) (x, y)
    labels = torch.tensor([[[1, 0]]], device=logits.device)
    box, mask_prompt = largest_component_box(head), None
    for _ in range(2 if cascade else 1):
        low, iou = sam.decode(pick(embedding, None), size, points, labels, box[None, None], mask_prompt, multimask=True)
        high = sam.postprocess(low[0, 0], size)  # (3, H, W)
        score = iou[0, 0] if select == "iou_pred" else mask_iou(high > 0, head)
        best = int(score.argmax())
        chosen = high[best]
        if not (chosen > 0).any():
            break
        ys, xs = torch.nonzero(chosen > 0, as_tuple=True)
        box = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()
        mask_prompt = low[:, :, best]  # (1, 1, l, l)
    if mask_iou(chosen > 0, head) < accept_iou:
        return logits
    return torch.stack([torch.zeros_like(chosen), chosen]).to(logits.dtype)


class RefinedSegmenter(FewShotSegmenter):
    """A FewShotSegmenter whose backbone (fewshot.sam.model.SamPairBackbone) also yields SAM's embeddings, last
    (`split` parts them off); the head sees the other features, and its logits are refined by SAM in eval mode."""

    def __init__(self, backbone, head, shot_fusion: str, head_name: str, refine: dict[str, Any], record: dict):
        super().__init__(backbone, head, shot_fusion=shot_fusion, head_name=head_name)
        self.identity = f"{self.identity}+refine:sam"
        self.refine, self.record = refine, record

    def protocol_fields(self) -> dict[str, Any]:
        return {**super().protocol_fields(), **self.record}

    def forward_features(self, query_feats, support_feats, support_masks, class_ids, out_size) -> Tensor:
        (query_maps, embeddings), (support_maps, _) = map(self.backbone.split, (query_feats, support_feats))
        logits = super().forward_features(query_maps, support_maps, support_masks, class_ids, out_size)
        if self.training:
            return logits
        sam, refine = self.backbone.sam, self.refine
        return torch.stack([refine_query(sam, pick(embeddings, b), logits[b], **refine) for b in range(len(logits))])

    def auxiliary_loss(self, query_feats, support_feats, support_masks, logits) -> Tensor:
        query_maps, support_maps = self.backbone.split(query_feats)[0], self.backbone.split(support_feats)[0]
        return super().auxiliary_loss(query_maps, support_maps, support_masks, logits)


def refine_labels(sam, embedding: Embeddings, scores: Tensor, **refine: Any) -> Tensor:
    """Zero-shot scores [1 + N, H, W] (channel 0 background) -> labels [H, W] with each class's mask refined by SAM.

    Each class present in the argmax is refined as its own binary problem (its score against the best other
    channel, `refine_query`); a pixel takes the class of highest score among the refined masks covering it, and
    background where none does. `embedding` is the image's SAM embedding, as `refine_query`'s."""
    labels = scores.argmax(0)
    best = torch.full(labels.shape, float("-inf"), device=scores.device)
    out = torch.zeros_like(labels)
    for c in labels.unique().tolist():
        if c == 0:
            continue
        others = torch.cat([scores[:c], scores[c + 1 :]]).amax(0)
        binary = torch.stack([others, scores[c]])
        mask = refine_query(sam, embedding, binary, **refine).argmax(0).bool() & (scores[c] > best)
        out[mask], best[mask] = c, scores[c][mask]
    return out


class RefinedTextModel(torch.nn.Module):
    """A zero-shot episode model (fewshot.zeroshot.TextEpisodeModel) whose masks SAM refines: same interface."""

    def __init__(self, model: torch.nn.Module, sam, refine: dict[str, Any], record: dict[str, Any]):
        super().__init__()
        self.model, self.sam, self.refine, self.record = model, sam, refine, record
        self.identity = f"{model.identity}+refine:sam"

    def protocol_fields(self) -> dict[str, Any]:
        return {**self.model.protocol_fields(), **self.record}

    def _refined(self, query_image: Tensor, logits: Tensor) -> Tensor:
        embeddings = self.sam.embed(query_image)
        return torch.stack(
            [refine_query(self.sam, pick(embeddings, b), logits[b], **self.refine) for b in range(len(logits))]
        )

    def forward(self, query_image, support_images=None, support_masks=None, class_ids=None) -> Tensor:
        return self._refined(query_image, self.model(query_image, support_images, support_masks, class_ids))

    def encode(self, images: Tensor) -> list[Tensor]:
        """The episode path's backbone pass: the wrapped model's (the query images themselves)."""
        return self.model.encode(images)

    def forward_features(self, query_feats, support_feats, support_masks, class_ids, out_size) -> Tensor:
        logits = self.model.forward_features(query_feats, support_feats, support_masks, class_ids, out_size)
        return self._refined(query_feats[0], logits)


def refiner_from_config(cfg, group: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(SAM engine, refine settings, protocol record) of the config group `group` (model or zeroshot), which holds
    `sam` and `refine_sam`."""
    from fewshot.backbones.weights import is_random
    from fewshot.sam import load_sam

    s, r = cfg.sam, cfg.refine_sam
    sam = load_sam(s.name, s.pretrained, s.preset, "cpu", s.points_per_batch, s.dtype)
    if sam.image_size != s.image_size:
        raise ValueError(
            f"{group}.sam.image_size={s.image_size} but SAM {s.preset or s.name} takes {sam.image_size} px inputs: "
            f"set {group}.sam.image_size={sam.image_size}"
        )
    refine = {"accept_iou": r.accept_iou, "select": r.select, "cascade": r.cascade}
    weights = "none" if is_random(s.pretrained) else s.pretrained
    record = {"refine": "sam", "refine_sam": refine,
              "sam": {"name": s.name, "pretrained": weights, "preset": s.preset, "image_size": s.image_size,
                      "dtype": s.dtype}}  # fmt: skip
    return sam, refine, record

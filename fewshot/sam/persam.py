"""PerSAM and PerSAM-F (Zhang et al., ICLR 2024, ZrrSkywalker/Personalize-SAM@a7e8724): one-shot personalised SAM.

PerSAM (persam.py): the target embedding t = mean of the reference's SAM features under its mask; the location prior
sim = cosine(t / |t|, query features), upsampled as a mask; a positive point at argmax sim and a negative one at
argmin; a first decoder step guided by t and by attn_sim = sigmoid(z-score(sim) at e x e); two cascaded refinements
(mask prompt, then box + mask prompt, multimask, best predicted IoU).

The guidance is PerSAM's own modified decoder (per_segment_anything/modeling/transformer.py), not transformers'
`attention_similarity` / `target_embedding` arguments, which compute something else (SAM_METHODS.md 2.1):
- t is added to the prompt tokens before the first block *in place*, so the prompt positional embedding of every block
  and of the final attention includes t; t is added again before every later block and to the final query;
- the token-to-image attention becomes softmax(softmax(QK^T / sqrt(d)) + attn_sim): a second softmax on probabilities.
`guided_forward` runs that decoder over transformers' own modules.

PerSAM-F (persam_f.py): t = (max + mean) / 2 of the masked features, a positive point only, no guidance; 2 weights
w1, w2 of the three multimask outputs (w0 = 1 - w1 - w2, all 1/3 at first) fitted on the reference itself (Dice +
sigmoid focal loss, AdamW lr 1e-3 eps 1e-4, cosine over 1,000 steps); the weighted logits give a mask, then two
box + mask-prompt refinements.

Both are 1-shot methods: with K shots, t is the mean of the K per-shot embeddings (and PerSAM-F fits on the first
shot), which is this codebase's rule, not an official one.

Both are SAM 1 methods and stay so here: the guidance is defined on segment_anything's decoder (its TwoWayTransformer
and 64 x 64 embedding), and SAM 2's decoder differs where it acts (an object-score token before the IoU token, the
high-resolution skip features, sigmoid IoU); a port would be a new method with no published numbers. A SAM 2
`model.sam.name` with `model.head=persam | persam_f` is a config error (fewshot.config.validate), and a Sam2Engine
refuses `attn_sim` / `target`.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------------------------
# PerSAM's guided decoder over transformers' SamMaskDecoder modules.


def _guided_attention(attn: nn.Module, query: Tensor, key: Tensor, value: Tensor, similarity: Tensor | None) -> Tensor:
    """softmax(softmax(QK^T / sqrt(d)) + similarity) V with a transformers SamAttention's projections."""
    P = query.shape[1]
    heads = attn.num_attention_heads
    q = attn._separate_heads(attn.q_proj(query), heads)
    k = attn._separate_heads(attn.k_proj(key), heads)
    v = attn._separate_heads(attn.v_proj(value), heads)
    weights = torch.softmax(q @ k.transpose(2, 3) * attn.scaling, dim=-1)
    if similarity is not None:
        weights = torch.softmax(weights + similarity, dim=-1)
    return attn.out_proj(attn._recombine_heads((weights @ v).transpose(1, 2), P))


def _block(layer: nn.Module, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor, similarity) -> tuple:
    """A transformers SamTwoWayAttentionBlock with the guided token-to-image attention."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(query=queries, key=queries, value=queries)[0]
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(query=q, key=q, value=queries)[0]
    queries = layer.layer_norm1(queries)
    q, k = queries + query_pe, keys + key_pe
    queries = layer.layer_norm2(queries + _guided_attention(layer.cross_attn_token_to_image, q, k, keys, similarity))
    queries = layer.layer_norm3(queries + layer.mlp(queries))
    q, k = queries + query_pe, keys + key_pe
    keys = layer.layer_norm4(keys + layer.cross_attn_image_to_token(query=k, key=q, value=queries)[0])
    return queries, keys


class GuidedTransformer(nn.Module):
    """PerSAM's two-way transformer on the modules of a transformers SamTwoWayTransformer (shared, not copied)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.inner = transformer

    def forward(self, point_embeddings, image_embeddings, image_positional_embeddings, attention_similarity,
                target_embedding=None, **kwargs):  # fmt: skip
        keys = image_embeddings.flatten(2).transpose(1, 2).unsqueeze(1)  # (B*P, 1, e*e, C)
        key_pe = image_positional_embeddings.flatten(2).transpose(1, 2).unsqueeze(1)
        target = target_embedding
        query_pe = point_embeddings if target is None else point_embeddings + target  # the official in-place +=
        queries = query_pe
        for i, layer in enumerate(self.inner.layers):
            if target is not None and i > 0:
                queries = queries + target
            queries, keys = _block(layer, queries, keys, query_pe, key_pe, attention_similarity)
        query = queries + query_pe + (0 if target is None else target)
        attn_out = self.inner.final_attn_token_to_image(query=query, key=keys + key_pe, value=keys)[0]
        return self.inner.layer_norm_final_attn(queries + attn_out), keys


def _guided_decoder(model: nn.Module) -> nn.Module:
    """A view of `model.mask_decoder` (same parameters) whose transformer is PerSAM's; made once per model."""
    decoder = getattr(model, "_persam_decoder", None)
    if decoder is None:
        decoder = copy.copy(model.mask_decoder)
        decoder._modules = dict(decoder._modules)
        decoder._modules["transformer"] = GuidedTransformer(model.mask_decoder.transformer)
        object.__setattr__(model, "_persam_decoder", decoder)  # not a submodule: no duplicate parameters
    return decoder


def guided_forward(model, embeddings, points, labels, boxes, multimask, attn_sim, target) -> SimpleNamespace:
    """SamModel's forward on image embeddings, with PerSAM's guided decoder.

    Args (in SAM's input frame): embeddings [N, C, e, e]; points [N, P, K, 2] and labels [N, P, K] or None; boxes
    [N, P, 4] or None; attn_sim [N, 1, 1, e*e] or None; target [N, 1, C] or None.
    """
    if points is not None and labels is None:
        labels = torch.ones(points.shape[:-1], dtype=torch.long, device=points.device)
    sparse, dense = model.prompt_encoder(input_points=points, input_labels=labels, input_boxes=boxes, input_masks=None)
    N, P = embeddings.shape[0], sparse.shape[1]
    positional = model.get_image_wide_positional_embeddings().repeat(N, 1, 1, 1)
    similarity = None if attn_sim is None else attn_sim.repeat_interleave(P, dim=0)  # (N*P, 1, 1, e*e)
    target = None if target is None else target[:, None]  # (N, 1, 1, C): every prompt and token
    masks, iou = _guided_decoder(model)(embeddings, positional, sparse, dense, multimask, similarity, target)
    return SimpleNamespace(pred_masks=masks, iou_scores=iou)


# ---------------------------------------------------------------------------------------------------------------------
# The PerSAM steps on one episode. `sam` is a fewshot.sam.SamEngine; features are SAM embeddings [C, e, e].


def reference_mask(sam, mask: Tensor) -> Tensor:
    """The reference mask [Hs, Ws] (bool) on the embedding grid [e, e]: as an image of 0 / 255 through SAM's resize,
    normalisation and pad, bilinear to e x e, channel 0 > 0 (i.e. above the red mean 123.675; persam.py:83-87)."""
    image = (mask.to(torch.uint8) * 255)[None, None].expand(1, 3, *mask.shape)
    grid = sam.mask_size // 4
    return F.interpolate(sam.preprocess(image), size=(grid, grid), mode="bilinear", align_corners=False)[0, 0] > 0


def target_embedding(features: Tensor, grid_mask: Tensor, mode: str = "mean") -> Tensor:
    """The reference's target embedding [C]: mean (PerSAM) or (max + mean) / 2 (PerSAM-F) of its masked features."""
    masked = features.flatten(1)[:, grid_mask.flatten()]  # (C, n)
    mean = masked.mean(dim=1)
    return mean if mode == "mean" else masked.max(dim=1).values / 2 + mean / 2


def location_prior(sam, target: Tensor, features: Tensor, size: tuple[int, int]) -> Tensor:
    """Cosine similarity of the normalised target to every feature [C, e, e], x4 bilinear and post-processed like a
    mask: [H, W]."""
    target = target / target.norm()
    sim = (target @ (features / features.norm(dim=0, keepdim=True)).flatten(1)).view(1, 1, *features.shape[-2:])
    return sam.postprocess(F.interpolate(sim, scale_factor=4, mode="bilinear", align_corners=False), size)[0, 0]


def extreme_points(sim: Tensor) -> Tensor:
    """(x, y) of the maximum and of the minimum of sim [H, W] -> [2, 2] (point_selection, top-1 / last-1)."""
    width = sim.shape[1]
    flat = torch.stack([sim.flatten().argmax(), sim.flatten().argmin()])
    return torch.stack([flat % width, flat // width], dim=1).float()


def attention_prior(sim: Tensor, grid: int) -> Tensor:
    """PerSAM's attn_sim: sigmoid of the z-scored prior, bilinear to grid x grid: [1, 1, 1, grid * grid]."""
    z = (sim - sim.mean()) / sim.std()
    return (
        F.interpolate(z[None, None], size=(grid, grid), mode="bilinear", align_corners=False).sigmoid().flatten(2)[None]
    )


def box_of(mask: Tensor) -> Tensor | None:
    """(x0, y0, x1, y1) of a boolean mask [H, W] (inclusive, as np.nonzero min / max), None when it is empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return None
    return torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()


def _best(sam, embedding, size, points, labels, box, mask_logits) -> tuple[Tensor, Tensor]:
    """One multimask refinement step -> (its best low-res logits [l, l], post-processed [H, W]) by predicted IoU."""
    low, iou = sam.decode(
        embedding[None], size, points[None, None], labels[None, None], None if box is None else box[None, None],
        mask_logits[None, None], multimask=True,
    )  # fmt: skip
    best = low[0, 0, iou[0, 0].argmax()]
    return best, sam.postprocess(best, size)


def _targets(sam, support_feats: Tensor, support_masks: Tensor, mode: str) -> Tensor | None:
    """Mean over shots of each shot's target embedding (shots without a mask cell skipped); None when none has one."""
    targets = []
    for features, mask in zip(support_feats, support_masks, strict=True):
        grid_mask = reference_mask(sam, mask)
        if grid_mask.any():
            targets.append(target_embedding(features, grid_mask, mode))
    return torch.stack(targets).mean(0) if targets else None


def persam(sam, query: Tensor, support_feats: Tensor, support_masks: Tensor, size: tuple[int, int]) -> Tensor:
    """PerSAM on one query: logits [H, W] (> 0 is the mask); an empty reference gives background (-1 everywhere).

    Args: query [C, e, e] SAM embedding; support_feats [S, C, e, e]; support_masks [S, Hs, Ws] bool.
    """
    target = _targets(sam, support_feats, support_masks, "mean")
    if target is None:
        return query.new_full(size, -1.0)
    sim = location_prior(sam, target, query, size)
    points, labels = extreme_points(sim), torch.tensor([1, 0], device=query.device)
    guidance = attention_prior(sim, query.shape[-1])
    low, _ = sam.decode(query[None], size, points[None, None], labels[None, None], multimask=False, attn_sim=guidance,
                        target=target[None, None])  # fmt: skip
    best, high = _best(sam, query, size, points, labels, None, low[0, 0, 0])
    box = box_of(high > 0)
    if box is None:  # the official code fails here (min of an empty array); the step-2 mask stands
        return high
    return _best(sam, query, size, points, labels, box, best)[1]


def dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """PerSAM-F's Dice loss (+1 smoothing) on logits [1, n] and a {0, 1} target [1, n]."""
    probs = logits.sigmoid()
    return (1 - (2 * (probs * target).sum(-1) + 1) / (probs.sum(-1) + target.sum(-1) + 1)).sum()


def focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """PerSAM-F's sigmoid focal loss (RetinaNet), mean over pixels."""
    probs = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = probs * target + (1 - probs) * (1 - target)
    return (ce * (1 - p_t) ** gamma * (alpha * target + (1 - alpha) * (1 - target))).mean(1).sum()


def mask_weights(params: Tensor) -> Tensor:
    """(w1, w2) [2, 1] -> the weights of the 3 multimask outputs [3, 1]: (1 - w1 - w2, w1, w2)."""
    return torch.cat([1 - params.sum(0, keepdim=True), params])


def fit_mask_weights(logits: Tensor, target: Tensor, iters: int = 1000, lr: float = 1e-3, eps: float = 1e-4) -> Tensor:
    """PerSAM-F's fit: weights [3] of the 3 constant multimask logits [3, n] minimising Dice + focal against the
    reference mask [n] (AdamW, cosine schedule; weights start at 1/3)."""
    with torch.inference_mode(False), torch.enable_grad():
        logits, target = logits.detach().clone().float(), target.detach().clone().float()[None]
        params = nn.Parameter(torch.full((2, 1), 1 / 3, device=logits.device))
        optimizer = torch.optim.AdamW([params], lr=lr, eps=eps)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iters)
        for _ in range(iters):
            weighted = (logits * mask_weights(params)).sum(0, keepdim=True)
            loss = dice_loss(weighted, target) + focal_loss(weighted, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        return mask_weights(params.detach())[:, 0]


def persam_f(
    sam, query: Tensor, support_feats: Tensor, support_masks: Tensor, size: tuple[int, int], iters: int = 1000,
    lr: float = 1e-3, eps: float = 1e-4,
) -> Tensor:  # fmt: skip
    """PerSAM-F on one query: logits [H, W]; the weights are fitted on the first support (background when its mask
    is empty). Args as `persam`, plus the fit's `iters`, `lr`, `eps`."""
    target = _targets(sam, support_feats, support_masks, "max_mean")
    if target is None or not support_masks[0].any():
        return query.new_full(size, -1.0)
    ref_size = tuple(support_masks.shape[-2:])
    one = torch.ones(1, 1, 1, dtype=torch.long, device=query.device)
    ref_point = extreme_points(location_prior(sam, target, support_feats[0], ref_size))[:1]
    ref_logits, _ = sam.predict(support_feats[0][None], ref_size, ref_point[None, None], one, multimask=True)
    weights = fit_mask_weights(ref_logits[0, 0].flatten(1), support_masks[0].flatten(), iters, lr, eps)
    point = extreme_points(location_prior(sam, target, query, size))[:1]
    low, _ = sam.decode(query[None], size, point[None, None], one, multimask=True)
    logit = (low[0, 0] * weights[:, None, None]).sum(0)  # (l, l)
    high = (sam.postprocess(low[0, 0], size) * weights[:, None, None]).sum(0)  # (H, W)
    labels = one[0, 0]
    for _ in range(2):  # two box + mask-prompt refinements
        box = box_of(high > 0)
        if box is None:  # the official code fails here; the last mask stands
            return high
        logit, high = _best(sam, query, size, point, labels, box, logit)
    return high

"""GF-SAM (Zhang et al., NeurIPS 2024, ANDYZAQ/GF-SAM@f227d1d matcher/GFSAM.py): training-free few-shot segmentation by
a graph of SAM masks prompted at the points DINOv2 similarity selects. Every step is a function here, tested alone:

1. `priors`: per shot, cosine similarity of every query patch to the support patches weighted by the (bilinear,
   align_corners) support mask: the max and the mask-normalised mean, averaged over shots (GF-SAM's K-shot rule);
   for the foreground mask and for the background (1 - mask).
2. `point_map`: the positive-negative alignment, minmax(mean * max) zeroed where minmax(background mean) exceeds it.
3. `select_points`: the top-k patches of that map, k = min(floor(sum), max_points) (1 when 0 < sum < 1), ordered by
   (x, y) as the official argwhere on the transposed map.
4. SAM: one single-mask prediction per point, binarised at 0.
5. `components`: weakly connected components of the graph "point j lies in mask i" (masks nearest-resized to the grid).
6. `grow_masks`: per cluster, masks sorted by their mean (mean^2 - background mean x mid(mean)) and accepted while their
   new area holds more positive than negative patches; the cluster score is the last mask's (official quirk).
7. `consistency_labels`: each point re-assigned to the cluster maximising (similarity to the cluster's union) /
   (distance to its nearest point); 1 = consistent and foreground, 2 = either, 0 = neither.
8. `merge_masks`: the union of label-1 masks, else the mask of the best label-2 score.

The steps give the official formulation's outputs (tests/test_gfsam.py keeps a loop version and compares) without
its full-resolution detours: where it resizes every mask to the grid, only the pixels that resize reads are taken
(`point_graph`: one pixel per point; `resize_rows`: the rows the bilinear resize reads), and the graph steps keep
their decisions on the device rather than synchronising with the host per mask or per cluster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-7  # the official cosine epsilon


def cosine(query: Tensor, support: Tensor) -> Tensor:
    """query [Q, C], support [S, C] -> [S, Q] cosine similarities (the official bmm / (norms + 1e-7))."""
    norms = support.norm(dim=1, keepdim=True) * query.norm(dim=1)[None]
    return (support @ query.T) / (norms + EPS)


def priors(query: Tensor, supports: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """The max and mean similarity priors of `query` to the masked supports, averaged over shots.

    Args:
        query: [C, h, w] features of the query.
        supports: [S, C, h, w] features of the supports.
        masks: [S, H, W] float support masks at any resolution (bilinear, align_corners=True, to h x w).
    Returns:
        (max prior, mean prior), each [h, w].
    """
    C, h, w = query.shape
    weights = mask_weights(masks, (h, w))
    maxes, means = [], []
    for support, weight in zip(supports, weights, strict=True):
        similarity = cosine(query.flatten(1).T, support.flatten(1).T) * weight[:, None]  # (hw_s, hw_q)
        means.append(mean_prior(similarity, weight))
        maxes.append(similarity.max(0).values)
    return torch.stack(maxes).mean(0).view(h, w), torch.stack(means).mean(0).view(h, w)


def mask_weights(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """Masks [S, H, W] -> the per-token weights [S, h*w] of a prior: bilinear with align_corners=True to `grid`."""
    return F.interpolate(masks[:, None].float(), size=grid, mode="bilinear", align_corners=True).flatten(1)


def mean_prior(weighted: Tensor, weight: Tensor) -> Tensor:
    """The mean prior [hw_q] of similarities already weighted by a support's token weights (weighted [hw_s, hw_q],
    weight [hw_s]): their mean over the support, normalised by the mask's share of the support."""
    return weighted.mean(0) / (weight.sum() / weight.numel() + EPS)


def _minmax(x: Tensor) -> Tensor:
    return (x - x.min()) / (x.max() - x.min() + 1e-6)


def point_map(max_prior: Tensor, mean_prior: Tensor, neg_mean_prior: Tensor) -> Tensor:
    """Positive-negative alignment: minmax(mean x max), zeroed where minmax(background mean) is larger. [h, w]."""
    cross = _minmax(mean_prior * max_prior)
    return cross * ~(_minmax(neg_mean_prior) > cross)


def select_points(score: Tensor, max_points: int = 128) -> Tensor:
    """The top-k patches of `score` [h, w] as (x, y) grid indices [k, 2], sorted by x then y; k = min(floor(sum),
    max_points), 1 when 0 < sum < 1, none when the map is zero."""
    total = float(score.sum())
    k = min(int(total), max_points)
    if k == 0 and total > 0:
        k = 1
    hot = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    hot[score.flatten().topk(k).indices] = True
    return torch.nonzero(hot.view(score.shape).T)  # (k, 2): (x, y), ordered by x then y


def components(adjacency: Tensor) -> tuple[int, Tensor]:
    """Weakly connected components of a directed graph [n, n] (nonzero = edge): (count, label per node), labels
    numbered by each component's smallest node, as scipy.sparse.csgraph.connected_components.

    Min-label propagation on the device: every node takes the smallest label among itself and its neighbours, then
    its label's label (pointer jumping), until nothing changes; each label stays a node of the component, and the
    component's smallest node keeps its own, so the fixed point labels each component by its smallest node.
    """
    n = adjacency.shape[0]
    linked = (adjacency != 0) | (adjacency != 0).T | torch.eye(n, dtype=torch.bool, device=adjacency.device)
    labels = torch.arange(n, device=adjacency.device)
    while True:
        new = torch.where(linked, labels[None], n).amin(dim=1)
        new = new[new]
        if torch.equal(new, labels):
            break
        labels = new
    roots, numbering = torch.unique(labels, return_inverse=True)  # sorted smallest nodes: the order they first appear
    return len(roots), numbering


def nearest_sources(size: int, out: int, device: torch.device | str | None = None) -> Tensor:
    """The source index [out] F.interpolate(mode="nearest") reads for each of `out` samples of a side of `size`:
    PyTorch's own rule, read off an interpolated index ramp (float32 holds indices exactly up to 2**24)."""
    ramp = torch.arange(size, dtype=torch.float32, device=device).view(1, 1, size, 1)
    return F.interpolate(ramp, size=(out, 1), mode="nearest").view(out).long()


def point_graph(masks: Tensor, points: Tensor, grid: tuple[int, int]) -> Tensor:
    """A[i, j] = 1 when point j (grid (x, y)) lies inside mask i (masks [n, H, W] nearest-resized to `grid`), read
    at the one pixel the nearest resize takes for each point, not from a resized copy of every mask: [n, k] float."""
    rows = nearest_sources(masks.shape[-2], grid[0], masks.device)[points[:, 1]]
    cols = nearest_sources(masks.shape[-1], grid[1], masks.device)[points[:, 0]]
    return masks[:, rows, cols].float()


def bilinear_rows(size: int, out: int) -> Tensor:
    """The rows (sorted) F.interpolate(mode="bilinear", align_corners=False) may read when it resizes a side of
    `size` to `out` without antialiasing: the two around each sample, and one more on either side against rounding."""
    centres = (torch.arange(out, dtype=torch.float64) + 0.5) * (size / out) - 0.5
    rows = centres.floor().long()[:, None] + torch.arange(-1, 3)
    return rows.clamp(0, size - 1).flatten().unique()


def resize_rows(row_masks: Tensor, rows: Tensor, height: int, grid: tuple[int, int]) -> Tensor:
    """F.interpolate(masks[:, None].float(), grid, mode="bilinear", align_corners=False)[:, 0] [n, h, w] of boolean
    masks [n, height, W], exactly, from their rows `rows` alone (row_masks [n, len(rows), W], rows from
    `bilinear_rows`): the float copy the resize reads holds those rows, and the rest, never read, is left unwritten
    (at 1024 x 1024 and a 37 x 37 grid, 148 of 1,024 rows converted)."""
    full = row_masks.new_empty((row_masks.shape[0], 1, height, row_masks.shape[-1]), dtype=torch.float32)
    full[:, 0, rows] = row_masks.float()
    return F.interpolate(full, size=grid, mode="bilinear", align_corners=False)[:, 0]


def grow_masks(
    small_masks: Tensor, labels: Tensor, count: int, pos_score: Tensor, neg_score: Tensor
) -> tuple[Tensor, Tensor]:
    """Cluster classification by mask growth.

    Args:
        small_masks: [n, h, w] the points' masks at the grid (bilinear).
        labels: [n] cluster of each point; count clusters.
        pos_score, neg_score: [h, w] maps; a patch is positive where pos_score > neg_score.
    Returns:
        foreground label per point [n] (long) and the cluster score of each point [n].
    """
    positive = (pos_score > neg_score).float()
    foreground = torch.zeros(len(labels), dtype=torch.long, device=small_masks.device)
    scores = torch.zeros(len(labels), device=small_masks.device)
    for cluster in range(count):
        members = torch.nonzero(labels == cluster)[:, 0]
        masks = small_masks[members]
        order = ((masks * (pos_score - neg_score)).sum((1, 2)) / (masks.sum((1, 2)) + 1e-6)).argsort(descending=True)
        inner = torch.zeros_like(pos_score)
        for idx in order.tolist():  # the decisions stay on the device: no host synchronisation per mask
            new = masks[idx] * (1 - inner)
            pos, neg = (positive * new).sum(), ((1 - positive) * new).sum()
            accept = pos > neg
            inner = torch.where(accept, inner + new, inner)
            foreground[members[idx]] = accept.long()
        scores[members] = pos - neg  # the last mask's margin (official)
    return foreground, scores


def consistency_labels(
    target: Tensor, small_unions: Tensor, points: Tensor, labels: Tensor, count: int, foreground: Tensor
) -> Tensor:
    """Point consistency: 1 = consistent and foreground, 2 = consistent or foreground, 0 = neither.

    Args:
        target: [C, h, w] query features.
        small_unions: [count, h, w] each cluster's union mask at the grid (bilinear).
        points: [n, 2] grid (x, y); labels [n] clusters; foreground [n] from `grow_masks`.
    """
    C, h, w = target.shape
    tokens = target.flatten(1).T
    similarity = cosine(tokens, tokens)  # (hw, hw): one cosine for every cluster, each weighting it as `priors`
    weights = mask_weights(small_unions, (h, w))
    sims = torch.stack([mean_prior(similarity * weight[:, None], weight) for weight in weights])
    point_sims = sims.view(count, h, w)[:, points[:, 1], points[:, 0]]  # (count, n)
    distance = torch.cdist(points.float(), points.float())  # (n, n)
    member = labels[None] == torch.arange(count, device=labels.device)[:, None]  # (count, n)
    nearest = torch.where(member[:, None], distance[None], torch.inf).amin(dim=2)  # (count, n): nearest member
    nearest[nearest == 0] = 1
    consistent = ((point_sims / nearest).argmax(dim=0) == labels).long()
    agree = (member * consistent).sum(dim=1)  # (count,): consistent members of each cluster
    consistent[(agree < member.sum(dim=1) - agree)[labels]] = 0  # a cluster whose majority disagrees
    out = ((consistent + foreground) > 0).long() * 2
    out[(consistent * foreground) > 0] = 1
    return out


def cluster_unions(masks: Tensor, labels: Tensor, count: int) -> Tensor:
    """The union of each cluster's boolean masks [n, H, W] -> [count, H, W], OR-ed in place one mask at a time (on a
    CPU some 40x faster than masks[labels == c].any(dim=0), which reduces across the masks)."""
    unions = masks.new_zeros((count, *masks.shape[1:]))
    for mask, label in zip(masks, labels.tolist(), strict=True):
        unions[label] |= mask
    return unions


def merge_masks(masks: Tensor, point_labels: Tensor, scores: Tensor) -> Tensor:
    """The union of label-1 masks [H, W]; without one, the mask of the best-scoring label-2 point (official: every
    other score set to 0 first, so a negative best falls back to the first point)."""
    chosen = masks[point_labels == 1]
    if chosen.shape[0] and chosen.any():
        return cluster_unions(chosen, torch.zeros(len(chosen), dtype=torch.long), 1)[0]
    scores = torch.where(point_labels == 2, scores, torch.zeros_like(scores))
    return masks[scores.argmax()]


def gfsam_mask(
    query: Tensor,
    supports: Tensor,
    support_masks: Tensor,
    segment,
    out_size: tuple[int, int],
    max_points: int = 128,
    token_norm: bool = True,
) -> Tensor:
    """GF-SAM on one episode -> the boolean mask [H, W] at `out_size`.

    Args:
        query: [C, h, w] feature-backbone features of the query; supports [S, C, h, w].
        support_masks: [S, Hs, Ws] float in {0, 1} (void already counted as not-foreground).
        segment: (x, y) grid points [n, 2] -> boolean SAM masks [n, H, W] at `out_size` (one single-mask prediction
            per point).
        token_norm: the official per-channel normalisation over tokens (F.normalize(dim=1) of [S, hw, C]).
    """
    if token_norm:
        query = F.normalize(query.flatten(1), dim=1).view_as(query)
        supports = F.normalize(supports.flatten(2), dim=2).view_as(supports)
    if not support_masks.any():  # no foreground to match: background (the official code puts a centre square)
        return torch.zeros(out_size, dtype=torch.bool, device=query.device)
    grid = tuple(query.shape[-2:])
    neg_max, neg_mean = priors(query, supports, 1 - support_masks)
    pos_max, pos_mean = priors(query, supports, support_masks)
    points = select_points(point_map(pos_max, pos_mean, neg_mean), max_points)
    if points.shape[0] == 0:
        return torch.zeros(out_size, dtype=torch.bool, device=query.device)
    masks = segment(points)  # (n, H, W) bool
    count, labels = components(point_graph(masks, points, grid))
    labels = labels.to(query.device)
    rows = bilinear_rows(masks.shape[-2], grid[0]).to(masks.device)
    row_masks = masks[:, rows]  # (n, r, W): the rows the bilinear resize to the grid reads
    small = resize_rows(row_masks, rows, masks.shape[-2], grid)  # (n, h, w)
    middle = (pos_mean.max() + pos_mean.min()) / 2
    foreground, scores = grow_masks(small, labels, count, pos_mean * pos_mean, neg_mean * middle)
    small_unions = resize_rows(cluster_unions(row_masks, labels, count), rows, masks.shape[-2], grid)
    point_labels = consistency_labels(query, small_unions, points, labels, count, foreground)
    return merge_masks(masks, point_labels, scores)


def grid_to_pixels(
    points: Tensor, grid: tuple[int, int], side: int, out_size: tuple[int, int], frame: tuple[int, int] | None = None
) -> Tensor:
    """Grid (x, y) indices -> pixel (x, y) of an `out_size` image whose SAM frame has longest side `side`: the official
    idx * side / grid, truncated to integers in SAM's frame (predict_torch gets int coordinates), mapped back.
    `frame` is the (h, w) the image takes in that frame (SamEngine.frame_size; SAM 2: side x side); None: SAM 1's."""
    from fewshot.sam.engine import resized_size

    height, width = out_size
    new_h, new_w = resized_size(out_size, side) if frame is None else frame
    frame = torch.floor(points.float() * points.new_tensor([side / grid[1], side / grid[0]], dtype=torch.float))
    return frame * frame.new_tensor([width / new_w, height / new_h])

"""GF-SAM, step by step on hand-made inputs with known answers, then an oracle episode (IoU 1)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from fewshot.sam.gfsam import (
    bilinear_rows,
    components,
    consistency_labels,
    cosine,
    gfsam_mask,
    grid_to_pixels,
    grow_masks,
    merge_masks,
    point_graph,
    point_map,
    priors,
    resize_rows,
    select_points,
)


@pytest.mark.parametrize("shots", [1, 3])
def test_priors_equal_brute_force(shots):
    g = torch.Generator().manual_seed(0)
    C, h, w = 6, 4, 5
    query, supports = torch.randn(C, h, w, generator=g), torch.randn(shots, C, h, w, generator=g)
    masks = (torch.rand(shots, h, w, generator=g) > 0.5).float()  # at the grid size: the resize is the identity
    max_prior, mean_prior = priors(query, supports, masks)
    for y, x in itertools.product(range(h), range(w)):
        q = query[:, y, x]
        maxes, means = [], []
        for s in range(shots):
            sims = [
                float(q @ supports[s, :, i, j] / (q.norm() * supports[s, :, i, j].norm() + 1e-7))
                * float(masks[s, i, j])
                for i in range(h)
                for j in range(w)
            ]
            maxes.append(max(sims))
            means.append(sum(sims) / len(sims) / (float(masks[s].sum()) / (h * w) + 1e-7))
        assert max_prior[y, x] == pytest.approx(sum(maxes) / shots, abs=1e-5)
        assert mean_prior[y, x] == pytest.approx(sum(means) / shots, abs=1e-5)


def test_cosine_is_the_official_formula():
    a, b = torch.randn(7, 3), torch.randn(4, 3)
    expected = torch.tensor(
        [[float(b[i] @ a[j] / (b[i].norm() * a[j].norm() + 1e-7)) for j in range(7)] for i in range(4)]
    )
    assert torch.allclose(cosine(a, b), expected, atol=1e-6)


def test_point_map_zeroes_where_the_background_wins():
    max_prior = torch.tensor([[1.0, 0.5], [0.2, 0.0]])
    mean_prior = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    neg_mean = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # minmax: [[0, 1], [0, 0]]
    cross = torch.tensor([[1.0, 0.5], [0.2, 0.0]]) / (1 + 1e-6)
    expected = cross * torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(point_map(max_prior, mean_prior, neg_mean), expected)


def test_point_selection_counts_and_orders():
    score = torch.zeros(4, 4)
    score[0, 3], score[2, 1], score[3, 0], score[1, 1] = 0.9, 0.8, 0.7, 0.2  # sum 2.6 -> k = 2
    assert select_points(score).tolist() == [[1, 2], [3, 0]]  # (x, y) of the top 2, ordered by x then y
    assert select_points(score, max_points=1).tolist() == [[3, 0]]
    small = torch.zeros(3, 3)
    small[1, 2] = 0.4  # 0 < sum < 1 -> one point
    assert select_points(small).tolist() == [[2, 1]]
    assert select_points(torch.zeros(3, 3)).shape == (0, 2)


def bfs_components(adjacency: torch.Tensor) -> list[int]:
    n, labels = adjacency.shape[0], [-1] * adjacency.shape[0]
    undirected = (adjacency + adjacency.T) > 0
    count = 0
    for start in range(n):
        if labels[start] >= 0:
            continue
        stack, labels[start] = [start], count
        while stack:
            i = stack.pop()
            for j in torch.nonzero(undirected[i])[:, 0].tolist():
                if labels[j] < 0:
                    labels[j] = count
                    stack.append(j)
        count += 1
    return labels


def test_components_are_weak_and_numbered_by_first_node():
    adjacency = torch.zeros(6, 6)
    adjacency[0, 3] = adjacency[4, 3] = adjacency[2, 5] = 1  # 0-3-4 (only through directed edges), 2-5, 1 alone
    count, labels = components(adjacency)
    assert count == 3 and labels.tolist() == [0, 1, 2, 0, 0, 2]
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        planted = (torch.rand(12, 12, generator=g) > 0.9).float()
        assert components(planted)[1].tolist() == bfs_components(planted)


def test_point_graph_marks_points_inside_masks():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True  # top-left quadrant
    masks[1, 4:, 4:] = True
    points = torch.tensor([[0, 0], [3, 3], [1, 0]])  # grid (x, y) of a 4x4 grid
    assert point_graph(masks, points, (4, 4)).tolist() == [[1, 0, 1], [0, 1, 0]]


def test_mask_growth_accepts_masks_while_positive_wins():
    pos = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # patches 0, 1 positive (pos > neg), 2, 3 negative
    neg = torch.full((1, 4), 0.5)
    masks = torch.tensor([[[1.0, 1.0, 0.0, 0.0]], [[0.0, 1.0, 1.0, 1.0]], [[1.0, 0.0, 1.0, 0.0]]])
    labels = torch.tensor([0, 0, 1])
    foreground, scores = grow_masks(masks, labels, 2, pos, neg)
    # cluster 0: mask 0 (mean 0.5) first, accepted (2 pos vs 0); mask 1's new area is patches 2, 3: 0 vs 2, rejected
    # cluster 1: mask 2 has 1 pos, 1 neg: not more positive, rejected
    assert foreground.tolist() == [1, 0, 0]
    assert scores.tolist() == [-2.0, -2.0, 0.0]  # the last mask tried in each cluster gives its score


def test_consistency_labels_combine_consistency_and_foreground():
    # two clusters far apart on a 1x6 strip, features identical within each cluster's region
    target = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]]).view(2, 1, 6)
    unions = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]]).view(2, 1, 6)
    points = torch.tensor([[0, 0], [2, 0], [3, 0], [5, 0]])
    labels = torch.tensor([0, 0, 1, 1])
    foreground = torch.tensor([1, 1, 0, 0])
    assert consistency_labels(target, unions, points, labels, 2, foreground).tolist() == [1, 1, 2, 2]
    # one point of each cluster sits nearer the other cluster's features: a tie (1 of 2) keeps the cluster consistent
    mixed = torch.tensor([1, 0, 0, 1])
    assert consistency_labels(target, unions, points, mixed, 2, torch.zeros(4, dtype=torch.long)).tolist() == [
        0,
        2,
        0,
        2,
    ]
    swapped = torch.tensor([1, 1, 0, 0])  # every point against its features: both clusters are zeroed
    assert consistency_labels(target, unions, points, swapped, 2, torch.zeros(4, dtype=torch.long)).tolist() == [0] * 4
    assert consistency_labels(target, unions, points, swapped, 2, torch.ones(4, dtype=torch.long)).tolist() == [2] * 4


def test_merge_masks_unions_label_one_else_best_label_two():
    masks = torch.zeros(3, 2, 2, dtype=torch.bool)
    masks[0, 0, 0] = masks[1, 1, 1] = masks[2, 0, 1] = True
    assert merge_masks(masks, torch.tensor([1, 0, 1]), torch.zeros(3)).sum() == 2
    chosen = merge_masks(masks, torch.tensor([2, 0, 2]), torch.tensor([0.5, 9.0, 1.5]))
    assert torch.equal(chosen, masks[2])  # label 0's score is ignored


def test_grid_points_are_truncated_in_sams_frame():
    points = torch.tensor([[0, 0], [1, 2], [36, 36]])
    pixels = grid_to_pixels(points, (37, 37), 1024, (1024, 1024))
    assert pixels.tolist() == [[0.0, 0.0], [27.0, 55.0], [996.0, 996.0]]  # floor(idx * 1024 / 37)


def oracle_episode(size: int = 64, grid: int = 8):
    """One-hot features of the true regions and a SAM stand-in returning the true object containing the point."""
    objects = torch.zeros(2, size, size, dtype=torch.bool)
    objects[0, 8:30, 6:28] = True  # the class
    objects[1, 36:60, 34:62] = True  # another object

    def features(masks: torch.Tensor) -> torch.Tensor:
        small = F.interpolate(masks[None].float(), size=(grid, grid), mode="area")[0]
        return torch.cat([small, 1 - small.sum(0, keepdim=True)]).clamp_min(0)  # (3, grid, grid)

    support_objects = torch.zeros(2, size, size, dtype=torch.bool)
    support_objects[0, 30:60, 30:60] = True
    support_objects[1, 4:20, 4:24] = True

    def segment(points: torch.Tensor) -> torch.Tensor:
        pixels = grid_to_pixels(points, (grid, grid), size, (size, size)).long()
        out = torch.zeros(len(points), size, size, dtype=torch.bool)
        for n, (x, y) in enumerate(pixels.tolist()):
            hit = [o for o in objects if o[y, x]]
            out[n] = hit[0] if hit else ~objects.any(0)
        return out

    return features(objects), features(support_objects)[None], support_objects[0][None].float(), segment, objects[0]


@pytest.mark.parametrize("token_norm", [True, False])
def test_oracle_features_and_sam_give_iou_one(token_norm):
    query, supports, support_masks, segment, truth = oracle_episode()
    pred = gfsam_mask(query, supports, support_masks, segment, (64, 64), token_norm=token_norm)
    iou = (pred & truth).sum() / (pred | truth).sum()
    assert iou == 1.0


def test_empty_support_predicts_background():
    query, supports, _, segment, _ = oracle_episode()
    pred = gfsam_mask(query, supports, torch.zeros(1, 64, 64), segment, (64, 64))
    assert pred.shape == (64, 64) and not pred.any()


def test_supports_without_usable_foreground_give_background_or_a_mask_never_nan():
    """A support mask too small to reach any grid sample (align_corners bilinear) gives background, as an empty one;
    an empty shot beside a real one only averages zero priors in, and the episode still finds the object."""
    query, supports, support_masks, segment, truth = oracle_episode()
    speck = torch.zeros(1, 64, 64)
    speck[0, 4, 4] = 1  # between the 8 x 8 grid's samples at 0, 9, 18, ...
    assert not gfsam_mask(query, supports, speck, segment, (64, 64)).any()
    two_shots = torch.cat([support_masks, torch.zeros(1, 64, 64)])
    pred = gfsam_mask(query, supports.expand(2, -1, -1, -1), two_shots, segment, (64, 64))
    assert pred.dtype == torch.bool and (pred & truth).sum() / (pred | truth).sum() == 1.0


def test_token_norm_rescales_channels_per_image():
    """The official quirk normalises each channel over the tokens: it changes the priors unless the channels already
    have equal norms."""
    g = torch.Generator().manual_seed(2)
    query, supports = torch.randn(4, 3, 3, generator=g), torch.randn(1, 4, 3, 3, generator=g)
    query[0] *= 10  # one loud channel
    masks = (torch.rand(1, 3, 3, generator=g) > 0.5).float()
    normed = (
        F.normalize(query.flatten(1), dim=1).view_as(query),
        F.normalize(supports.flatten(2), dim=2).view_as(supports),
    )
    plain = priors(query, supports, masks)[1]
    quirk = priors(*normed, masks)[1]
    assert not torch.allclose(plain, quirk, atol=1e-3)


# The formulation before the device-side rewrite (per-mask host decisions, per-cluster loops, a nearest-resized copy of
# every mask), kept here as the reference the rewritten steps must equal exactly.


def loop_point_graph(masks, points, grid):
    small = F.interpolate(masks[:, None].float(), size=grid, mode="nearest")[:, 0]
    return small[:, points[:, 1], points[:, 0]]


def loop_grow_masks(small_masks, labels, count, pos_score, neg_score):
    positive = (pos_score > neg_score).float()
    foreground, scores = torch.zeros(len(labels), dtype=torch.long), torch.zeros(len(labels))
    for cluster in range(count):
        members = torch.nonzero(labels == cluster)[:, 0]
        masks = small_masks[members]
        order = ((masks * (pos_score - neg_score)).sum((1, 2)) / (masks.sum((1, 2)) + 1e-6)).argsort(descending=True)
        inner = torch.zeros_like(pos_score)
        for idx in order.tolist():
            new = masks[idx] * (1 - inner)
            pos, neg = (positive * new).sum(), ((1 - positive) * new).sum()
            if pos > neg:
                inner = inner + new
                foreground[members[idx]] = 1
        scores[members] = pos - neg
    return foreground, scores


def loop_consistency_labels(target, small_unions, points, labels, count, foreground):
    sims = torch.stack([priors(target, target[None], union[None])[1] for union in small_unions])
    point_sims = sims[:, points[:, 1], points[:, 0]]
    distance = torch.cdist(points.float(), points.float())
    nearest = torch.stack([distance[:, labels == c].min(dim=1).values for c in range(count)])
    nearest[nearest == 0] = 1
    consistent = ((point_sims / nearest).argmax(dim=0) == labels).long()
    for cluster in range(count):
        members = labels == cluster
        agree = consistent[members].sum()
        if agree < members.sum() - agree:
            consistent[members] = 0
    out = ((consistent + foreground) > 0).long() * 2
    out[(consistent * foreground) > 0] = 1
    return out


def loop_gfsam_mask(query, supports, support_masks, segment, out_size, max_points=128):
    query = F.normalize(query.flatten(1), dim=1).view_as(query)
    supports = F.normalize(supports.flatten(2), dim=2).view_as(supports)
    grid = tuple(query.shape[-2:])
    neg_max, neg_mean = priors(query, supports, 1 - support_masks)
    pos_max, pos_mean = priors(query, supports, support_masks)
    points = select_points(point_map(pos_max, pos_mean, neg_mean), max_points)
    masks = segment(points)
    labels = torch.tensor(bfs_components(loop_point_graph(masks, points, grid)))
    count = int(labels.max()) + 1
    small = F.interpolate(masks[:, None].float(), size=grid, mode="bilinear", align_corners=False)[:, 0]
    middle = (pos_mean.max() + pos_mean.min()) / 2
    foreground, scores = loop_grow_masks(small, labels, count, pos_mean * pos_mean, neg_mean * middle)
    unions = torch.stack([masks[labels == c].any(dim=0) for c in range(count)]).float()
    small_unions = F.interpolate(unions[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0]
    return merge_masks(masks, loop_consistency_labels(query, small_unions, points, labels, count, foreground), scores)


@pytest.mark.parametrize("size, grid", [((375, 500), (37, 37)), ((64, 64), (8, 8)), ((50, 70), (16, 24))])
def test_point_graph_reads_the_pixels_the_nearest_resize_takes(size, grid):
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(6, *size, generator=g) > 0.5
    xs, ys = torch.randint(0, grid[1], (9,), generator=g), torch.randint(0, grid[0], (9,), generator=g)
    points = torch.stack([xs, ys], dim=1)
    assert torch.equal(point_graph(masks, points, grid), loop_point_graph(masks, points, grid))


@pytest.mark.parametrize(
    "size, grid",
    [((1024, 1024), (37, 37)), ((375, 500), (37, 37)), ((64, 64), (8, 8)), ((50, 70), (16, 24)), ((12, 30), (37, 37)),
     ((37, 37), (37, 37)), ((1, 5), (3, 3)), ((1000, 999), (37, 41))],
)  # fmt: skip
def test_resizing_from_the_rows_bilinear_reads_equals_resizing_the_whole_masks(size, grid):
    """Down, up and same-size resizes: the rows bilinear_rows names are all the resize reads (random masks put a
    one in most other rows, so a missed row would show), and the result is F.interpolate's, bit for bit."""
    masks = torch.rand(5, *size, generator=torch.Generator().manual_seed(size[0])) > 0.5
    rows = bilinear_rows(size[0], grid[0])
    expected = F.interpolate(masks[:, None].float(), size=grid, mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(resize_rows(masks[:, rows], rows, size[0], grid), expected)
    assert len(rows) <= min(size[0], 4 * grid[0])


def test_components_of_a_long_chain_and_of_lone_nodes():
    n = 40
    chain = torch.zeros(n, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(4))
    chain[order[1:], order[:-1]] = 1  # one path through every node, edges in one direction only
    count, labels = components(chain)
    assert count == 1 and labels.tolist() == [0] * n
    count, labels = components(torch.zeros(5, 5))
    assert count == 5 and labels.tolist() == [0, 1, 2, 3, 4]


def random_clusters(seed: int, n: int = 24, count: int = 4, h: int = 6, w: int = 7):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(count), torch.randint(0, count, (n - count,), generator=g)])
    small = F.interpolate((torch.rand(n, 1, 3 * h, 3 * w, generator=g) > 0.6).float(), size=(h, w), mode="bilinear")
    points = torch.stack([torch.randint(0, w, (n,), generator=g), torch.randint(0, h, (n,), generator=g)], 1)
    pos, neg = torch.rand(h, w, generator=g), torch.rand(h, w, generator=g)
    return g, small[:, 0], labels, count, points, pos, neg


@pytest.mark.parametrize("seed", range(6))
def test_device_side_growth_and_consistency_equal_the_loops(seed):
    g, small, labels, count, points, pos, neg = random_clusters(seed)
    foreground, scores = grow_masks(small, labels, count, pos, neg)
    expected = loop_grow_masks(small, labels, count, pos, neg)
    assert torch.equal(foreground, expected[0]) and torch.equal(scores, expected[1])
    target = torch.randn(5, *pos.shape, generator=g)
    unions = torch.stack([small[labels == c].amax(0) for c in range(count)])
    assert torch.equal(
        consistency_labels(target, unions, points, labels, count, foreground),
        loop_consistency_labels(target, unions, points, labels, count, foreground),
    )


@pytest.mark.parametrize("seed", range(4))
def test_gfsam_mask_equals_the_loop_formulation(seed):
    """Random features (many points, several clusters) and a SAM stand-in of random blobs around each point."""
    g = torch.Generator().manual_seed(seed)
    grid, size = (9, 11), (45, 66)
    query, supports = torch.randn(8, *grid, generator=g), torch.randn(2, 8, *grid, generator=g)
    support_masks = (torch.rand(2, *size, generator=g) > 0.6).float()
    radii = torch.randint(2, 25, (grid[0] * grid[1],), generator=g)
    ys, xs = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")

    def segment(points):
        pixels = grid_to_pixels(points, grid, 66, size)
        r = radii[: len(points), None, None]
        return ((xs - pixels[:, :1, None]) ** 2 + (ys - pixels[:, 1:, None]) ** 2) < r**2

    pred = gfsam_mask(query, supports, support_masks, segment, size, max_points=40)
    assert torch.equal(pred, loop_gfsam_mask(query, supports, support_masks, segment, size, max_points=40))

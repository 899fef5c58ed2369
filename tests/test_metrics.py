"""FewShotIoU on hand-computed 4x4 masks and against a direct recomputation of the pooled formulas of PROTOCOL.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fewshot.metrics import FewShotIoU

V = 255
# Episode A, class 1: fg I = 3, U = 5; bg I = 9, U = 11; 14 labelled, 12 correct (prediction on void is ignored).
TARGET_A = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [V, V, 0, 0]]
PRED_A = [[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]]
# Episode B, class 2: no foreground anywhere (empty union); bg I = U = 12; 12 labelled, 12 correct.
TARGET_B = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [V, V, V, V]]
PRED_B = [[0] * 4] * 4
# Episode C, class 1: everything predicted foreground: fg I = 4, U = 16; bg I = 0, U = 12; 16 labelled, 4 correct.
TARGET_C = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
PRED_C = [[1] * 4] * 4


def test_hand_computed_4x4():
    metric = FewShotIoU([1, 2, 3])  # class 3 has no episode: absent, left out of the means
    metric.update(torch.tensor([PRED_A, PRED_B]), torch.tensor([TARGET_A, TARGET_B]), torch.tensor([1, 2]))
    metric.update(torch.tensor([PRED_C]), torch.tensor([TARGET_C]), [1])
    out = metric.compute()
    assert out["class_iou"][3] is None and out["absent_classes"] == [3]
    assert out["class_iou"][1] == pytest.approx(100 * 7 / 21)  # pooled, not the mean of 3/5 and 4/16
    assert out["class_iou"][2] == 0.0
    assert out["miou"] == pytest.approx(100 * (7 / 21 + 0.0) / 2)  # class 2 was tested and failed: it counts 0
    assert out["fbiou"] == pytest.approx(100 * (7 / 21 + 21 / 35) / 2)
    assert out["pixel_acc"] == pytest.approx(100 * 28 / 42)
    assert out["mean_pixel_acc"] == pytest.approx(100 * (16 / 30 + 12 / 12) / 2)
    assert out["episodes"] == 3
    metric.reset()
    empty = metric.compute()
    assert empty["episodes"] == 0 and empty["miou"] == 0 and empty["absent_classes"] == [1, 2, 3]


def test_absent_classes_leave_the_other_classes_and_fbiou_unchanged():
    preds, targets, ids = random_episodes(30, seed=3, class_ids=[1, 2])
    tensors = [torch.from_numpy(a) for a in (preds, targets, ids)]
    tested, wider = FewShotIoU([1, 2]), FewShotIoU([1, 2, 7, 9])  # 7 and 9 never drawn
    tested.update(*tensors)
    wider.update(*tensors)
    a, b = tested.compute(), wider.compute()
    assert b["absent_classes"] == [7, 9] and a["absent_classes"] == []
    assert b["class_iou"] == {**a["class_iou"], 7: None, 9: None}
    for key in ("miou", "fbiou", "pixel_acc", "mean_pixel_acc", "episodes"):
        assert b[key] == a[key], key


def reference(preds: np.ndarray, targets: np.ndarray, ids: np.ndarray, class_ids: list[int]) -> dict:
    """The formulas of PROTOCOL.md written out episode by episode with numpy."""
    inter = {c: [0, 0] for c in class_ids}  # class -> [sum I_fg, sum U_fg]
    pooled = {"I_fg": 0, "U_fg": 0, "I_bg": 0, "U_bg": 0, "correct": 0, "labelled": 0}
    acc = {c: [0, 0] for c in class_ids}
    for pred, target, c in zip(preds, targets, ids, strict=True):
        valid = target != 255
        p_fg, t_fg = (pred == 1) & valid, (target == 1) & valid
        p_bg, t_bg = (pred != 1) & valid, (target != 1) & valid
        i_fg, u_fg = (p_fg & t_fg).sum(), (p_fg | t_fg).sum()
        i_bg, u_bg = (p_bg & t_bg).sum(), (p_bg | t_bg).sum()
        inter[c][0] += i_fg
        inter[c][1] += u_fg
        correct = ((pred == target) & valid).sum()
        acc[c][0] += correct
        acc[c][1] += valid.sum()
        for key, value in zip(pooled, (i_fg, u_fg, i_bg, u_bg, correct, valid.sum()), strict=True):
            pooled[key] += value
    drawn = set(ids.tolist())  # a class without episodes has no IoU and stays out of the means
    iou = {c: 100 * i / max(1, u) if c in drawn else None for c, (i, u) in inter.items()}
    return {
        "class_iou": iou,
        "miou": float(np.mean([v for v in iou.values() if v is not None])),
        "fbiou": 100 * (pooled["I_fg"] / max(1, pooled["U_fg"]) + pooled["I_bg"] / max(1, pooled["U_bg"])) / 2,
        "pixel_acc": 100 * pooled["correct"] / max(1, pooled["labelled"]),
        "mean_pixel_acc": float(np.mean([100 * a / max(1, n) for c, (a, n) in acc.items() if c in drawn])),
    }


def random_episodes(n: int, seed: int, class_ids: list[int]):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, 12, 10)) < rng.random((n, 1, 1))).astype(np.int64)
    targets[rng.random((n, 12, 10)) < 0.15] = 255
    preds = (rng.random((n, 12, 10)) < rng.random((n, 1, 1))).astype(np.int64)
    ids = rng.choice(class_ids, size=n)
    return preds, targets, ids


def test_matches_direct_recomputation_on_random_masks():
    class_ids = [3, 7, 11, 19, 20]
    preds, targets, ids = random_episodes(60, seed=0, class_ids=class_ids[:4])  # class 20 never drawn
    metric = FewShotIoU(class_ids)
    for start in range(0, 60, 8):
        sl = slice(start, start + 8)
        metric.update(torch.from_numpy(preds[sl]), torch.from_numpy(targets[sl]), torch.from_numpy(ids[sl]))
    out, ref = metric.compute(), reference(preds, targets, ids, class_ids)
    for key in ("miou", "fbiou", "pixel_acc", "mean_pixel_acc"):
        assert out[key] == pytest.approx(ref[key], rel=1e-9), key
    assert out["class_iou"].keys() == ref["class_iou"].keys()
    for c, iou in ref["class_iou"].items():
        assert out["class_iou"][c] == (None if iou is None else pytest.approx(iou, rel=1e-9)), c
    assert out["episodes"] == 60 and out["class_iou"][20] is None and out["absent_classes"] == [20]


def test_merge_of_two_halves_equals_one_pass():
    preds, targets, ids = random_episodes(40, seed=1, class_ids=[1, 2, 3])
    whole, first, second = FewShotIoU([1, 2, 3]), FewShotIoU([1, 2, 3]), FewShotIoU([1, 2, 3])
    as_tensors = [torch.from_numpy(a) for a in (preds, targets, ids)]
    whole.update(*as_tensors)
    first.update(*(t[:17] for t in as_tensors))
    second.update(*(t[17:] for t in as_tensors))
    first.merge(second)
    assert torch.equal(first.stats, whole.stats) and first.compute() == whole.compute()
    with pytest.raises(ValueError, match="merge"):
        first.merge(FewShotIoU([1, 2]))


def test_all_reduce_single_process(tmp_path):
    preds, targets, ids = random_episodes(5, seed=2, class_ids=[1, 2])
    metric = FewShotIoU([1, 2])
    metric.update(*(torch.from_numpy(a) for a in (preds, targets, ids)))
    before = metric.stats.clone()
    metric.all_reduce()  # not initialised: no-op
    assert torch.equal(metric.stats, before)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        metric.all_reduce()
    finally:
        dist.destroy_process_group()
    assert torch.equal(metric.stats, before)


def test_inputs_and_errors():
    metric = FewShotIoU([5])
    metric.update(torch.ones(1, 4, 4, dtype=torch.bool), torch.tensor([TARGET_C], dtype=torch.uint8), [5])
    assert metric.compute()["class_iou"] == {5: pytest.approx(100 * 4 / 16)}  # bool / uint8 inputs work
    assert metric.stats.dtype == torch.int64 and metric.stats.device.type == "cpu"
    with pytest.raises(ValueError, match=r"pred \(1, 4, 4\) and target \(1, 4, 5\)"):
        metric.update(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5), [5])
    with pytest.raises(ValueError, match="class_ids"):
        metric.update(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), [5])
    metric.update(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), [6, -1])  # unknown classes: reported by compute
    with pytest.raises(ValueError, match="2 episodes had a class id outside"):
        metric.compute()
    with pytest.raises(ValueError, match="distinct"):
        FewShotIoU([1, 1])


def test_predict_mask_equals_argmax_including_ties():
    from fewshot.metrics import predict_mask

    logits = torch.randn(3, 2, 5, 7)
    logits[0, 1, 0, 0] = logits[0, 0, 0, 0]  # a tie goes to background, as with argmax
    assert torch.equal(predict_mask(logits).long(), logits.argmax(1))
    assert torch.equal(predict_mask(logits[0]).long(), logits[0].argmax(0))

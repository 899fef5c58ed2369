"""Few-shot segmentation metrics with the pooled per-class formulas of the HSNet family (`shared/PROTOCOL.md`).

Per episode e of class c, with void pixels excluded from everything: I_fg, U_fg (foreground intersection and union of
prediction and target), I_bg, U_bg (the same for background) and L (labelled, i.e. non-void, pixels). Over a fold:

- IoU_c          = sum_{e in E_c} I_fg / max(1, sum_{e in E_c} U_fg)      (pooled over episodes, then divided)
- mIoU           = mean of IoU_c over the present classes: the metric's class_ids with at least one episode
- FB-IoU         = mean over {bg, fg} of sum_e I / max(1, sum_e U)        (pooled over all episodes)
- pixel_acc      = sum_e (I_fg + I_bg) / max(1, sum_e L)                  (correct / labelled pixels)
- mean_pixel_acc = mean over the present classes of sum_{e in E_c} (I_fg + I_bg) / max(1, sum_{e in E_c} L): the
  pixel accuracy pooled over each episode class's episodes, then averaged over classes like mIoU.
All outputs are percent.

Absent classes. A class of class_ids without any episode has no IoU: `compute` reports it as None in `class_iou`,
lists it in `absent_classes` and leaves it out of mIoU and mean_pixel_acc (FB-IoU and pixel_acc pool episodes and
do not depend on it). HSNet (common/logger.py, AverageMeter.compute_iou: I / max(U, 1)) and PFENet (test.py,
validate: I / (U + 1e-10)) would count such a class as IoU 0 in the mean. On the benchmark both rules give the same
number, since with its 1,000 episodes every class of a fold appears (the PASCAL walk covers all of a fold's >= 346
pairs; 1,000 uniform class draws miss one of COCO's 20 fold classes with probability below 1e-20). With fewer
episodes, counting 0 would mix "not tested" into "failed": a 3-episode run of a 5-class fold would average in two
zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# Columns of the per-class statistics table.
I_FG, U_FG, I_BG, U_BG, LABELLED, EPISODES = range(6)


class FewShotIoU:
    """Accumulates per-class pooled statistics on a device with `index_add_`; no host synchronisation in `update`.

    Rows of `stats` [len(class_ids) + 1, 6] (int64) follow `class_ids`; the last row collects episodes whose class is
    not in `class_ids`, which `compute` reports as an error. With `device=None` the statistics move to the device of
    the first `update`.
    """

    def __init__(self, class_ids: Sequence[int], device: torch.device | str | None = None, ignore_index: int = 255):
        ids = [int(c) for c in class_ids]
        if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
            raise ValueError(f"class_ids must be distinct non-negative ints, got {list(class_ids)}")
        self.class_ids = tuple(ids)
        self.ignore_index = ignore_index
        self.device = torch.device(device) if device is not None else None
        unknown = len(ids)
        lookup = torch.full((max(ids) + 2,), unknown, dtype=torch.long)  # class id -> row; the last entry is unknown
        lookup[torch.tensor(ids)] = torch.arange(len(ids))
        self._lookup = lookup.to(self.device or "cpu")
        self.stats = torch.zeros(len(ids) + 1, 6, dtype=torch.long, device=self.device or "cpu")

    def reset(self) -> None:
        self.stats = torch.zeros_like(self.stats)

    def _place(self, device: torch.device) -> None:
        if self.device is None:
            self.device = device
            self.stats = self.stats.to(device)
            self._lookup = self._lookup.to(device)

    def update(self, pred: Tensor, target: Tensor, class_ids: Tensor | Sequence[int]) -> None:
        """Adds a batch of episodes.

        Args:
            pred: [B, H, W]; 1 is foreground, any other value background.
            target: [B, H, W] in {0, 1, ignore_index}; values other than 1 and ignore_index count as background.
            class_ids: [B] class of each episode.
        """
        if pred.dim() != 3 or pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be [B, H, W]")
        self._place(pred.device)
        pred, target = pred.to(self.device), target.to(self.device)
        class_ids = torch.as_tensor(class_ids).to(self.device, torch.long)
        if class_ids.shape != (pred.shape[0],):
            raise ValueError(f"class_ids {tuple(class_ids.shape)} must be [B] with B = {pred.shape[0]} (pred batch)")
        valid = target != self.ignore_index
        pred_fg = pred == 1
        true_fg = target == 1
        pred_bg = ~pred_fg & valid
        true_bg = ~true_fg & valid
        pred_fg = pred_fg & valid
        rows = torch.stack(
            [
                (pred_fg & true_fg).sum(dim=(1, 2)),
                (pred_fg | true_fg).sum(dim=(1, 2)),
                (pred_bg & true_bg).sum(dim=(1, 2)),
                (pred_bg | true_bg).sum(dim=(1, 2)),
                valid.sum(dim=(1, 2)),
                torch.ones_like(class_ids),
            ],
            dim=1,
        ).long()  # (B, 6)
        last = self._lookup.numel() - 1
        index = self._lookup[torch.where(class_ids < 0, last, class_ids.clamp(max=last))]
        self.stats.index_add_(0, index, rows)

    def merge(self, other: FewShotIoU) -> None:
        """Adds the statistics of another metric over the same classes (e.g. another worker's shard)."""
        if other.class_ids != self.class_ids or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot merge FewShotIoU over classes {list(other.class_ids)} (ignore {other.ignore_index}) into one "
                f"over {list(self.class_ids)} (ignore {self.ignore_index})"
            )
        self.stats += other.stats.to(self.stats.device)

    def all_reduce(self) -> None:
        """Sums the statistics over all processes when torch.distributed is initialised (no-op otherwise).

        The statistics must be on a device the process group's backend supports (CUDA for NCCL).
        """
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.stats, op=dist.ReduceOp.SUM)

    def compute(self) -> dict:
        """{"miou", "fbiou", "pixel_acc", "mean_pixel_acc" (percent), "class_iou": {class id: percent, or None for an
        absent class}, "absent_classes": [class ids without episodes], "episodes"}; see the module docstring."""
        stats = self.stats.double().cpu()
        if stats[-1, EPISODES] > 0:
            raise ValueError(
                f"{int(stats[-1, EPISODES])} episodes had a class id outside this metric's class_ids "
                f"{list(self.class_ids)}; build FewShotIoU with the fold's classes"
            )
        per_class = stats[:-1]
        total = stats.sum(dim=0)
        present = per_class[:, EPISODES] > 0
        iou = per_class[:, I_FG] / per_class[:, U_FG].clamp_min(1)
        class_acc = (per_class[:, I_FG] + per_class[:, I_BG]) / per_class[:, LABELLED].clamp_min(1)
        fg_iou = total[I_FG] / total[U_FG].clamp_min(1)
        bg_iou = total[I_BG] / total[U_BG].clamp_min(1)
        has = present.tolist()
        return {
            "miou": 100 * iou[present].mean().item() if any(has) else 0.0,
            "fbiou": 100 * ((fg_iou + bg_iou) / 2).item(),
            "pixel_acc": 100 * ((total[I_FG] + total[I_BG]) / total[LABELLED].clamp_min(1)).item(),
            "mean_pixel_acc": 100 * class_acc[present].mean().item() if any(has) else 0.0,
            "class_iou": {c: 100 * v if p else None for c, v, p in zip(self.class_ids, iou.tolist(), has, strict=True)},
            "absent_classes": [c for c, p in zip(self.class_ids, has, strict=True) if not p],
            "episodes": int(total[EPISODES]),
        }


def predict_mask(logits: Tensor) -> Tensor:
    """Two-class logits [..., 2, H, W] -> foreground mask [..., H, W] uint8: exactly `logits.argmax(-3)` (ties go to
    background), without argmax's slow strided reduction over a size-2 dimension (about 250x slower on CPU)."""
    return (logits.select(-3, 1) > logits.select(-3, 0)).to(torch.uint8)

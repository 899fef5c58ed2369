"""Whole-dataset semantic segmentation IoU, the standard accumulation (mmseg's `IoUMetric`).

Over every image, per class c: intersection = #{pred = c and label = c}, union = #{pred = c} + #{label = c} -
intersection, counted on pixels whose label is not void (255), and summed over the dataset before dividing. IoU_c =
intersection / union; a class with an empty union (never predicted and absent from the labels) has no IoU and is
left out of the mean, as mmseg's nan-mean does. A class absent from the labels but predicted counts 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ... import distributed

VOID = 255


class SemanticIoU:
    """Accumulates per-class intersection and union over a dataset; `compute` gives mIoU and per-class IoU.

    Args:
        class_names: one name per class id 0..N-1 (the keys of `iou/<name>`).
        ignore_index: label value left out of every count.
    """

    def __init__(self, class_names: Sequence[str], ignore_index: int = VOID):
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.intersection = torch.zeros(self.num_classes, dtype=torch.float64)
        self.union = torch.zeros(self.num_classes, dtype=torch.float64)
        self.label_area = torch.zeros(self.num_classes, dtype=torch.float64)
        self.images = 0

    def update(self, pred: Tensor, label: Tensor) -> None:
        """pred [H, W] or [B, H, W] class ids in 0..N-1; label the same shape, ignore_index where void."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
        keep = label != self.ignore_index
        pred, label = pred[keep].long(), label[keep].long()
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"predictions outside 0..{self.num_classes - 1}: {pred.unique().tolist()[:10]}")
        n = self.num_classes
        hit = pred[pred == label]
        inter = torch.bincount(hit, minlength=n).double().cpu()
        area_pred = torch.bincount(pred, minlength=n).double().cpu()
        area_label = torch.bincount(label, minlength=n).double().cpu()
        self.intersection += inter
        self.union += area_pred + area_label - inter
        self.label_area += area_label
        self.images += 1 if pred.dim() <= 2 else pred.shape[0]

    def all_reduce(self) -> None:
        """Sums the counts of every process under torchrun (a no-op otherwise)."""
        if not distributed.is_distributed():
            return
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        counts = torch.stack([self.intersection, self.union, self.label_area]).to(device)
        images = torch.tensor([float(self.images)], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        dist.all_reduce(images)
        self.intersection, self.union, self.label_area = counts.cpu().unbind(0)
        self.images = int(images.item())

    def compute(self) -> dict[str, float | None]:
        """{'miou', 'aacc', 'iou/<name>' ...} in percent; a class with an empty union gets None and stays out of
        the mean; `absent` lists the classes without label pixels."""
        valid = self.union > 0
        iou = torch.where(valid, self.intersection / self.union.clamp(min=1), torch.nan)
        total = self.label_area.sum()
        out: dict[str, float | None] = {
            "miou": float(iou[valid].mean() * 100) if valid.any() else float("nan"),
            "aacc": float(self.intersection.sum() / total * 100) if total else float("nan"),
        }
        for name, value, ok in zip(self.class_names, iou.tolist(), valid.tolist(), strict=True):
            out[f"iou/{name}"] = value * 100 if ok else None
        return out

    def absent_classes(self) -> list[str]:
        """Classes without a single labelled pixel in the data seen."""
        return [name for name, area in zip(self.class_names, self.label_area.tolist(), strict=True) if area == 0]

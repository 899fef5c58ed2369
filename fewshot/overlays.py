"""PNG overlays of chosen test episodes: supports with their masks, the query with its ground truth and prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import episodes

from .cache import Encoder
from .config import Config
from .engine import autocast, encode_episodes, forward_episodes, inference_context, to_device
from .io import atomic_path
from .metrics import predict_mask

FOREGROUND = np.array([255, 64, 64], dtype=np.float32)
VOID = np.array([255, 255, 255], dtype=np.float32)


def blend(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """image [H,W,3] uint8, mask [H,W] in {0,1,255} -> image with foreground tinted red and void white."""
    out = image.astype(np.float32)
    fg, void = mask == 1, mask == 255
    out[fg] = (1 - alpha) * out[fg] + alpha * FOREGROUND
    out[void] = (1 - alpha) * out[void] + alpha * VOID
    return out.clip(0, 255).astype(np.uint8)


def save_overlays(cfg: Config, model: nn.Module, device: torch.device, out_dir: str | Path) -> list[Path]:
    """One PNG per episode index in `eval.overlays`: supports | query + ground truth | query + prediction."""
    dataset = episodes.build_test_dataset(cfg.data)
    out_dir = Path(out_dir)
    written = []
    for index in cfg.eval.overlays:
        if not 0 <= index < len(dataset):
            raise ValueError(f"eval.overlays: episode {index} does not exist; there are {len(dataset)} episodes")
        item = dataset[index]
        batch = to_device(episodes.collate_episodes([item]), device)
        with inference_context(model), autocast(cfg.eval.amp, device):
            query_feats, support_feats = encode_episodes(Encoder(model), batch)  # the test path, uncached
            logits = forward_episodes(model, batch, query_feats, support_feats)
        pred = predict_mask(logits)[0].cpu().numpy()
        pixels = [image.permute(1, 2, 0).numpy() for image in item["images"]]  # (S, S, 3): query, then supports
        target = item["query_mask"].numpy().astype(np.uint8)
        panels = [
            blend(image, m.numpy().astype(np.uint8)) for image, m in zip(pixels[1:], item["support_masks"], strict=True)
        ]
        query = pixels[0]
        panels += [blend(query, target), blend(query, pred)]
        path = out_dir / f"episode{index:05d}_class{item['class_id']}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(np.concatenate(panels, axis=1)).save(tmp, format="PNG")
        written.append(path)
    return written

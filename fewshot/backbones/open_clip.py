"""open_clip image towers (CLIP ViT-B/16, ViT-L/14, ...) as dense multi-layer backbones.

The features of layer i are the tokens after residual block i of the visual transformer, the CLS token dropped,
reshaped to [N, width, H/p, W/p]: before `ln_post` and `proj`, so not in the joint image-text space (the zero-shot
code in fewshot/zeroshot projects them itself). Any input size works: the image is resized to the nearest multiple of
the patch (see `prepare_images`) and the positional embedding is interpolated bicubically on its grid, the CLS
position kept. Patch dropout is never applied: dense features need every token.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.backbones.base import Backbone, prepare_images, resolve_layers
from fewshot.backbones.weights import create_open_clip_model, parse_weights, weights_identity

logger = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def interpolate_pos_embed(pos: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """pos [1 + g0*g1, D] on grid (g0, g1) -> [1 + h*w, D] for size (h, w).

    Bicubic on the grid with antialiasing, the CLS row kept: as open_clip resizes a checkpoint's embedding.
    """
    if tuple(grid) == tuple(size):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_pos = patch_pos.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)  # (1, D, g0, g1)
    patch_pos = F.interpolate(patch_pos.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    patch_pos = patch_pos.to(pos.dtype)
    patch_pos = patch_pos.flatten(2).transpose(1, 2)[0]  # (h * w, D)
    return torch.cat([cls_pos, patch_pos], dim=0)


class OpenClipBackbone(Backbone):
    """Dense multi-layer features of an open_clip ViT image tower; see the module docstring.

    Args:
        name: open_clip model name (`ViT-B-16`, `ViT-L-14`, `ViT-B-16-quickgelu`).
        pretrained: `none`, an open_clip tag (`openai`: QuickGELU is chosen), `hf-hub:org/repo` or a local file.
        layers: residual-block indices; negative ones count from the end. Output is in ascending order.
        frozen: no gradients and eval mode whatever `train()` is called with.
    """

    def __init__(
        self, name: str, pretrained: str = "none", layers: list[int] | None = None, frozen: bool = True
    ) -> None:
        super().__init__()
        from open_clip.transformer import VisionTransformer

        layers = [-4, -3, -2, -1] if layers is None else list(layers)
        clip = create_open_clip_model(name, pretrained)
        visual = clip.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"open_clip model {name} has a {type(visual).__name__} image tower; dense features need open_clip's "
                "VisionTransformer tower (ViT-B-16, ViT-L-14, ...)"
            )
        self.visual = visual  # the text tower is dropped with `clip`
        height, width = visual.patch_size
        if height != width:
            raise ValueError(f"open_clip model {name} has a non-square patch {height}x{width}, which is not supported")
        self.patch_size = height
        blocks = visual.transformer.resblocks
        self.indices = resolve_layers(layers, len(blocks), f"open_clip model {name} ({len(blocks)} blocks)")
        visual.transformer.resblocks = blocks[: self.indices[-1] + 1]  # only the blocks needed run
        self.feature_info = [
            {"num_chs": visual.transformer.width, "reduction": height, "index": i} for i in self.indices
        ]
        preprocess = getattr(visual, "preprocess_cfg", {})
        self.mean = tuple(preprocess.get("mean", OPENAI_MEAN))
        self.std = tuple(preprocess.get("std", OPENAI_STD))
        weights = weights_identity(parse_weights(pretrained))
        self.identity = f"open_clip:{name}|{weights}|{','.join(map(str, self.indices))}"
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
        self.train(False)

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Normalised images [N, 3, H, W] -> tokens [N, 1 + h*w, D] after ln_pre, and the grid (h, w)."""
        visual = self.visual
        x = visual.conv1(x)  # (N, D, h, w)
        n, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (N, h * w, D)
        cls = visual.class_embedding.to(x.dtype).expand(n, 1, d)
        pos = interpolate_pos_embed(visual.positional_embedding, visual.grid_size, (h, w))
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)  # (N, 1 + h * w, D)
        return visual.ln_pre(x), (h, w)

    def forward_intermediates(self, images: Tensor) -> list[Tensor]:
        """images [N, 3, H, W] (uint8 or [0, 1]) -> per selected block [N, width, H'/p, W'/p] (H' as prepared)."""
        transformer = self.visual.transformer
        x = prepare_images(images, self.mean, self.std, self.patch_size, dtype=self.visual.conv1.weight.dtype)
        x, (h, w) = self._embed(x)
        batch_first = getattr(transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)  # older open_clip runs the blocks as (L, N, D)
        features = []
        for i, block in enumerate(transformer.resblocks):
            x = block(x)
            if i in self.indices:
                tokens = x if batch_first else x.transpose(0, 1)  # (N, 1 + h * w, D)
                features.append(tokens[:, 1:].reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous())
        return features

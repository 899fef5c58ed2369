"""open_clip CLIP models (ViT-B/16, ViT-L/14, ...) as dense multi-layer backbones that keep their text tower.

The features of layer i are the tokens after residual block i of the visual transformer, the CLS token dropped,
reshaped to [N, width, H/p, W/p]: before `ln_post` and `proj`, so not in the joint image-text space (the zero-shot
code in fewshot/zeroshot projects them itself). Any input size works: the image is resized to the nearest multiple of
the patch (see `prepare_images`) and the positional embedding is resampled on its grid (`resample_pos_embed`), the
CLS position kept. Patch dropout is never applied: dense features need every token.

The tower's last block can be replaced (`last_block`: a function of the block, its input tokens and the patch grid),
which is how the training-free dense CLIP methods are built (fewshot/zeroshot/dense_clip.py). The text tower of the
same CLIP model stays with the backbone, outside its parameters and state dict, for heads and segmenters that embed
class names (`encode_text`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.backbones.base import Backbone, prepare_images, resolve_layers
from fewshot.backbones.weights import create_open_clip_model, parse_weights, weights_identity
from fewshot.text import ClassEmbeddings, TextEncoder

logger = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the CLIP statistics, when a model carries no preprocess_cfg
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
POS_EMBED_STYLES = ("open_clip", "dino", "size")

LastBlock = Callable[[nn.Module, Tensor, tuple[int, int]], Tensor]  # (block, tokens [N, 1 + h*w, D], (h, w)) -> tokens


def resample_pos_embed(pos: Tensor, grid: tuple[int, int], size: tuple[int, int], style: str = "open_clip") -> Tensor:
    """pos [1 + g0*g1, D] on grid (g0, g1) -> [1 + h*w, D] for the patch grid `size` (h, w), the CLS row kept.

    Styles (both bicubic, align_corners=False):
        open_clip: to the size with antialiasing, as open_clip resizes a checkpoint's embedding (`resize_pos_embed`).
        dino: DINO's `interpolate_pos_encoding`, which SCLIP, NACLIP and ClearCLIP use: scale factors
            ((h + 0.1) / g0, (w + 0.1) / g1), so the sampling positions follow the factor, and no antialiasing.
        size: to the size without antialiasing, as MaskCLIP's mmseg ViT (`resize_pos_embed`) does.
    """
    if style not in POS_EMBED_STYLES:
        raise KeyError(f"unknown position-embedding style {style!r}; choose from {list(POS_EMBED_STYLES)}")
    if tuple(grid) == tuple(size):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_pos = patch_pos.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2).float()  # (1, D, g0, g1)
    if style in ("open_clip", "size"):
        antialias = style == "open_clip"
        patch_pos = F.interpolate(patch_pos, size=size, mode="bicubic", align_corners=False, antialias=antialias)
    else:
        factor = ((size[0] + 0.1) / grid[0], (size[1] + 0.1) / grid[1])
        patch_pos = F.interpolate(patch_pos, scale_factor=factor, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(pos.dtype).flatten(2).transpose(1, 2)[0]  # (h * w, D)
    return torch.cat([cls_pos, patch_pos], dim=0)


class OpenClipBackbone(Backbone):
    """Dense multi-layer features of an open_clip ViT image tower; see the module docstring.

    Args:
        name: open_clip model name (`ViT-B-16`, `ViT-L-14`, `ViT-B-16-quickgelu`).
        pretrained: `none`, an open_clip tag (`openai`: QuickGELU is chosen), `hf-hub:org/repo` or a local file.
        layers: residual-block indices; negative ones count from the end. Output is in ascending order.
        frozen: no gradients and eval mode whatever `train()` is called with.
        last_block: replaces the tower's final block (which `layers` must then include); None runs it as trained.
        pos_embed: how the position embedding is resampled for other grids (`resample_pos_embed` styles).
    """

    def __init__(
        self,
        name: str,
        pretrained: str = "none",
        layers: list[int] | None = None,
        frozen: bool = True,
        last_block: LastBlock | None = None,
        pos_embed: str = "open_clip",
    ) -> None:
        super().__init__()
        import open_clip
        from open_clip.transformer import VisionTransformer

        if pos_embed not in POS_EMBED_STYLES:
            raise KeyError(f"unknown position-embedding style {pos_embed!r}; choose from {list(POS_EMBED_STYLES)}")
        layers = [-4, -3, -2, -1] if layers is None else list(layers)
        clip = create_open_clip_model(name, pretrained)
        visual = clip.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"open_clip model {name} has a {type(visual).__name__} image tower; dense features need open_clip's "
                "VisionTransformer tower (ViT-B-16, ViT-L-14, ...)"
            )
        self.visual = visual
        del clip.visual  # what remains of `clip` is its text tower
        height, width = visual.patch_size
        if height != width:
            raise ValueError(f"open_clip model {name} has a non-square patch {height}x{width}, which is not supported")
        self.name, self.patch_size, self.pos_embed = name, height, pos_embed
        blocks = visual.transformer.resblocks
        self.indices = resolve_layers(layers, len(blocks), f"open_clip model {name} ({len(blocks)} blocks)")
        if last_block is not None and self.indices[-1] != len(blocks) - 1:
            raise ValueError(f"a replaced last block needs layers that include the final block {len(blocks) - 1}")
        visual.transformer.resblocks = blocks[: self.indices[-1] + 1]  # only the blocks needed run
        self.last_block = last_block
        self.feature_info = [
            {"num_chs": visual.transformer.width, "reduction": height, "index": i} for i in self.indices
        ]
        preprocess = getattr(visual, "preprocess_cfg", {})
        self.mean = tuple(preprocess.get("mean", OPENAI_MEAN))
        self.std = tuple(preprocess.get("std", OPENAI_STD))
        source = parse_weights(pretrained)
        self.weights = weights_identity(source)
        tokenizer = open_clip.get_tokenizer(f"hf-hub:{source.value}" if source.kind == "hf-hub" else name)
        self.text = TextEncoder(clip, tokenizer, f"{name}|{self.weights}")  # a plain attribute: not a submodule
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
        self.train(False)

    @property
    def identity(self) -> str:
        """`open_clip:<name>|<weights>|<layers>`, plus the resampling style and last block when not the defaults."""
        identity = f"open_clip:{self.name}|{self.weights}|{','.join(map(str, self.indices))}"
        if self.pos_embed != "open_clip":
            identity += f"|pos:{self.pos_embed}"
        if self.last_block is not None:
            identity += f"|last:{getattr(self.last_block, '__name__', type(self.last_block).__name__)}"
        return identity

    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text space (`visual.proj` maps the tower's width to it)."""
        return self.visual.proj.shape[1]

    def encode_text(
        self, classes: Sequence[str | Sequence[str]], templates: str | Sequence[str] | None = None
    ) -> ClassEmbeddings:
        """Class names (synonyms allowed) through this CLIP's text tower: one L2-normalised row per synonym, on the
        CPU. The tower runs on this backbone's device (it visits there for the call) and results are cached."""
        return self.text.encode(classes, templates, device=self.visual.conv1.weight.device)

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Normalised images [N, 3, H, W] -> tokens [N, 1 + h*w, D] after ln_pre, and the grid (h, w)."""
        visual = self.visual
        x = visual.conv1(x)  # (N, D, h, w)
        n, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (N, h * w, D)
        cls = visual.class_embedding.to(x.dtype).expand(n, 1, d)
        pos = resample_pos_embed(visual.positional_embedding, visual.grid_size, (h, w), self.pos_embed)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)  # (N, 1 + h * w, D)
        return visual.ln_pre(x), (h, w)

    def forward_intermediates(self, images: Tensor) -> list[Tensor]:
        """images [N, 3, H, W] (uint8 or [0, 1]) -> per selected block [N, width, H'/p, W'/p] (H' as prepared)."""
        transformer = self.visual.transformer
        x = prepare_images(images, self.mean, self.std, self.patch_size, dtype=self.visual.conv1.weight.dtype)
        x, grid = self._embed(x)  # (N, 1 + h * w, D)
        last = len(transformer.resblocks) - 1
        features = []
        for i, block in enumerate(transformer.resblocks):
            if i == last and self.last_block is not None:
                x = self.last_block(block, x, grid)
            else:
                x = run_block(block, x)
            if i in self.indices:
                features.append(x[:, 1:].reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous())
        return features


def run_block(block: nn.Module, x: Tensor) -> Tensor:
    """An open_clip residual block on batch-first tokens [N, L, D] (older open_clip runs its blocks as [L, N, D])."""
    if getattr(block.attn, "batch_first", True):
        return block(x)
    return block(x.transpose(0, 1)).transpose(0, 1)

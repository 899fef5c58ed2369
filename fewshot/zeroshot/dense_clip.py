"""Dense CLIP features for training-free zero-shot segmentation (MaskCLIP, SCLIP, ClearCLIP, NACLIP).

The published methods keep every block of an open_clip ViT but the last, whose self-attention they replace; then
`ln_post` and `proj` map every patch token into the joint image-text space. With `x` the last block's input,
`y = ln_1(x)`, `q, k, v` the in-projections of `y` per head and `s = head_dim ** -0.5`:

    vanilla    x + ls_1(attn(y)),                                   then + ls_2(mlp(ln_2(.)))
    maskclip   x + ls_1(out_proj(v)),                               then + ls_2(mlp(ln_2(.)))
    sclip      x + ls_1(out_proj((softmax(q q^T s) + softmax(k k^T s)) v)),  then + ls_2(mlp(ln_2(.)))
    clearclip  ls_1(out_proj(softmax(q q^T s) v))                   (no residual, no FFN)
    naclip     ls_1(out_proj(softmax(k k^T s + G) v))               (no residual, no FFN)

G is NACLIP's Gaussian neighbourhood prior, exp(-|p_i - p_j|^2 / (2 std^2)) over patch grid positions, zero on the
class token's row and column.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..text import TextEncoder

log = logging.getLogger(__name__)

METHODS = ("vanilla", "maskclip", "sclip", "clearclip", "naclip")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class DenseCLIP(nn.Module):
    """A frozen open_clip ViT whose last block is replaced by a dense-prediction variant.

    Args:
        name: open_clip model name (ViT-B-16, ViT-B-16-quickgelu, ViT-L-14, ...).
        pretrained: weights tag, hf-hub:org/repo, local file, or "none" (random: the masks are meaningless).
        method: vanilla | maskclip | sclip | clearclip | naclip.
        naclip_std: standard deviation, in patches, of NACLIP's Gaussian prior.
    """

    def __init__(
        self, name: str = "ViT-B-16", pretrained: str = "none", method: str = "sclip", naclip_std: float = 5.0
    ):
        super().__init__()
        if method not in METHODS:
            raise KeyError(f"unknown dense CLIP method {method!r}; choose from {list(METHODS)}")
        import open_clip

        from ..backbones.weights import create_open_clip_model, is_random

        self.name, self.pretrained, self.method, self.naclip_std = name, pretrained, method, naclip_std
        self.model = create_open_clip_model(name, pretrained).eval().requires_grad_(False)
        self.random_weights = is_random(pretrained)
        if self.random_weights:
            log.warning("DenseCLIP %s has random weights (pretrained=none): its masks are meaningless", name)
        visual = self.model.visual
        _check_supported(visual, name)
        self.patch_size: tuple[int, int] = tuple(visual.patch_size)
        self.num_heads = visual.transformer.resblocks[-1].attn.num_heads
        mean = getattr(visual, "image_mean", None) or OPENAI_MEAN
        std = getattr(visual, "image_std", None) or OPENAI_STD
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.text = TextEncoder(self.model, open_clip.get_tokenizer(name), f"{name}|{pretrained}")
        self._pos_cache: dict[tuple, Tensor] = {}

    @property
    def identity(self) -> str:
        return f"dense_clip:{self.method}|{self.name}|{self.pretrained}"

    @property
    def embed_dim(self) -> int:
        return self.model.visual.proj.shape[1]

    def train(self, mode: bool = True) -> DenseCLIP:
        """The CLIP model is frozen: it stays in eval mode."""
        return super().train(False)

    def encode_text(self, class_names: Sequence[str], templates: str | Sequence[str] | None = None) -> Tensor:
        """One L2-normalised embedding per name [N, D] on the model's device; templates: None / "imagenet" = CLIP's
        80, "single", or a list of "{}" strings. Names are used as given (see `fewshot.text` for synonyms)."""
        return self.text.encode_names(class_names, templates).to(self.mean.device)

    def resampled_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Position embeddings [1 + h*w, width] for a patch grid (h, w): bicubic with antialiasing, as open_clip's
        `resize_pos_embed`; the class token's embedding is kept."""
        pos = self.model.visual.positional_embedding
        key = (grid, pos.device, pos.dtype, pos.data_ptr())
        if key not in self._pos_cache:
            cls_pos, patch_pos = pos[:1], pos[1:]
            side = math.isqrt(patch_pos.shape[0])
            if tuple(grid) != (side, side):
                patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # (1, width, side, side)
                patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", antialias=True, align_corners=False)
                patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
            self._pos_cache[key] = torch.cat([cls_pos, patch_pos]).detach()
        return self._pos_cache[key]

    def encode_image_dense(self, images: Tensor) -> Tensor:
        """images [B,3,H,W] float in [0,1] (or uint8), H and W multiples of the patch -> features [B,D,H/p,W/p],
        L2-normalised in the joint image-text space (class token dropped)."""
        B, _, H, W = images.shape
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {ph}x{pw}; resize or pad first")
        visual = self.model.visual
        dtype = visual.conv1.weight.dtype
        if images.dtype == torch.uint8:
            images = images.float() / 255
        x = ((images.float() - self.mean) / self.std).to(dtype)
        grid = (H // ph, W // pw)
        x = visual.conv1(x).flatten(2).transpose(1, 2)  # (B, h*w, width)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1) + self.resampled_pos_embed(grid).to(x.dtype)  # (B, 1 + h*w, width)
        x = visual.ln_pre(visual.patch_dropout(x))
        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        for block in blocks[:-1]:
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        if self.method == "vanilla":
            x = blocks[-1](x) if batch_first else blocks[-1](x.transpose(0, 1)).transpose(0, 1)
        else:
            x = self._last_block(blocks[-1], x, grid)
        tokens = visual.ln_post(x[:, 1:]) @ visual.proj  # (B, h*w, D)
        tokens = F.normalize(tokens.float(), dim=-1)
        return tokens.transpose(1, 2).reshape(B, -1, *grid)  # (B, D, h, w)

    def forward(self, images: Tensor) -> Tensor:
        return self.encode_image_dense(images)

    def _last_block(self, block: nn.Module, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """The method's replacement of the last ResidualAttentionBlock; x [B, L, width] batch-first."""
        attn: nn.MultiheadAttention = block.attn
        B, L, C = x.shape
        y = block.ln_1(x)
        q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)  # each (B, L, C)
        if self.method == "maskclip":
            out = attn.out_proj(v)
        else:
            heads = self.num_heads
            q, k, v = (t.reshape(B, L, heads, C // heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, hd)
            scale = (C // heads) ** -0.5
            if self.method == "sclip":
                weights = (q @ q.transpose(-2, -1) * scale).softmax(-1) + (k @ k.transpose(-2, -1) * scale).softmax(-1)
            elif self.method == "clearclip":
                weights = (q @ q.transpose(-2, -1) * scale).softmax(-1)
            else:  # naclip
                prior = self._neighbourhood_prior(grid, x.device, x.dtype)
                weights = (k @ k.transpose(-2, -1) * scale + prior).softmax(-1)
            out = attn.out_proj((weights @ v).transpose(1, 2).reshape(B, L, C))  # (B, L, C)
        if self.method in ("clearclip", "naclip"):
            return block.ls_1(out)
        x = x + block.ls_1(out)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def _neighbourhood_prior(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
        """NACLIP's Gaussian window [1 + h*w, 1 + h*w], zero for the class token."""
        ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).double()  # (h*w, 2)
        gauss = torch.exp(-torch.cdist(pos, pos).square() / (2 * self.naclip_std**2))
        return F.pad(gauss, (1, 0, 1, 0)).to(device=device, dtype=dtype)


def _check_supported(visual: nn.Module, name: str) -> None:
    """DenseCLIP needs open_clip's own VisionTransformer with a class token and a standard last block."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"open_clip model {name} has a {type(visual).__name__} image tower; DenseCLIP needs a ViT such as "
            "ViT-B-16 or ViT-L-14"
        )
    if visual.attn_pool is not None or visual.proj is None:
        raise ValueError(f"open_clip model {name} pools with attention or has no projection; use a CLIP ViT")
    last = visual.transformer.resblocks[-1]
    if type(last) is not ResidualAttentionBlock or not isinstance(last.attn, nn.MultiheadAttention):
        raise ValueError(
            f"open_clip model {name} uses {type(last).__name__} blocks (qk-norm or scaled attention); DenseCLIP "
            "supports the standard ResidualAttentionBlock of ViT-B-16 / ViT-L-14 style models"
        )

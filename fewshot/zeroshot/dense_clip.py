"""Dense CLIP features for training-free zero-shot segmentation (MaskCLIP, SCLIP, ClearCLIP, NACLIP).

The published methods keep every block of an open_clip ViT but the last, whose self-attention they replace; then
`ln_post` and `proj` map every patch token into the joint image-text space. A `DenseCLIP` is therefore the open_clip
backbone (fewshot/backbones/open_clip.py) with its last block taken from `LAST_BLOCKS`, plus that projection: adding a
method is adding a function here. With `x` the last block's input, `y = ln_1(x)`, `q, k, v` the in-projections of
`y` per head and `s = head_dim ** -0.5`:

    vanilla    x + ls_1(attn(y)),                                   then + ls_2(mlp(ln_2(.)))
    maskclip   x + ls_1(out_proj(v)),                               then + ls_2(mlp(ln_2(.)))
    sclip      x + ls_1(out_proj((softmax(q q^T s) + softmax(k k^T s)) v)),  then + ls_2(mlp(ln_2(.)))
    clearclip  ls_1(out_proj(softmax(q q^T s) v))                   (no residual, no FFN)
    naclip     ls_1(out_proj(softmax(k k^T s + G) v))               (no residual, no FFN)

G is NACLIP's Gaussian neighbourhood prior, exp(-|p_i - p_j|^2 / (2 std^2)) over patch grid positions (std 5 patches,
NACLIP's default), zero on the class token's row and column. On grids other than the pretraining one the position
embedding is resampled as SCLIP, NACLIP and ClearCLIP do (`pos_embed="dino"`, see `resample_pos_embed`). `ls_1` /
`ls_2` are the identity in every OpenAI and OpenCLIP ViT; they are kept for models trained with layer scale.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.open_clip import LastBlock, OpenClipBackbone, run_block
from ..backbones.weights import is_random
from ..config import ZeroShotConfig
from ..text import ClassEmbeddings

log = logging.getLogger(__name__)


def _heads(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of the block's attention for tokens x [B, L, C], each [B, heads, L, head_dim]."""
    attn: nn.MultiheadAttention = block.attn
    B, L, C = x.shape
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (B, L, 3C)
    q, k, v = qkv.reshape(B, L, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)  # (B, heads, L, hd)
    return q, k, v


def _attend(block: nn.Module, weights: Tensor, v: Tensor) -> Tensor:
    """out_proj(weights @ v) with weights [B, heads, L, L], v [B, heads, L, hd] -> [B, L, C]."""
    out = (weights @ v).transpose(1, 2).flatten(2)  # (B, L, C)
    return block.attn.out_proj(out)


def _residual_ffn(block: nn.Module, x: Tensor, out: Tensor) -> Tensor:
    """The block's own residual and FFN around a replaced attention output."""
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _self_attention(t: Tensor) -> Tensor:
    return (t @ t.transpose(-2, -1) * t.shape[-1] ** -0.5).softmax(-1)  # (B, heads, L, L)


def vanilla(block: nn.Module, x: Tensor, grid: tuple[int, int]) -> Tensor:
    """CLIP's own last block (qk attention, residual, FFN)."""
    return run_block(block, x)


def maskclip(block: nn.Module, x: Tensor, grid: tuple[int, int]) -> Tensor:
    """MaskCLIP: the value path only (identity attention), residual and FFN kept."""
    attn: nn.MultiheadAttention = block.attn
    C = x.shape[-1]
    v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * C :], attn.in_proj_bias[2 * C :])  # (B, L, C)
    return _residual_ffn(block, x, attn.out_proj(v))


def sclip(block: nn.Module, x: Tensor, grid: tuple[int, int]) -> Tensor:
    """SCLIP: correlative self-attention softmax(q q^T) + softmax(k k^T), residual and FFN kept."""
    q, k, v = _heads(block, x)
    return _residual_ffn(block, x, _attend(block, _self_attention(q) + _self_attention(k), v))


def clearclip(block: nn.Module, x: Tensor, grid: tuple[int, int]) -> Tensor:
    """ClearCLIP: q-q attention, no residual, no FFN."""
    q, _, v = _heads(block, x)
    return block.ls_1(_attend(block, _self_attention(q), v))


def naclip(block: nn.Module, x: Tensor, grid: tuple[int, int], std: float = 5.0) -> Tensor:
    """NACLIP: k-k attention plus a Gaussian neighbourhood prior of `std` patches, no residual, no FFN."""
    _, k, v = _heads(block, x)
    logits = k @ k.transpose(-2, -1) * k.shape[-1] ** -0.5 + neighbourhood_prior(grid, std).to(k)
    return block.ls_1(_attend(block, logits.softmax(-1), v))


@functools.lru_cache(maxsize=16)
def neighbourhood_prior(grid: tuple[int, int], std: float) -> Tensor:
    """NACLIP's Gaussian window [1 + h*w, 1 + h*w] over patch positions, zero for the class token (CPU, float64)."""
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).double()  # (h*w, 2)
    with torch.inference_mode(False):  # a normal tensor, usable in and outside inference mode
        return F.pad(torch.exp(-torch.cdist(pos, pos).square() / (2 * std**2)), (1, 0, 1, 0))


LAST_BLOCKS: dict[str, LastBlock] = {
    "vanilla": vanilla,
    "maskclip": maskclip,
    "sclip": sclip,
    "clearclip": clearclip,
    "naclip": naclip,
}


def last_block(method: str) -> LastBlock:
    """The last-block function of a method name; an unknown name lists the valid ones."""
    if method not in LAST_BLOCKS:
        raise KeyError(f"unknown dense CLIP method {method!r}; choose from {list(LAST_BLOCKS)}")
    return LAST_BLOCKS[method]


def open_clip_model_name(backbone: str, key: str = "zeroshot.backbone") -> str:
    """'open_clip:ViT-B-16' -> 'ViT-B-16'; another family, or no family, is an error naming `key`."""
    family, sep, name = backbone.partition(":")
    if family != "open_clip" or not sep or not name:
        raise ValueError(
            f"{key}={backbone!r}: dense CLIP needs an open_clip model written open_clip:<model>, e.g. "
            "open_clip:ViT-B-16 (open_clip:ViT-B-16-quickgelu for OpenAI weights in a local file)"
        )
    return name


class DenseCLIP(nn.Module):
    """A frozen open_clip ViT whose last block is a dense-prediction variant: images -> [B, D, h, w] in the joint
    image-text space, L2-normalised; `encode_text` embeds class names with the same CLIP's text tower.

    Args:
        name: open_clip model name (ViT-B-16, ViT-B-16-quickgelu, ViT-L-14, ...).
        pretrained: weights tag, hf-hub:org/repo, local file, or "none" (random: the masks are meaningless).
        method: a key of LAST_BLOCKS (vanilla | maskclip | sclip | clearclip | naclip); `method` can be reassigned.
        pos_embed: position-embedding resampling for other grids: "dino" as SCLIP / NACLIP / ClearCLIP, "size" as
            MaskCLIP, or "open_clip" (see fewshot.backbones.open_clip.resample_pos_embed).
    """

    def __init__(self, name: str, pretrained: str = "none", method: str = "sclip", pos_embed: str = "dino"):
        super().__init__()
        block = last_block(method)
        self.backbone = OpenClipBackbone(name, pretrained, layers=[-1], last_block=block, pos_embed=pos_embed)
        _check_supported(self.backbone.visual, name)
        self._method = method
        self.name, self.pretrained = name, pretrained
        self.backbone_name = f"open_clip:{name}"
        self.patch_size = self.backbone.patch_size
        self.mean = self.backbone.mean  # the normalisation's mean colour in [0, 1] (padding uses it)
        self.random_weights = is_random(pretrained)
        if self.random_weights:
            log.warning("DenseCLIP %s has random weights (pretrained=none): its masks are meaningless", name)

    @classmethod
    def from_config(cls, cfg: ZeroShotConfig) -> DenseCLIP:
        """The DenseCLIP of `zeroshot.backbone` (open_clip:<model>), `zeroshot.pretrained` and `zeroshot.method`."""
        return cls(open_clip_model_name(cfg.backbone), cfg.pretrained, cfg.method)

    @property
    def method(self) -> str:
        return self._method

    @method.setter
    def method(self, method: str) -> None:
        self.backbone.last_block = last_block(method)
        self._method = method

    @property
    def identity(self) -> str:
        return f"{self.method}|{self.backbone.identity}"

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def train(self, mode: bool = True) -> DenseCLIP:
        """The CLIP model is frozen: it stays in eval mode."""
        return super().train(False)

    def encode_text(
        self, classes: Sequence[str | Sequence[str]], templates: str | Sequence[str] | None = None
    ) -> ClassEmbeddings:
        """Class names with synonyms -> one L2-normalised embedding row per synonym (see OpenClipBackbone)."""
        return self.backbone.encode_text(classes, templates)

    def forward(self, images: Tensor) -> Tensor:
        """images [B,3,H,W] float in [0,1] (or uint8), H and W multiples of the patch -> features [B,D,H/p,W/p],
        L2-normalised in the joint image-text space (class token dropped)."""
        H, W = images.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}; crop, resize or pad first")
        (tokens,) = self.backbone(images)  # (B, width, h, w) after the method's last block
        visual = self.backbone.visual
        features = visual.ln_post(tokens.permute(0, 2, 3, 1)) @ visual.proj  # (B, h, w, D): per token
        return F.normalize(features.float(), dim=-1).permute(0, 3, 1, 2)  # (B, D, h, w)


def _check_supported(visual: nn.Module, name: str) -> None:
    """DenseCLIP needs a class token, a projection and the standard last block of open_clip's ViT."""
    from open_clip.transformer import ResidualAttentionBlock

    if visual.attn_pool is not None or visual.proj is None:
        raise ValueError(f"open_clip model {name} pools with attention or has no projection; use a CLIP ViT")
    last = visual.transformer.resblocks[-1]
    if type(last) is not ResidualAttentionBlock or not isinstance(last.attn, nn.MultiheadAttention):
        raise ValueError(
            f"open_clip model {name} uses {type(last).__name__} blocks (qk-norm or scaled attention); DenseCLIP "
            "supports the standard ResidualAttentionBlock of ViT-B-16 / ViT-L-14 style models"
        )

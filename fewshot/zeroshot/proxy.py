"""ProxyCLIP (Lan et al., ECCV 2024; mc-lan/ProxyCLIP): a vision foundation model's features as the attention of
CLIP's last block.

CLIP runs its first L-1 blocks unchanged. For the last one, with `y = ln_1(x)` and `v` its value projection per head,
the attention comes from the VFM (DINO ViT-B/8 by default, through timm) on the same crop, ImageNet-normalised:
with `f` the L2-normalised last-layer patch features of the VFM (after its final norm, on its own patch grid h' x w'),

    S = f f^T;  A = softmax_row(mask((S - beta * mean(S)) * gamma)),  entries below 0 masked out (-inf)
    out = out_proj(A @ upsample(v))   (v's patch tokens resized bilinearly from CLIP's grid to h' x w'; no residual,
                                       no FFN, no class token)

then `ln_post` and `proj` on every token, as the official `custom_attn` does; beta 1.2 and gamma 3.0 are its
defaults. The features come out on the VFM's grid. Crops are padded to a multiple of 56 (the common multiple of the
8, 14 and 16 pixel patches) centred, as the official `forward_slide` does (`remainder="centre"` with patch 56).
Position embeddings: CLIP's with DINO's (n + 0.1) / 14 resampling as the official code; the VFM's as timm resamples
them (the official torch.hub DINO uses its own +0.1 variant: a difference on grids other than the VFM's 28 x 28).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import prepare_images
from ..backbones.open_clip import run_block
from ..text import ClassEmbeddings
from .dense_clip import DenseCLIP, open_clip_model_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_MULTIPLE = 56  # ProxyCLIP pads every crop to a multiple of 56 pixels


def proxy_attention(
    block: nn.Module, x: Tensor, grid: tuple[int, int], vfm_features: Tensor, beta: float = 1.2, gamma: float = 3.0
) -> Tensor:
    """ProxyCLIP's last block.

    Args:
        block: CLIP's last residual block; x: its input tokens [B, 1 + h*w, C]; grid: CLIP's patch grid (h, w).
        vfm_features: [B, E, h', w'] the VFM's patch features.

    Returns:
        tokens [B, h'*w', C] on the VFM grid (no class token), before ln_post.
    """
    attn: nn.MultiheadAttention = block.attn
    B, _, C = x.shape
    heads, (H, W) = attn.num_heads, vfm_features.shape[-2:]
    v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * C :], attn.in_proj_bias[2 * C :])[:, 1:]  # (B, h*w, C)
    v = v.reshape(B, *grid, heads, C // heads).permute(0, 3, 4, 1, 2).flatten(0, 1)  # (B*heads, hd, h, w)
    v = F.interpolate(v, size=(H, W), mode="bilinear", align_corners=False)
    v = v.flatten(2).transpose(1, 2).unflatten(0, (B, heads))  # (B, heads, H*W, hd)
    f = F.normalize(vfm_features.flatten(2).to(v.dtype), dim=1)  # (B, E, H*W)
    similarity = f.transpose(1, 2) @ f  # (B, H*W, H*W)
    similarity = (similarity - similarity.mean(dim=(1, 2), keepdim=True) * beta) * gamma
    weights = similarity.masked_fill(similarity < 0, float("-inf")).softmax(-1)  # (B, H*W, H*W)
    out = (weights.unsqueeze(1) @ v).transpose(1, 2).flatten(2)  # (B, H*W, C)
    return attn.out_proj(out)


class ProxyCLIP(nn.Module):
    """CLIP with ProxyCLIP's last block driven by a timm VFM: images -> [B, D, h', w'] on the VFM grid.

    Args:
        name / pretrained: the open_clip CLIP (as DenseCLIP); vfm / vfm_pretrained: a timm ViT name (DINO B/8:
        vit_base_patch8_224.dino; DINOv2: vit_base_patch14_reg4_dinov2.lvd142m) and whether to load its weights.
    """

    patch_size = PAD_MULTIPLE

    def __init__(
        self, name: str, pretrained: str = "none", vfm: str = "vit_base_patch8_224.dino", vfm_pretrained: bool = False,
        beta: float = 1.2, gamma: float = 3.0,
    ):  # fmt: skip
        super().__init__()
        import timm

        self.clip = DenseCLIP(name, pretrained, "vanilla")
        self.vfm = timm.create_model(vfm, pretrained=vfm_pretrained, num_classes=0, dynamic_img_size=True)
        self.vfm.requires_grad_(False)
        self.vfm_name, self.beta, self.gamma = vfm, beta, gamma
        self.mean = self.clip.mean

    @classmethod
    def from_names(cls, backbone: str, pretrained: str, vfm: str, **kwargs) -> ProxyCLIP:
        return cls(open_clip_model_name(backbone), pretrained, vfm, vfm_pretrained=pretrained != "none", **kwargs)

    @property
    def identity(self) -> str:
        return f"proxyclip|{self.clip.backbone.identity}|vfm:{self.vfm_name}|b{self.beta:g}|g{self.gamma:g}"

    def train(self, mode: bool = True) -> ProxyCLIP:
        return super().train(False)

    def encode_text(self, classes: Sequence[str | Sequence[str]], templates=None) -> ClassEmbeddings:
        return self.clip.encode_text(classes, templates)

    def vfm_features(self, images: Tensor) -> Tensor:
        """images [B,3,H,W] in [0,1] -> the VFM's normalised last-layer patch features [B, E, H/p', W/p']."""
        p = self.vfm.patch_embed.patch_size[0]
        images = _floor_to(images, p)
        x = prepare_images(images, IMAGENET_MEAN, IMAGENET_STD, p, dtype=self.vfm.patch_embed.proj.weight.dtype)
        tokens = self.vfm.forward_features(x)[:, self.vfm.num_prefix_tokens :]  # (B, H'*W', E)
        return tokens.transpose(1, 2).unflatten(2, (x.shape[-2] // p, x.shape[-1] // p))

    def forward(self, images: Tensor) -> Tensor:
        """images [B,3,H,W] in [0,1] (or uint8), sides multiples of 56 -> L2-normalised [B, D, H/p', W/p']."""
        H, W = images.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of {self.patch_size}; pad it first")
        images = images.float() / 255 if images.dtype == torch.uint8 else images
        guide = self.vfm_features(images)  # (B, E, h', w')
        backbone = self.clip.backbone
        visual = backbone.visual
        images = _floor_to(images, backbone.patch_size)  # conv1 drops the remainder (56 is no multiple of 16)
        x = prepare_images(images, backbone.mean, backbone.std, backbone.patch_size, dtype=visual.conv1.weight.dtype)
        x, grid = backbone._embed(x)  # (B, 1 + h*w, C)
        blocks = visual.transformer.resblocks
        for block in blocks[:-1]:
            x = run_block(block, x)
        tokens = proxy_attention(blocks[-1], x, grid, guide, self.beta, self.gamma)  # (B, h'*w', C)
        features = visual.ln_post(tokens) @ visual.proj  # (B, h'*w', D)
        features = F.normalize(features.float(), dim=-1).transpose(1, 2)
        return features.unflatten(2, tuple(guide.shape[-2:]))  # (B, D, h', w')


def _floor_to(images: Tensor, multiple: int) -> Tensor:
    """The top-left part of images [B, 3, H, W] whose sides are multiples of `multiple`, as a strided patch
    convolution reads them."""
    H, W = images.shape[-2:]
    return images[..., : H - H % multiple, : W - W % multiple]

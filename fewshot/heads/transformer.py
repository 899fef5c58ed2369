"""Transformer head: query tokens attend to support tokens that carry the support mask, then a conv decoder.

Per selected backbone layer, query and support features are projected to `dim`-wide tokens and pass `depth` blocks:

- attention "masked" (DCAMA): query tokens cross-attend to the support tokens of all K shots at once (one set of
  K x h x w keys). Keys are the support appearance; values add a learned foreground / background embedding weighted by
  the mask. The attention-weighted sum of the support foreground weights gives one foreground map per head and block.
- attention "prototype" (FPTrans / APM): a background and a foreground prototype token are pooled from the support
  tokens (masked average pooling, averaged over the shots holding the region). Each block lets the prototypes attend
  to the query (adapting them to it), then the query attend to the prototypes; the cosine similarity of the query
  tokens to the two prototypes gives two maps per block.

The maps and the final query tokens of every layer are resized to the finest grid and decoded by convolutions with one
2x upsampling into 2 logits. Both modes treat the supports as a set, so the output does not depend on their order.
Empty support foreground: masked mode sees foreground weights of 0 (foreground maps are 0); prototype mode gets the
zero vector plus the learned type embedding as foreground prototype; the output is finite in both.
Attention memory grows with (h x w) x (K x h x w) per layer: prefer stride-16 layers at large input sizes.
"""

from __future__ import annotations

from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.config import Attention, ModelConfig
from fewshot.heads.prototype import check_supports, region_weights, shot_prototypes

ATTENTIONS = get_args(Attention)


def _mlp(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, 2 * dim),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(2 * dim, dim),
        nn.Dropout(dropout),
    )


class CrossAttention(nn.Module):
    """Multi-head attention of `x` to `context` (pre-norm), optionally averaging one extra scalar per key."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm_x = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(
        self, x: Tensor, context: Tensor, value_bias: Tensor | None = None, extra: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """x [B, N, D], context [B, M, D], value_bias [B, M, D] added to the values' input, extra [B, M].

        Returns the attention output [B, N, D] and, when `extra` is given, its attention-weighted mean [B, heads, N].
        """
        B, N, D = x.shape
        M, H = context.shape[1], self.heads
        context = self.norm_context(context)
        q = self.to_q(self.norm_x(x)).view(B, N, H, D // H).transpose(1, 2)  # (B, H, N, D/H)
        k = self.to_k(context).view(B, M, H, D // H).transpose(1, 2)  # (B, H, M, D/H)
        v = self.to_v(context if value_bias is None else context + value_bias).view(B, M, H, D // H).transpose(1, 2)
        if extra is not None:
            v = torch.cat([v, extra[:, None, :, None].expand(B, H, M, 1).to(v.dtype)], dim=-1)  # (B, H, M, D/H + 1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H [+ 1])
        maps = None
        if extra is not None:
            out, maps = out[..., :-1], out[..., -1]  # (B, H, N, D/H), (B, H, N)
        return self.out(out.transpose(1, 2).reshape(B, N, D)), maps


class MaskedAttentionBlock(nn.Module):
    """DCAMA-style block: query tokens attend to mask-carrying support tokens; yields one foreground map per head."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = CrossAttention(dim, heads, dropout)
        self.mlp = _mlp(dim, dropout)
        self.fg_embed = nn.Parameter(0.02 * torch.randn(dim))
        self.bg_embed = nn.Parameter(0.02 * torch.randn(dim))

    def forward(self, query: Tensor, support: Tensor, fg: Tensor, bg: Tensor) -> tuple[Tensor, Tensor]:
        """query [B, Nq, D], support [B, Ns, D], fg / bg weights [B, Ns] -> query [B, Nq, D], maps [B, heads, Nq]."""
        mask_embed = fg[..., None] * self.fg_embed + bg[..., None] * self.bg_embed  # (B, Ns, D)
        out, maps = self.attn(query, support, value_bias=mask_embed.to(support.dtype), extra=fg)
        query = query + out
        return query + self.mlp(query), maps


class PrototypeAttentionBlock(nn.Module):
    """FPTrans / APM-style block: [bg, fg] prototype tokens and query tokens attend to each other."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.proto_attn = CrossAttention(dim, heads, dropout)  # prototypes <- query
        self.query_attn = CrossAttention(dim, heads, dropout)  # query <- prototypes
        self.mlp = _mlp(dim, dropout)

    def forward(self, query: Tensor, protos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """query [B, Nq, D], protos [B, 2, D] -> query, protos, cosine maps [B, 2, Nq]."""
        protos = protos + self.proto_attn(protos, query)[0]
        query = query + self.query_attn(query, protos)[0]
        query = query + self.mlp(query)
        maps = F.cosine_similarity(query[:, None], protos[:, :, None], dim=-1, eps=1e-8)  # (B, 2, Nq)
        return query, protos, maps


class TransformerHead(nn.Module):
    """Cross-attention between query and support tokens over several layers, then an upsampling conv decoder."""

    def __init__(
        self,
        channels: list[int],
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        attention: str = "masked",
        dropout: float = 0.0,
    ):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"model.transformer.attention={attention!r} is not valid; choose from {list(ATTENTIONS)}")
        if not channels or depth < 1 or heads < 1 or dim % heads or dim < 2:
            raise ValueError(
                f"TransformerHead needs layers (got channels {channels}), model.transformer.depth >= 1 (got {depth}) "
                f"and model.transformer.dim divisible by heads (got dim={dim}, heads={heads})"
            )
        self.attention = attention
        self.proj = nn.ModuleList(nn.Conv2d(c, dim, kernel_size=1) for c in channels)
        block = MaskedAttentionBlock if attention == "masked" else PrototypeAttentionBlock
        self.blocks = nn.ModuleList(nn.ModuleList(block(dim, heads, dropout) for _ in range(depth)) for _ in channels)
        if attention == "prototype":
            self.type_embed = nn.Parameter(0.02 * torch.randn(len(channels), 2, dim))  # [bg, fg] per layer
        maps_per_block = heads if attention == "masked" else 2
        in_channels = len(channels) * (dim + depth * maps_per_block)
        self.decoder = nn.Sequential(
            nn.Conv2d(in_channels, dim, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(dim, dim // 2, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim // 2, 2, kernel_size=1),
        )

    @classmethod
    def from_config(
        cls, model_cfg: ModelConfig, channels: list[int], class_names: dict[int, str] | None = None, text: Any = None
    ) -> TransformerHead:
        """The head `model_cfg` configures; class names and the text source are for text-conditioned heads."""
        t = model_cfg.transformer
        return cls(channels, t.dim, t.depth, t.heads, t.attention, t.dropout)

    def forward(
        self,
        query_feats: list[Tensor],
        support_feats: list[Tensor],
        support_masks: Tensor,
        class_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, 2, 2h, 2w], twice the finest feature grid.

        Args:
            query_feats: per layer [B, C_l, h_l, w_l].
            support_feats: per layer [B, S, C_l, h_l, w_l].
            support_masks: [B, S, H, W] in {0, 1, 255}.
            class_ids: unused.
        """
        check_supports(support_feats, support_masks)
        B, S = support_masks.shape[:2]
        size = max((f.shape[-2:] for f in query_feats), key=lambda s: s[0] * s[1])
        layers = []
        for layer, (query, support) in enumerate(zip(query_feats, support_feats, strict=True)):
            h, w = query.shape[-2:]
            tokens = self.proj[layer](query).flatten(2).transpose(1, 2)  # (B, h*w, D)
            support = self.proj[layer](support.flatten(0, 1)).unflatten(0, (B, S))  # (B, S, D, hs, ws)
            fg, bg = region_weights(support_masks, support.shape[-2:])  # (B, S, hs, ws) each
            maps = []
            if self.attention == "masked":
                support_tokens = support.permute(0, 1, 3, 4, 2).flatten(1, 3)  # (B, S*hs*ws, D): one set for all K
                fg, bg = fg.flatten(1), bg.flatten(1)  # (B, S*hs*ws)
                for block in self.blocks[layer]:
                    tokens, fg_maps = block(tokens, support_tokens, fg, bg)
                    maps.append(fg_maps)
            else:
                protos = torch.stack([shot_prototypes(support, bg)[0], shot_prototypes(support, fg)[0]], dim=1)
                protos = protos + self.type_embed[layer].to(protos.dtype)  # (B, 2, D)
                for block in self.blocks[layer]:
                    tokens, protos, sim_maps = block(tokens, protos)
                    maps.append(sim_maps)
            feats = torch.cat([tokens.transpose(1, 2), *maps], dim=1).view(B, -1, h, w)  # (B, D + depth*M, h, w)
            layers.append(F.interpolate(feats, size=size, mode="bilinear", align_corners=False))
        return self.decoder(torch.cat(layers, dim=1))

    def extra_repr(self) -> str:
        return f"attention={self.attention!r}"

"""SAM 2.1 (Ravi et al., 2024; facebookresearch/sam2) in transformers' `Sam2Model`: the official sizes, small presets,
the conversion of official checkpoints, and the random initialisation; fewshot.sam.weights dispatches here.

The four official sizes are the Hiera trunks of `sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml` (the trunk
defaults filled in from `sam2/modeling/backbones/hieradet.py`), as transformers' `convert_sam2_to_hf.get_config`
writes them; the prompt encoder and mask decoder are the same for every size (`SAM2Base._build_sam_heads`: 256 wide,
8 heads, MLP 2048, IoU head 256, mask-input channels 16).

An official checkpoint (`sam2.1_hiera_large.pt`: `{"model": state_dict}`) holds the video model; only the image path
(image encoder, prompt encoder, mask decoder, `no_mem_embed`) is kept, under transformers' names (`convert_official`).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from fewshot.backbones.weights import WeightsError


def _hiera(width: int, heads: int, blocks: list[int], global_blocks: list[int], background: int, windows: list[int]):
    return {
        "hidden_size": width, "embed_dim_per_stage": [width * 2**i for i in range(4)],
        "num_attention_heads_per_stage": [heads * 2**i for i in range(4)], "blocks_per_stage": blocks,
        "global_attention_blocks": global_blocks, "window_positional_embedding_background_size": [background] * 2,
        "window_size_per_stage": windows,
    }  # fmt: skip


# Hiera trunk of each official size: width, first-stage heads, blocks per stage, global-attention blocks, background
# size of the windowed position embedding, window size per stage.
SIZES: dict[str, dict[str, Any]] = {
    "sam2.1_hiera_t": _hiera(96, 1, [1, 2, 7, 2], [5, 7, 9], 7, [8, 4, 14, 7]),
    "sam2.1_hiera_s": _hiera(96, 1, [1, 2, 11, 2], [7, 10, 13], 7, [8, 4, 14, 7]),
    "sam2.1_hiera_b+": _hiera(112, 2, [2, 3, 16, 3], [12, 16, 20], 14, [8, 4, 14, 7]),
    "sam2.1_hiera_l": _hiera(144, 2, [2, 6, 36, 4], [23, 33, 43], 7, [8, 4, 16, 8]),
}
HF_IDS = {
    "facebook/sam2.1-hiera-tiny": "sam2.1_hiera_t",
    "facebook/sam2.1-hiera-small": "sam2.1_hiera_s",
    "facebook/sam2.1-hiera-base-plus": "sam2.1_hiera_b+",
    "facebook/sam2.1-hiera-large": "sam2.1_hiera_l",
}
OFFICIAL_FILES = {
    "sam2.1_hiera_t": "sam2.1_hiera_tiny.pt",
    "sam2.1_hiera_s": "sam2.1_hiera_small.pt",
    "sam2.1_hiera_b+": "sam2.1_hiera_base_plus.pt",
    "sam2.1_hiera_l": "sam2.1_hiera_large.pt",
}

# Small architectures for random-weight runs: transformers' own Sam2ModelTester trunk (12 wide, blocks [1, 2, 7, 2])
# and a 32-wide neck, prompt encoder and decoder with the official decoder's heads / MLP / IoU head (so the official
# SAM2Base builds the same model): at 128 px, maps of 32, 16, 8 and 32 x 32 low-res masks; at 1024 px the official
# frame (256, 128, 64; 256 x 256 masks).
PRESETS: dict[str, dict[str, Any]] = {
    f"sam2_tiny{side}": {
        "image_size": side, "fpn_hidden_size": 32,
        "backbone": _hiera(12, 1, [1, 2, 7, 2], [5, 7, 9], 7, [8, 4, 14, 7]),
    }
    for side in (128, 1024)
}  # fmt: skip


def sam2_config(size: str = "", preset: str = "") -> Any:
    """The transformers `Sam2Config` of an official size (SIZES) or of a preset (PRESETS), at the official 1024 px
    unless the preset says otherwise."""
    import transformers as tf

    parts = PRESETS[preset] if preset else {"image_size": 1024, "fpn_hidden_size": 256, "backbone": SIZES[size]}
    side, width, trunk = parts["image_size"], parts["fpn_hidden_size"], parts["backbone"]
    backbone = tf.Sam2HieraDetConfig(**trunk, image_size=[side, side])
    vision = tf.Sam2VisionConfig(
        backbone_config=backbone.to_dict(),
        backbone_channel_list=trunk["embed_dim_per_stage"][::-1],
        backbone_feature_sizes=[[side // s, side // s] for s in (4, 8, 16)],
        fpn_hidden_size=width,
    )
    return tf.Sam2Config(
        vision_config=vision.to_dict(),
        prompt_encoder_config=tf.Sam2PromptEncoderConfig(hidden_size=width, image_size=side).to_dict(),
        mask_decoder_config=tf.Sam2MaskDecoderConfig(hidden_size=width).to_dict(),
    )


def size_of_config(config: Any) -> str:
    """The official size of a Sam2Config (its trunk's width and blocks), or a description such as `12-wide, blocks
    [1, 2, 7, 2]`."""
    trunk = config.vision_config.backbone_config
    found = (trunk.hidden_size, list(trunk.blocks_per_stage))
    for name, size in SIZES.items():
        if (size["hidden_size"], size["blocks_per_stage"]) == found:
            return name
    return f"{found[0]}-wide, blocks {found[1]}"


# ---------------------------------------------------------------------------------------------------------------------
# Official checkpoints (the keys of sam2.modeling.sam2_base.SAM2Base) -> transformers' Sam2Model.

VIDEO_ONLY = (
    "maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial", "mask_downsample.", "memory_attention.",
    "memory_encoder.", "obj_ptr_proj.", "obj_ptr_tpos_proj.",
)  # fmt: skip
PREFIXES = (
    ("image_encoder.trunk.", "vision_encoder.backbone."),
    ("image_encoder.neck.", "vision_encoder.neck."),
    ("sam_prompt_encoder.", "prompt_encoder."),
    ("sam_mask_decoder.", "mask_decoder."),
    ("no_mem_embed", "no_memory_embedding"),
)
# Substring rules, in order, after the prefixes.
RULES = (
    ("patch_embed.proj.", "patch_embed.projection."),
    ("mask_downscaling.0.", "mask_embed.conv1."),
    ("mask_downscaling.1.", "mask_embed.layer_norm1."),
    ("mask_downscaling.3.", "mask_embed.conv2."),
    ("mask_downscaling.4.", "mask_embed.layer_norm2."),
    ("mask_downscaling.6.", "mask_embed.conv3."),
    ("output_upscaling.0.", "upscale_conv1."),
    ("output_upscaling.1.", "upscale_layer_norm."),
    ("output_upscaling.3.", "upscale_conv2."),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    (".out_proj.", ".o_proj."),
    (".norm", ".layer_norm"),
)
_NECK = re.compile(r"(vision_encoder\.neck\.convs\.\d+)\.conv\.")
# An official MLP's `layers.i` (n layers) -> transformers' proj_in, layers.0 .. layers.(n - 3), proj_out.
_MLP = re.compile(r"(.*(?:mlp|_prediction_head|pred_obj_score_head|output_hypernetworks_mlps\.\d+))\.layers\.(\d+)\.")
_POINT = re.compile(r"prompt_encoder\.point_embeddings\.(\d+)\.weight")


def convert_official(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An official SAM 2 state dict -> the keys of transformers' `Sam2Model` (the video-only entries dropped)."""
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(VIDEO_ONLY):
            continue
        for old, new in PREFIXES:
            if key.startswith(old):
                key = new + key[len(old) :]
        for old, new in RULES:
            key = key.replace(old, new)
        renamed[_NECK.sub(r"\1.", key)] = value
    depth: dict[str, int] = {}  # MLP prefix -> number of layers
    for key in renamed:
        if m := _MLP.match(key):
            depth[m.group(1)] = max(depth.get(m.group(1), 0), int(m.group(2)) + 1)
    out: dict[str, Tensor] = {}
    points: dict[int, Tensor] = {}
    for key, value in renamed.items():
        if m := _MLP.match(key):
            i, n = int(m.group(2)), depth[m.group(1)]
            layer = "proj_in" if i == 0 else "proj_out" if i == n - 1 else f"layers.{i - 1}"
            key = f"{m.group(1)}.{layer}.{key[m.end() :]}"
        if m := _POINT.fullmatch(key):
            points[int(m.group(1))] = value
            continue
        out[key] = value
    if points:  # four Embedding(1, C) -> one Embedding(4, C)
        out["prompt_encoder.point_embed.weight"] = torch.cat([points[i] for i in sorted(points)])
    fourier = out.get("prompt_encoder.shared_embedding.positional_embedding")
    if fourier is not None:
        out["shared_image_embedding.positional_embedding"] = fourier
    return out


def check_release(state: dict[str, Tensor], where: str) -> None:
    """A full official checkpoint (video parts included) of SAM 2.0 (sam2_hiera_*.pt: the same image model, other
    weights) is refused: it has none of SAM 2.1's `no_obj_embed_spatial` / `obj_ptr_tpos_proj`."""
    if any(k.startswith("memory_attention.") for k in state) and "no_obj_embed_spatial" not in state:
        raise WeightsError(
            f"{where} is a SAM 2.0 checkpoint (sam2_hiera_*.pt: no no_obj_embed_spatial), not SAM 2.1: give the SAM "
            f"2.1 file ({', '.join(OFFICIAL_FILES.values())})"
        )


def official_size(state: dict[str, Tensor]) -> str:
    """The official size of a SAM 2 state dict (official or transformers keys), or a description of another one."""
    weight = state.get("image_encoder.trunk.patch_embed.proj.weight")
    weight = state.get("vision_encoder.backbone.patch_embed.projection.weight") if weight is None else weight
    if weight is None:
        raise WeightsError("not a SAM 2 checkpoint: it has no image_encoder.trunk.patch_embed.proj.weight")
    blocks = {
        int(m.group(1))
        for k in state
        if (m := re.match(r"(?:image_encoder\.trunk|vision_encoder\.backbone)\.blocks\.(\d+)\.", k))
    }
    width, depth = int(weight.shape[0]), len(blocks)
    for name, size in SIZES.items():
        if (size["hidden_size"], sum(size["blocks_per_stage"])) == (width, depth):
            return name
    return f"{width}-wide, {depth} blocks"


@torch.no_grad()
def reinitialise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights that carry signal through every part of a transformers Sam2Model, drawn from `seed`.

    transformers' init leaves SAM 2 nearly silent: the Hiera position embeddings and the no-memory embedding are zero,
    and normal(0, 0.02) weights through a neck without normalisation give maps of std 1e-3 to 4e-2 and mask logits
    of std ~3e-5 (IoU 0.5 everywhere; measured on sam2_tiny128). Here: weights normal with std 1 / sqrt(fan-in),
    biases 0, norms (1, 0), the position embeddings and the no-memory embedding normal(0, 0.5), the prompt Fourier
    matrix normal(0, 1) (the official scale) and shared between the prompt and image encodings, as in the official
    model (one `pe_layer`)."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        leaf = name.rsplit(".", 1)[-1]
        noise = torch.randn(tensor.shape, generator=generator)
        if "positional_embedding" in name:
            tensor.copy_(noise)
        elif leaf in ("pos_embed", "pos_embed_window", "no_memory_embedding"):
            tensor.copy_(0.5 * noise)
        elif "layer_norm" in name:
            tensor.fill_(1.0 if leaf == "weight" else 0.0)
        elif leaf == "bias" or tensor.dim() < 2:
            tensor.zero_()
        else:
            tensor.copy_(noise / math.sqrt(tensor[0].numel()))
    model.shared_image_embedding.positional_embedding.copy_(model.prompt_encoder.shared_embedding.positional_embedding)
    return model

"""Where SAM comes from: model names, small presets, official checkpoint conversion, the loading of every weight form.

`model.sam.name` is an official size, `vit_b | vit_l | vit_h` (SAM, `segment_anything/build_sam.py`) or
`sam2.1_hiera_t | sam2.1_hiera_s | sam2.1_hiera_b+ | sam2.1_hiera_l` (SAM 2.1, `sam2/configs/sam2.1/`), or a
transformers id (`facebook/sam-vit-huge`, `facebook/sam2.1-hiera-large`); `model.sam.pretrained` is
- a transformers folder (`config.json` + weights; its `model_type`, sam or sam2, picks `SamModel` or `Sam2Model`),
- an official checkpoint, converted on load by the key rules of transformers' `convert_sam_to_hf.py` /
  `convert_sam2_to_hf.py`: segment-anything's `sam_vit_h_4b8939.pth` (what Matcher and GF-SAM users hold) or sam2's
  `sam2.1_hiera_large.pt` (fewshot.sam.sam2_weights),
- `hf-hub:org/repo` (online, or from the local HF cache),
- `none`: random weights (a warning is logged and results record `none`), with `model.sam.preset` naming a small
  architecture of the same family for tests and the demo.
A folder or file of another size than `model.sam.name` is an error naming it and both sizes.

A random transformers `SamModel` has two initialisation traps (SAM_METHODS.md section 1.6): the vision encoder is
initialised with std 1e-10 (the image embedding is ~0) and the prompt Fourier matrix with std hidden/2; a random
`Sam2Model` is nearly silent too (sam2_weights.reinitialise). Random models made here are re-initialised
(`reinitialise`) so that every part of SAM carries signal.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewshot.backbones.weights import WeightsError, load_state_dict, parse_weights
from fewshot.sam import sam2_weights

log = logging.getLogger(__name__)

# The official sizes (build_sam.py / convert_sam_to_hf.get_config): vision width, depth, heads, global blocks.
SIZES: dict[str, dict[str, Any]] = {
    name: {"hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": heads, "global_attn_indexes": glob}
    for name, width, depth, heads, glob in [
        ("vit_b", 768, 12, 12, [2, 5, 8, 11]),
        ("vit_l", 1024, 24, 16, [5, 11, 17, 23]),
        ("vit_h", 1280, 32, 16, [7, 15, 23, 31]),
    ]
}
HF_IDS = {
    "facebook/sam-vit-base": "vit_b", "facebook/sam-vit-large": "vit_l", "facebook/sam-vit-huge": "vit_h",
    **sam2_weights.HF_IDS,
}  # fmt: skip
FAMILIES = {**dict.fromkeys(SIZES, "sam"), **dict.fromkeys(sam2_weights.SIZES, "sam2")}  # official size -> family
NAMES = {**dict.fromkeys(FAMILIES, "official size"), **dict.fromkeys(HF_IDS, "transformers id")}  # model.sam.name
OFFICIAL_FILES = {
    "vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth",
    **sam2_weights.OFFICIAL_FILES,
}  # fmt: skip

# Small SAM architectures for random-weight runs: (vision, prompt encoder, mask decoder) config overrides. tiny256 is
# a 2-block 64-wide ViT at 256 px (a 16x16 embedding, 64x64 low-res masks) with a 32-wide decoder.
SAM_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny256": {
        "vision": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "global_attn_indexes": [1],
                   "image_size": 256, "output_channels": 32, "num_pos_feats": 16, "window_size": 4},
        "prompt": {"hidden_size": 32, "image_size": 256, "mask_input_channels": 8},
        "decoder": {"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
    },
    "vith_ratio256": {  # 256 px, tiny256's decoder: encoder / decoded prompt FLOPs = ViT-H's at 1024 (1655 vs 1645)
        "vision": {"hidden_size": 376, "num_hidden_layers": 8, "num_attention_heads": 8, "global_attn_indexes": [3, 7],
                   "image_size": 256, "output_channels": 32, "num_pos_feats": 16, "window_size": 4},
        "prompt": {"hidden_size": 32, "image_size": 256, "mask_input_channels": 8},
        "decoder": {"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
    },
    "tiny1024": {
        "vision": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "global_attn_indexes": [1],
                   "image_size": 1024, "output_channels": 32, "num_pos_feats": 16},
        "prompt": {"hidden_size": 32, "image_size": 1024, "mask_input_channels": 8},
        "decoder": {"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
    },
}  # fmt: skip
# model.sam.preset -> its family (the SAM 2 presets are sam2_weights.PRESETS)
PRESETS = {**dict.fromkeys(SAM_PRESETS, "sam"), **dict.fromkeys(sam2_weights.PRESETS, "sam2")}

# Official -> transformers key rules, applied in order to every key (convert_sam_to_hf.KEYS_TO_MODIFY_MAPPING).
KEY_RULES = (
    ("iou_prediction_head.layers.0", "iou_prediction_head.proj_in"),
    ("iou_prediction_head.layers.1", "iou_prediction_head.layers.0"),
    ("iou_prediction_head.layers.2", "iou_prediction_head.proj_out"),
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    ("mask_downscaling.0", "mask_embed.conv1"),
    ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"),
    ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("image_encoder", "vision_encoder"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
    ("patch_embed.proj", "patch_embed.projection"),
    (".norm", ".layer_norm"),
    ("blocks", "layers"),
)
_HYPER_MLP = re.compile(r"(.*output_hypernetworks_mlps\.\d+\.)layers\.(\d+)(\..*)")
_HYPER_NAMES = {"0": "proj_in", "1": "layers.0", "2": "proj_out"}


def convert_official(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An official segment-anything state dict -> the keys of transformers' `SamModel`."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in ("pixel_mean", "pixel_std"):
            continue
        for old, new in KEY_RULES:
            key = key.replace(old, new)
        hyper = _HYPER_MLP.match(key)
        if hyper:
            key = f"{hyper.group(1)}{_HYPER_NAMES[hyper.group(2)]}{hyper.group(3)}"
        out[key] = value
    out["shared_image_embedding.positional_embedding"] = out["prompt_encoder.shared_embedding.positional_embedding"]
    return out


def is_sam2_state(state: dict[str, Tensor]) -> bool:
    """Whether a state dict (official or transformers keys) is a SAM 2 one (a Hiera trunk)."""
    return any(k.startswith(("image_encoder.trunk.", "vision_encoder.backbone.")) for k in state)


def official_size(state: dict[str, Tensor]) -> str:
    """The official size (vit_b | vit_l | vit_h | sam2.1_hiera_*) of a SAM or SAM 2 state dict (official or converted
    keys), or a description such as `64-wide, 2 blocks` for another one."""
    if is_sam2_state(state):
        return sam2_weights.official_size(state)
    weight = state.get(
        "image_encoder.patch_embed.proj.weight", state.get("vision_encoder.patch_embed.projection.weight")
    )
    if weight is None:
        raise WeightsError("not a SAM checkpoint: it has no image_encoder.patch_embed.proj.weight")
    blocks = {
        int(m.group(1)) for k in state if (m := re.match(r"(?:image|vision)_encoder\.(?:blocks|layers)\.(\d+)\.", k))
    }
    return _vit_size(int(weight.shape[0]), len(blocks))


def _vit_size(width: int, depth: int) -> str:
    """The official SAM 1 size of a ViT `width` wide and `depth` blocks deep, or a description of another one."""
    found = (width, depth)
    return next((n for n, s in SIZES.items() if (s["hidden_size"], s["num_hidden_layers"]) == found),
                f"{width}-wide, {depth} blocks")  # fmt: skip


def _closest(value: str, valid) -> str:
    """' (did you mean X?)' for the valid name closest to `value`, or ''."""
    close = difflib.get_close_matches(value, valid, n=1, cutoff=0.4)
    return f" (did you mean {close[0]!r}?)" if close else ""


def size_of(name: str) -> str:
    """The official size a `model.sam.name` stands for; an unknown name is an error suggesting the closest."""
    if name in FAMILIES:
        return name
    if name in HF_IDS:
        return HF_IDS[name]
    valid = [*FAMILIES, *HF_IDS]
    raise KeyError(
        f"unknown SAM model.sam.name={name!r}{_closest(name, valid)}; choose from {', '.join(valid)}, or give a "
        "transformers folder as model.sam.pretrained"
    )


def family(name: str) -> str:
    """`sam` (SAM 1: SamModel) or `sam2` (SAM 2.1: Sam2Model) for a `model.sam.name`."""
    return FAMILIES[size_of(name)]


def _check_preset(name: str, preset: str) -> None:
    if preset not in PRESETS:
        hint = _closest(preset, PRESETS)
        raise KeyError(f"unknown model.sam.preset={preset!r}{hint}; choose from {sorted(PRESETS)} or '' (none)")
    if preset_mismatch(name, preset):
        raise KeyError(preset_mismatch(name, preset))


def preset_mismatch(name: str, preset: str, group: str = "model") -> str:
    """Why `preset` does not fit `name` (a preset of the other family), or "" when it does (or there is none)."""
    if not preset or PRESETS[preset] == family(name):
        return ""
    fitting = sorted(p for p, f in PRESETS.items() if f == family(name))
    return (
        f"{group}.sam.preset={preset!r} is a {PRESETS[preset]} architecture but {group}.sam.name={name!r} is "
        f"{family(name)}: use a {family(name)} preset ({', '.join(fitting)}) or a {PRESETS[preset]} name"
    )


def sam_config(name: str, preset: str = "") -> Any:
    """The transformers `SamConfig` / `Sam2Config` of an official size or of a preset (which replaces the size)."""
    if preset:
        _check_preset(name, preset)
    if family(name) == "sam2":
        return sam2_weights.sam2_config(size_of(name), preset)
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    # The official two-way blocks use nn.LayerNorm's eps 1e-5; transformers' decoder config defaults to 1e-6 (the
    # converted Hub folders carry 1e-6: about 1e-4 off the official logits).
    decoder_eps = {"layer_norm_eps": 1e-5}
    if preset:
        parts = SAM_PRESETS[preset]
        return SamConfig(
            vision_config=SamVisionConfig(**parts["vision"]).to_dict(),
            prompt_encoder_config=SamPromptEncoderConfig(**parts["prompt"]).to_dict(),
            mask_decoder_config=SamMaskDecoderConfig(**parts["decoder"], **decoder_eps).to_dict(),
        )
    return SamConfig(
        vision_config=SamVisionConfig(**SIZES[size_of(name)]).to_dict(),
        mask_decoder_config=SamMaskDecoderConfig(**decoder_eps).to_dict(),
    )


def model_class(config: Any) -> type:
    """transformers' `SamModel` or `Sam2Model` for a config (its `model_type`)."""
    from transformers import Sam2Model, SamModel

    return Sam2Model if config.model_type == "sam2" else SamModel


@torch.no_grad()
def reinitialise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights that exercise every part of a transformers SamModel (or Sam2Model: sam2_weights.reinitialise),
    drawn from `seed` (the global RNG is left alone): Linear / Conv weights normal(0, 0.02), biases 0, norms (1, 0),
    the encoder's position embedding and relative positions normal(0, 0.02), and the prompt Fourier matrix normal(0,
    1) as the official random init."""
    if model.config.model_type == "sam2":
        return sam2_weights.reinitialise(model, seed)
    generator = torch.Generator().manual_seed(seed)
    for param_name, param in model.named_parameters():
        leaf = param_name.rsplit(".", 1)[-1]
        if "positional_embedding" in param_name:
            param.copy_(torch.randn(param.shape, generator=generator))
        elif "layer_norm" in param_name:
            param.fill_(1.0 if leaf == "weight" else 0.0)
        elif leaf == "bias":
            param.zero_()
        else:
            param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    model.shared_image_embedding.positional_embedding.copy_(model.prompt_encoder.shared_embedding.positional_embedding)
    return model


def _check_size(expected: str, found: str, where: str) -> None:
    if expected != found:
        raise WeightsError(
            f"{where} holds a SAM {found} but model.sam.name asks for {expected}: set model.sam.name={found} or give "
            f"the {expected} weights ({OFFICIAL_FILES.get(expected, 'a matching file')})"
        )


def model_from_official(state: dict[str, Tensor], config: Any, where: str = "the state dict") -> nn.Module:
    """A transformers SamModel / Sam2Model of `config` holding an official segment-anything / sam2 state dict (every
    key of the image model must fit)."""
    sam2 = config.model_type == "sam2"
    model = model_class(config)(config)
    converted = sam2_weights.convert_official(state) if sam2 else convert_official(state)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"{where} is not an official {'SAM 2.1' if sam2 else 'SAM'} checkpoint of this size: missing keys "
            f"{missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    return model


def size_of_config(config: Any) -> str:
    """The official size of a transformers SamConfig / Sam2Config, or a description of another one."""
    if config.model_type == "sam2":
        return sam2_weights.size_of_config(config)
    return _vit_size(config.vision_config.hidden_size, config.vision_config.num_hidden_layers)


def _from_official(path: Path, name: str) -> nn.Module:
    state = load_state_dict(path)
    _check_size(size_of(name), official_size(state), f"weights file {path}")
    if family(name) == "sam2":
        sam2_weights.check_release(state, f"weights file {path}")
    return model_from_official(state, sam_config(name), f"weights file {path}")


def _from_folder(path: Path, name: str) -> nn.Module:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise WeightsError(
            f"SAM folder {path} has no config.json; give a transformers SAM / SAM 2 folder or an official checkpoint"
        )
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in ("sam", "sam2"):
        raise WeightsError(
            f"SAM folder {path} holds a transformers {model_type!r} model, not sam or sam2 (SamModel, Sam2Model)"
        )
    config = AutoConfig.from_pretrained(str(path))
    _check_size(size_of(name), size_of_config(config), f"SAM folder {path}")
    return model_class(config).from_pretrained(str(path))


def load_sam_model(name: str, pretrained: str, preset: str = "") -> tuple[nn.Module, str]:
    """The transformers SamModel / Sam2Model `name` with `pretrained` weights (see the module docstring), in eval mode
    and frozen, and its weight string for identities and results ("none" for random weights)."""
    path = Path(pretrained).expanduser()
    source = None if path.is_dir() else parse_weights(pretrained)
    if preset and (source is None or source.kind != "none"):
        raise WeightsError(
            f"model.sam.preset={preset!r} is a random architecture: use it with model.sam.pretrained=none"
        )
    if source is None:
        model, tag = _from_folder(path, name), str(path)
    else:
        size_of(name)
        if source.kind == "none":
            log.warning("SAM %s has RANDOM weights (model.sam.pretrained=none): masks are meaningless", preset or name)
            config = sam_config(name, preset)
            model, tag = reinitialise(model_class(config)(config)), "none"
        elif source.kind == "file":
            known = {file: size for size, file in OFFICIAL_FILES.items()}.get(Path(source.value).name)
            if known is not None and known != size_of(name):  # e.g. the SAM ViT-H default left with a SAM 2 name
                _check_size(size_of(name), known, f"model.sam.pretrained={source.value} (an official file name)")
            model, tag = _from_official(Path(source.value), name), source.value
        elif source.kind == "hf-hub":
            from transformers import Sam2Model, SamModel

            try:
                model = (Sam2Model if family(name) == "sam2" else SamModel).from_pretrained(source.value)
            except OSError as err:
                raise WeightsError(
                    f"cannot load SAM {pretrained!r} from the Hugging Face Hub (offline?): {err}. Give a local "
                    "transformers folder or an official checkpoint as model.sam.pretrained"
                ) from err
            _check_size(size_of(name), size_of_config(model.config), f"SAM {pretrained}")
            tag = str(source)
        else:
            raise WeightsError(
                f"model.sam.pretrained={pretrained!r} is not a SAM weight source: give a transformers folder, an "
                f"official checkpoint ({', '.join(OFFICIAL_FILES.values())}), hf-hub:org/repo or none"
            )
    model.eval().requires_grad_(False)
    return model, tag

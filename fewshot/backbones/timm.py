"""timm backbones: ResNets (stage features) and ViT / DeiT / DINOv2 (block features) behind one interface.

Layer indices follow timm's `forward_intermediates`: for a ViT the transformer blocks 0..depth-1 (tokens after each
block, before the final norm, prefix tokens dropped); for a ResNet the stages 0..4, where 0 is the stem (stride 2)
and 1..4 are layer1..layer4 (strides 4, 8, 16, 32). ViTs are built with `dynamic_img_size=True`, so any input size
works: the position embedding is resampled to the grid, and the image is first resized to the nearest multiple of
the patch (see `prepare_images`). CNNs take any size as it is.
"""

from __future__ import annotations

import difflib
import logging
import sys
from pathlib import Path

import timm
from timm.models import get_pretrained_cfg, model_entrypoint, split_model_name_tag
from torch import Tensor, nn

from fewshot.backbones.base import Backbone, prepare_images, resolve_layers
from fewshot.backbones.weights import (
    WeightsError,
    describe_mismatch,
    load_state_dict,
    parse_weights,
    weights_identity,
)

logger = logging.getLogger(__name__)

# timm modules whose models accept `dynamic_img_size=True` (ViT family: resampled position embeddings).
_DYNAMIC_SIZE_MODULES = (
    "timm.models.vision_transformer",
    "timm.models.vision_transformer_hybrid",
    "timm.models.deit",
    "timm.models.eva",
)


def _check_model(arch: str) -> None:
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=8, cutoff=0.6)
        raise KeyError(
            f"unknown timm model {arch!r}; close names: {close}; timm.list_models() lists all "
            f"(covered here: resnet50, resnet101, vit_base_patch16_224, deit_base_patch16_224, vit_tiny_patch16_224, "
            f"vit_small_patch14_dinov2, vit_base_patch14_dinov2)"
        )


def _check_tag(arch: str, tag: str) -> None:
    """A tag timm knows and can download from somewhere; timm itself would fall back to random weights otherwise."""
    tags = [name.split(".", 1)[1] for name in timm.list_pretrained(f"{arch}.*")]
    if tag not in tags:
        raise WeightsError(f"timm model {arch} has no weights tag {tag!r}; choose from {tags}")
    cfg = get_pretrained_cfg(f"{arch}.{tag}")
    if not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(f"timm weights {arch}.{tag} have no download location; pass a local weights file instead")


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier") or ()
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))


def load_timm_weights(model: nn.Module, path: str | Path, name: str) -> None:
    """Loads a local weights file into a timm model strictly, except the classifier, which backbones never use.

    The model module's own `checkpoint_filter_fn` runs first, as in timm's pretrained loading, so original layouts
    (DINOv2's `*_pretrain.pth`, OpenAI CLIP, patch/position-embedding sizes) are converted.
    """
    state = load_state_dict(path)
    filter_fn = getattr(sys.modules[model_entrypoint(name).__module__], "checkpoint_filter_fn", None)
    try:
        if filter_fn is not None:
            state = filter_fn(state, model)
        drop = _classifier_prefixes(model)
        state = {k: v for k, v in state.items() if not k.startswith(drop)}
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, KeyError, ValueError) as err:  # shape mismatches and foreign layouts
        detail = " ".join(str(err).split())  # torch's message spans lines
        raise WeightsError(f"weights file {path} does not fit timm model {name}: {detail}") from err
    if missing or unexpected:
        raise WeightsError(describe_mismatch(path, list(missing), list(unexpected), f"timm model {name}"))


def create_timm_model(name: str, pretrained: str) -> nn.Module:
    """A timm model without classifier (`num_classes=0`), in eval mode, with the weights `pretrained` names.

    `name` may carry a tag (`vit_base_patch16_224.augreg_in21k`): it then chooses the mean/std and, with
    pretrained=<that tag>, the weights. A tag or hf-hub:org/repo is downloaded by timm (the HF cache works offline);
    a local file is loaded strictly by `load_timm_weights`; `none` gives random weights and logs a warning.
    """
    arch, name_tag = split_model_name_tag(name)
    _check_model(arch)
    source = parse_weights(pretrained)
    kwargs: dict = {"num_classes": 0}
    if model_entrypoint(arch).__module__ in _DYNAMIC_SIZE_MODULES:
        kwargs["dynamic_img_size"] = True
    if source.kind == "tag":
        if name_tag and name_tag != source.value:
            raise WeightsError(f"timm model name {name} carries tag {name_tag!r} but pretrained={source.value!r}")
        _check_tag(arch, source.value)
        try:
            model = timm.create_model(f"{arch}.{source.value}", pretrained=True, **kwargs)
        except Exception as err:  # network, hub and checkpoint errors all mean: no weights
            raise WeightsError(
                f"cannot get timm weights {arch}.{source.value} ({type(err).__name__}: {err}); offline, pass the "
                "path of a downloaded weights file instead"
            ) from err
    elif source.kind == "hf-hub":
        overlay = {"hf_hub_id": source.value, "source": "hf-hub", "hf_hub_filename": None}
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except Exception as err:
            raise WeightsError(f"cannot load timm weights for {name} from hf-hub:{source.value}: {err}") from err
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
        if source.kind == "file":
            load_timm_weights(model, source.value, name)
        else:
            logger.warning("timm model %s has random weights (pretrained=none)", name)
    logger.info("timm %s with weights %s", name, source)
    return model.eval()


class TimmBackbone(Backbone):
    """Multi-layer NCHW features of a timm model (ResNet stages, ViT blocks); see the module docstring.

    Args:
        name: timm model name, optionally with a tag (`resnet50`, `vit_small_patch14_dinov2.lvd142m`).
        pretrained: `none`, a tag, `hf-hub:org/repo` or a local .pt/.pth/.bin/.safetensors file.
        layers: block (ViT) or stage (CNN) indices; negative ones count from the end. Output is in ascending order.
        frozen: no gradients and eval mode whatever `train()` is called with.
    """

    def __init__(
        self, name: str, pretrained: str = "none", layers: list[int] | None = None, frozen: bool = True
    ) -> None:
        super().__init__()
        layers = [-4, -3, -2, -1] if layers is None else list(layers)
        self.model = create_timm_model(name, pretrained)
        for method in ("forward_intermediates", "prune_intermediate_layers"):
            if not hasattr(self.model, method):
                raise ValueError(f"timm model {name} has no {method}(); choose a ResNet or ViT-family model")
        self.patch_size = self._patch_size(name)
        info = self.model.feature_info
        self.indices = resolve_layers(layers, len(info), f"timm model {name} ({len(info)} blocks/stages)")
        self.feature_info = [
            {"num_chs": info[i]["num_chs"], "reduction": info[i]["reduction"], "index": i} for i in self.indices
        ]
        self.model.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        cfg = self.model.pretrained_cfg
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.identity = f"timm:{name}|{weights_identity(parse_weights(pretrained))}|{','.join(map(str, self.indices))}"
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
        self.train(False)

    def _patch_size(self, name: str) -> int:
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is None:
            return 1  # a CNN: any input size
        if getattr(patch_embed, "strict_img_size", False):
            raise ValueError(f"timm model {name} needs a fixed input size; use a ViT-family model or a CNN")
        height, width = patch_embed.patch_size
        if height != width:
            raise ValueError(f"timm model {name} has a non-square patch {height}x{width}, which is not supported")
        return height

    def forward_intermediates(self, images: Tensor) -> list[Tensor]:
        """images [N, 3, H, W] (uint8 or [0, 1]) -> per selected layer [N, C_l, H'/s_l, W'/s_l] (H' as prepared)."""
        dtype = next(self.model.parameters()).dtype
        x = prepare_images(images, self.mean, self.std, self.patch_size, dtype=dtype)
        return self.model.forward_intermediates(x, indices=self.indices, stop_early=True, intermediates_only=True)

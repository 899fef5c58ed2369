"""Where backbone weights come from: the one place weight strings are parsed, read and handed to open_clip.

A weight string is one of
- `none`: random initialisation (a warning is logged; never chosen silently),
- a tag of the model (`openai`, `laion2b_s34b_b88k`, `augreg_in21k`, `lvd142m`): downloaded by timm / open_clip, so
  online only,
- `hf-hub:org/repo`: a Hugging Face Hub repository (online, or offline from the local HF cache),
- a path to a `.pt`, `.pth`, `.bin` or `.safetensors` file: the offline route.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")  # timm and open_clip tags have no dots or slashes


class WeightsError(RuntimeError):
    """Weights that cannot be found, read or fitted to the model; the message names the file, repo or tag."""


@dataclass(frozen=True)
class WeightSource:
    kind: str  # "none" | "tag" | "hf-hub" | "file"
    value: str  # "" for none, the tag, "org/repo", or the file path

    def __str__(self) -> str:
        return {"none": "none", "tag": self.value, "hf-hub": f"hf-hub:{self.value}"}.get(self.kind, self.value)


def parse_weights(pretrained: str) -> WeightSource:
    """Parses a weight string: `none`, a tag, `hf-hub:org/repo`, or a path to a .pt/.pth/.bin/.safetensors file."""
    text = pretrained.strip()
    if text.lower() in ("", "none"):
        return WeightSource("none", "")
    if text.startswith("hf-hub:"):
        repo = text[len("hf-hub:") :].strip("/")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise WeightsError(f"pretrained={pretrained!r}: write a Hub repository as hf-hub:org/repo")
        return WeightSource("hf-hub", repo)
    if text.lower().endswith(WEIGHT_SUFFIXES):
        return WeightSource("file", str(Path(text).expanduser()))
    if _TAG.match(text):
        return WeightSource("tag", text)
    raise WeightsError(
        f"pretrained={pretrained!r} is neither 'none', a tag, 'hf-hub:org/repo' nor a weights file; "
        f"a file must end in one of {', '.join(WEIGHT_SUFFIXES)}"
    )


def is_random(pretrained: str) -> bool:
    """Whether a weight string asks for random initialisation (`none` in any case, or empty): the one such check."""
    return parse_weights(pretrained).kind == "none"


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Reads a state dict from .pt/.pth/.bin (torch.load, weights_only) or .safetensors, on the CPU.

    Unwraps `{"state_dict": ...}` and `{"model": ...}` checkpoints and strips a DistributedDataParallel `module.`
    prefix. A missing, unreadable or non-state-dict file raises an error naming it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; check the path given as `pretrained`")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint: Any = load_file(str(path), device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch / safetensors raise many types for corrupt or foreign files
        raise WeightsError(f"cannot read weights file {path}: {type(err).__name__}: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise WeightsError(f"weights file {path} holds {type(checkpoint).__name__}, not a state dict of tensors")
    state = {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}
    if not state:
        raise WeightsError(f"weights file {path} holds no tensors (keys: {list(checkpoint)[:5]})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def weights_identity(source: WeightSource) -> str:
    """The weights part of a backbone identity; a file adds its size and mtime so a rewritten file is a new key."""
    if source.kind != "file":
        return str(source)
    path = Path(source.value).resolve()
    stat = path.stat()
    return f"{path}@{stat.st_size}-{stat.st_mtime_ns}"


def describe_mismatch(path: str | Path, missing: list[str], unexpected: list[str], model: str, n: int = 5) -> str:
    """One error message for a state dict that does not fit: the file, the model and the first differing keys."""
    return (
        f"weights file {path} does not fit {model}: {len(missing)} missing keys {missing[:n]}, "
        f"{len(unexpected)} unexpected keys {unexpected[:n]}; was it saved from this architecture?"
    )


def open_clip_quick_gelu(name: str, source: WeightSource) -> bool:
    """True when the weights were trained with QuickGELU: OpenAI weights, `*-quickgelu` names, tags marked so."""
    import open_clip

    if name.endswith("-quickgelu") or (source.kind == "tag" and source.value == "openai"):
        return True
    if source.kind == "tag":
        return bool(open_clip.get_pretrained_cfg(name, source.value).get("quick_gelu", False))
    return False


def create_open_clip_model(name: str, pretrained: str) -> torch.nn.Module:
    """An open_clip CLIP (or CustomTextCLIP) in eval mode, on the CPU, with the weights `pretrained` names.

    OpenAI weights (tag `openai`, or any tag open_clip marks so, or a `-quickgelu` name) get QuickGELU. A local file
    goes through open_clip's own loading (key conversion, position-embedding resize, strict load); OpenAI weights in a
    local file need the `-quickgelu` model name. `none` gives a random model and logs a warning; a tag that cannot be
    downloaded, or a Hub repository without weights, is an error rather than a random model.
    """
    import open_clip

    source = parse_weights(pretrained)
    if source.kind != "hf-hub" and name not in open_clip.list_models():
        raise KeyError(f"unknown open_clip model {name!r}; choose from {open_clip.list_models()}")
    quick_gelu = open_clip_quick_gelu(name, source)
    if source.kind == "none":
        logger.warning("open_clip model %s has random weights (pretrained=none)", name)
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    elif source.kind == "tag":
        tags = open_clip.list_pretrained_tags_by_model(name)
        if source.value not in tags:
            raise WeightsError(f"open_clip model {name} has no weights tag {source.value!r}; choose from {tags}")
        try:
            model = open_clip.create_model(name, pretrained=source.value, force_quick_gelu=quick_gelu)
        except Exception as err:
            raise WeightsError(
                f"cannot get open_clip weights {name}/{source.value} ({err}); offline, pass the path of a downloaded "
                "weights file instead"
            ) from err
    elif source.kind == "hf-hub":
        from open_clip.pretrained import download_pretrained_from_hf

        try:  # open_clip only warns when a Hub repo has no weights; fetch them first so that is an error here
            download_pretrained_from_hf(source.value)
            model = open_clip.create_model(f"hf-hub:{source.value}", force_quick_gelu=quick_gelu)
        except Exception as err:
            raise WeightsError(f"cannot load open_clip weights from hf-hub:{source.value}: {err}") from err
        if name and not name.startswith("hf-hub:"):
            logger.info("open_clip architecture comes from hf-hub:%s; the name %s is not used", source.value, name)
    else:
        path = Path(source.value)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist; check the path given as `pretrained`")
        try:
            model = open_clip.create_model(name, pretrained=str(path), force_quick_gelu=quick_gelu)
        except Exception as err:
            raise WeightsError(f"weights file {path} does not load into open_clip {name}: {err}") from err
    logger.info("open_clip %s with weights %s (quick_gelu=%s)", name, source, quick_gelu)
    return model.eval()

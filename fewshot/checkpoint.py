"""Checkpoints that carry their settings.

- `best.safetensors`: model weights, with the resolved config (YAML), git revision and step in its metadata, so
  `test_fold.py --checkpoint` rebuilds the model from the file alone. Frozen backbone weights are stored only when
  they cannot be rebuilt from the config (`pretrained: none`, i.e. a random backbone).
- `last.pt`: everything needed to resume exactly: model, optimizer, scheduler, step, RNG states, best score, and the
  resolved config (YAML) it was trained with, which a resume checks against its own.
Both are written atomically (fewshot.io: a kill mid-write leaves the previous file, never a torn one).
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .backbones.weights import is_random
from .config import Config, dump_yaml, from_dict
from .io import atomic_write
from .provenance import git_revision


def model_state(model: nn.Module, include_frozen: bool) -> dict[str, torch.Tensor]:
    """The model's state dict, without frozen parameters and buffers of the backbone unless `include_frozen`."""
    state = model.state_dict()
    if include_frozen:
        return state
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trainable or not k.startswith("backbone.")}


def save_weights(path: str | Path, model: nn.Module, cfg: Config, meta: dict[str, Any] | None = None) -> None:
    """Writes `best.safetensors`: the weights (the frozen backbone too when it cannot be rebuilt from the config: random
    or trained), the resolved config, the git revision and `meta` (step, validation mIoU), atomically."""
    include_frozen = is_random(cfg.model.backbone.pretrained) or not cfg.model.backbone.frozen
    state = {k: v.detach().contiguous().cpu() for k, v in model_state(model, include_frozen).items()}
    metadata = {"config": dump_yaml(cfg), "format": "fewshot-seg/1", "git": json.dumps(git_revision())}
    metadata.update({k: json.dumps(v) for k, v in (meta or {}).items()})
    # Serialised here and written by atomic_write: safetensors' save_file makes a temporary of its own, which a kill
    # would leave behind under a name fewshot.io does not know.
    data = safetensors_bytes(state, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def read_checkpoint_config(path: str | Path) -> tuple[Config, dict[str, Any]]:
    """(config, other metadata) of a `best.safetensors` file, read from its header without loading the tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; train one with tools/train_fold.py")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"checkpoint {path} is not a readable safetensors file: {err}") from err
    if "config" not in metadata:
        raise ValueError(f"checkpoint {path} has no config in its metadata; was it written by tools/train_fold.py?")
    cfg = from_dict(yaml.safe_load(metadata.pop("config")))
    meta = {k: json.loads(v) for k, v in metadata.items() if k != "format"}
    return cfg, meta


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, dict[str, Any]]:
    """(state dict, config, other metadata) of a `best.safetensors` file."""
    cfg, meta = read_checkpoint_config(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"checkpoint {path} is not a readable safetensors file: {err}") from err
    return state, cfg, meta


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Loads a (possibly backbone-less) state dict; every key must match, except those of a frozen backbone, and so
    must the shapes of every tensor."""
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    frozen = getattr(model, "frozen", True)  # a frozen backbone can be rebuilt from its config, a trained one never
    missing = sorted(k for k in set(own) - set(state) if not (frozen and k.startswith("backbone.")))
    if unexpected or missing:
        raise ValueError(
            f"checkpoint {source} does not fit the configured model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; was it trained with another model.head or backbone?"
        )
    shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if v.shape != own[k].shape]
    if shapes:
        key, stored, built = shapes[0]
        more = f" (and {len(shapes) - 1} more tensors)" if len(shapes) > 1 else ""
        raise ValueError(
            f"checkpoint {source} does not fit the configured model: {key} is {list(stored)} in the file but "
            f"{list(built)} in the model{more}; was it trained with another backbone or head width?"
        )
    model.load_state_dict(state, strict=False)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


TRAINING_STATE = ("model", "optimizer", "scheduler", "scaler", "step", "best", "rng", "config")


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    """Writes `state` (the TRAINING_STATE keys; `config` the resolved config as YAML) atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_training_state(path: str | Path) -> dict[str, Any]:
    """The state `save_training_state` wrote at `path`; a missing, cut-off or foreign file is an error saying so."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume: no {path.name} in {path.parent}, so there is nothing to resume (the run stopped before its "
            "first checkpoint); start it over with run.overwrite=true"
        )
    recover = (
        "it cannot be resumed: start the run over with run.overwrite=true (this deletes its metrics.jsonl, last.pt "
        "and best.safetensors), or put back a good copy of the file"
    )
    try:  # RNG states are numpy arrays and python tuples: it is our own file, so full unpickling is intended
        state = torch.load(path, map_location="cpu", weights_only=False)
    except PermissionError as err:
        raise ValueError(f"--resume: {path} cannot be read ({err.strerror}); check its permissions") from err
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        reason = str(err).split(". ")[0]
        raise ValueError(f"--resume: {path} is truncated or corrupt ({reason}); {recover}") from err
    missing = [k for k in TRAINING_STATE if k not in state] if isinstance(state, dict) else list(TRAINING_STATE)
    if missing:
        raise ValueError(f"--resume: {path} is not a training state of tools/train_fold.py (no {missing}); {recover}")
    if not isinstance(state["config"], str):
        raise ValueError(f"--resume: {path} was written by an older fewshot-seg, without its config as YAML; {recover}")
    return state

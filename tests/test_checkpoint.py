from __future__ import annotations

import pytest
import torch
from torch import nn

from fewshot.checkpoint import (
    TRAINING_STATE,
    load_training_state,
    load_weights,
    read_weights,
    rng_state,
    save_training_state,
    save_weights,
    set_rng_state,
)
from fewshot.config import load_config
from fewshot.provenance import git_revision


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 3)
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(3, 2)


def test_weights_carry_config_and_skip_pretrained_backbone(tmp_path):
    cfg = load_config(None, ["data.fold=2", "model.backbone.pretrained=augreg_in21k"])
    model = Toy()
    save_weights(tmp_path / "best.safetensors", model, cfg, {"step": 7})
    state, loaded_cfg, meta = read_weights(tmp_path / "best.safetensors")
    assert loaded_cfg == cfg and meta == {"step": 7, "git": git_revision()}
    assert set(state) == {"head.weight", "head.bias"}  # backbone comes back from its pretrained weights
    other = Toy()
    load_weights(other, state, "best.safetensors")
    assert torch.equal(other.head.weight, model.head.weight)


@pytest.mark.parametrize("spelling", ["none", "NONE", " None "])
def test_random_backbone_is_stored(tmp_path, spelling):
    """Every spelling the weight parser takes as random weights keeps the random backbone in the checkpoint."""
    cfg = load_config(None, [f"model.backbone.pretrained={spelling!r}"])
    model = Toy()
    save_weights(tmp_path / "w.safetensors", model, cfg)
    state, _, _ = read_weights(tmp_path / "w.safetensors")
    assert "backbone.weight" in state


def test_trained_backbone_is_stored_and_required(tmp_path):
    cfg = load_config(None, ["model.backbone.pretrained=augreg_in21k", "model.backbone.frozen=false"])
    model = Toy()
    model.backbone.requires_grad_(True)
    model.frozen = False  # as FewShotSegmenter.frozen says of a backbone trained with the head
    save_weights(tmp_path / "w.safetensors", model, cfg)
    state, _, _ = read_weights(tmp_path / "w.safetensors")
    assert set(state) == {"backbone.weight", "backbone.bias", "head.weight", "head.bias"}  # tag or not: trained
    del state["backbone.bias"]  # a trained backbone cannot be rebuilt from its config: a missing key is an error
    with pytest.raises(ValueError, match=r"missing \['backbone.bias'\]"):
        load_weights(model, state, tmp_path / "w.safetensors")


def test_mismatched_checkpoint_is_named(tmp_path):
    cfg = load_config(None, [])
    save_weights(tmp_path / "w.safetensors", Toy(), cfg)
    state, _, _ = read_weights(tmp_path / "w.safetensors")
    state["head.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"w.safetensors does not fit.*head.extra"):
        load_weights(Toy(), state, tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        read_weights(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable"):
        read_weights(tmp_path / "junk.safetensors")


def test_training_state_and_rng_round_trip(tmp_path):
    torch.manual_seed(3)
    state = {key: None for key in TRAINING_STATE} | {"step": 5, "rng": rng_state(), "config": "seed: 0\n"}
    expected = torch.rand(4)
    save_training_state(tmp_path / "last.pt", state)
    loaded = load_training_state(tmp_path / "last.pt")
    set_rng_state(loaded["rng"])
    assert loaded["step"] == 5 and torch.equal(torch.rand(4), expected)
    with pytest.raises(FileNotFoundError, match="no last.pt"):
        load_training_state(tmp_path / "nope" / "last.pt")


def test_a_tensor_of_another_shape_is_named_with_both_shapes(tmp_path):
    wide = Toy()
    wide.head = nn.Linear(4, 2)
    with pytest.raises(
        ValueError,
        match=r"w.safetensors does not fit the configured model: head.weight is \[2, 4\] "
        r"in the file but \[2, 3\] in the model;",
    ):
        load_weights(
            Toy(), {k: v for k, v in wide.state_dict().items() if k.startswith("head.")}, tmp_path / "w.safetensors"
        )


def test_a_cut_off_or_foreign_training_state_is_refused_with_how_to_recover(tmp_path):
    path = tmp_path / "last.pt"
    save_training_state(path, {key: torch.zeros(1000) for key in TRAINING_STATE} | {"config": "seed: 0\n"})
    assert load_training_state(path)["config"] == "seed: 0\n"
    data = path.read_bytes()
    for cut in (data[: len(data) // 2], data[:10], b""):
        path.write_bytes(cut)
        with pytest.raises(ValueError, match=r"last.pt is truncated or corrupt .*run.overwrite=true"):
            load_training_state(path)
    torch.save({"step": 3}, path)
    with pytest.raises(ValueError, match=r"last.pt is not a training state of tools/train_fold.py"):
        load_training_state(path)
    torch.save({key: None for key in TRAINING_STATE} | {"config": load_config(None, [])}, path)
    with pytest.raises(ValueError, match="written by an older fewshot-seg"):
        load_training_state(path)

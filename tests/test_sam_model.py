"""The SAM-based model (SamSegmenter) on random tiny encoders: built from the config, cached like any model."""

from __future__ import annotations

import pytest
import torch

from fewshot.config import load_config
from fewshot.feature_store import FeatureCache
from fewshot.model import build_model
from fewshot.provenance import protocol_record
from fewshot.sam.model import SamSegmenter

OVERRIDES = [
    "model.head=gfsam", "model.backbone.name=timm:vit_tiny_patch16_224", "model.backbone.pretrained=none",
    "model.backbone.layers=[-1]", "model.sam.pretrained=none", "model.sam.preset=tiny256", "model.sam.image_size=256",
    "model.gfsam.dino_size=64", "model.gfsam.max_points=8",
]  # fmt: skip
SAM2 = ["model.sam.name=sam2.1_hiera_t", "model.sam.preset=sam2_tiny128", "model.sam.image_size=128"]


@pytest.fixture(scope="module")
def model():
    return build_model(load_config(None, OVERRIDES).model).eval()


def episode(shots: int = 1, size: int = 96):
    g = torch.Generator().manual_seed(shots)
    query = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=g)
    supports = torch.randint(0, 256, (2, shots, 3, size, size), dtype=torch.uint8, generator=g)
    masks = torch.zeros(2, shots, size, size, dtype=torch.uint8)
    masks[..., 20:60, 30:80] = 1
    masks[..., 0, :] = 255  # void is not foreground
    return query, supports, masks


def test_gfsam_model_gives_binary_logits_deterministically(model):
    assert isinstance(model, SamSegmenter)
    query, supports, masks = episode()
    logits = model(query, supports, masks)
    assert logits.shape == (2, 2, 96, 96) and torch.isfinite(logits).all()
    assert set(logits[:, 1].unique().tolist()) <= {-1.0, 1.0} and (logits[:, 0] == 0).all()
    assert torch.equal(logits, model(query, supports, masks))


def test_cached_features_give_the_same_logits(model):
    """The SAM embedding travels with the backbone features through the feature cache: cached = uncached, exactly."""
    query, supports, masks = episode(shots=2)
    cache = FeatureCache(model.encode, {"backbone": model.backbone.identity})
    ids = ["q0", "q1", "s0", "s1", "s2", "s3"]
    images = torch.cat([query, supports.flatten(0, 1)]).float() / 255
    cache.encode(images, ids)
    feats = cache.encode(images, ids)  # every one a hit now
    assert cache.hits == 6
    query_feats = [f[:2] for f in feats]
    support_feats = [f[2:].unflatten(0, (2, 2)) for f in feats]
    cached = model.forward_features(query_feats, support_feats, masks, None, (96, 96))
    assert torch.equal(cached, model(query, supports, masks))
    assert len(feats) == 2 and feats[-1].shape == (6, 32, 16, 16)  # DINO map + SAM embedding


@pytest.mark.parametrize("sam", [[], SAM2], ids=["sam", "sam2"])
def test_k_shot_and_vote_both_run(sam):
    query, supports, masks = episode(shots=3)
    for fusion in ("model", "vote"):
        cfg = load_config(None, [*OVERRIDES, *sam, f"model.shot_fusion={fusion}"])
        logits = build_model(cfg.model).eval()(query, supports, masks)
        assert logits.shape == (2, 2, 96, 96) and torch.isfinite(logits).all()


def test_empty_support_gives_background(model):
    query, supports, masks = episode()
    logits = model(query, supports, torch.zeros_like(masks))
    assert (logits[:, 1] < 0).all()


def test_protocol_names_both_encoders_their_weights_and_sizes(model):
    cfg = load_config(None, OVERRIDES)
    record = protocol_record(cfg, model)
    assert record["head"] == "gfsam" and record["pretrained"] == "none"
    assert record["sam"] == {"name": "vit_h", "pretrained": "none", "preset": "tiny256", "image_size": 256,
                             "dtype": "fp32"}  # fmt: skip
    assert record["backbone_image_size"] == 64 and record["gfsam"]["token_norm"] is True
    assert "sam:vit_h@tiny256|none" in record["model"] and "@64+" in record["model"]


def test_wrong_sam_image_size_is_an_error_naming_the_key():
    cfg = load_config(None, [o for o in OVERRIDES if "image_size" not in o])
    with pytest.raises(ValueError, match=r"model.sam.image_size=1024 .* takes 256 px"):
        build_model(cfg.model)


def test_missing_sam_weights_name_the_file():
    cfg = load_config(None, [o for o in OVERRIDES if "sam." not in o])
    with pytest.raises(FileNotFoundError, match="sam_vit_h_4b8939.pth"):
        build_model(cfg.model)
    sam2 = ["model.sam.name=sam2.1_hiera_l", "model.sam.pretrained=sam2.1_hiera_large.pt"]
    with pytest.raises(FileNotFoundError, match="sam2.1_hiera_large.pt"):
        build_model(load_config(None, [*(o for o in OVERRIDES if "sam." not in o), *sam2]).model)


@pytest.mark.parametrize("sam", [[], [*SAM2, "data.image_size=128", "model.gfsam.dino_size=64"]], ids=["sam", "sam2"])
def test_demo_fold_cached_equals_uncached_and_says_random(tmp_path, sam):
    """configs/demo_gfsam.yaml through tools/test_fold.py, with SAM 1 or a tiny SAM 2: the cached fold (SAM's
    embeddings and DINO maps in memory) scores exactly as the fold that re-encodes every episode; the protocol records
    both encoders as random."""
    import json
    from pathlib import Path

    from tools import test_fold

    config = str(Path(__file__).resolve().parents[1] / "configs" / "demo_gfsam.yaml")
    small = [f"data.root={tmp_path / 'synthetic'}", "data.synthetic.images=120", "data.synthetic.size=64",
             "data.episodes=6", "eval.batch_size=3", "model.gfsam.max_points=16", *sam]  # fmt: skip
    results = {}
    for mode in ("memory", "off"):
        out = tmp_path / f"{mode}.json"
        assert test_fold.main([config, *small, f"cache.features={mode}", "--out", str(out)]) == 0
        results[mode] = json.loads(out.read_text())
    assert results["memory"]["seeds"] == results["off"]["seeds"]
    protocol = results["memory"]["protocol"]
    assert protocol["head"] == "gfsam" and protocol["pretrained"] == "none" and protocol["sam"]["pretrained"] == "none"
    assert protocol["sam"]["name"] == ("sam2.1_hiera_t" if sam else "vit_b")


def test_sam_keys_are_checked_when_the_config_loads():
    from typing import get_args

    from fewshot.config import ConfigError, SamPreset
    from fewshot.sam.weights import PRESETS

    with pytest.raises(ConfigError, match=r"model.sam.name='vit_hh' is not valid \(did you mean 'vit_h'\?\)"):
        load_config(None, ["model.sam.name=vit_hh"])
    with pytest.raises(ConfigError, match=r"model.sam.preset='tiny' is not valid \(did you mean 'tiny256'\?\)"):
        load_config(None, ["model.sam.preset=tiny"])
    assert set(get_args(SamPreset)) == {"", *PRESETS}


def test_sam2_gfsam_cached_features_give_the_same_logits():
    """With SAM 2 the cache holds its 3 maps after the backbone's; split parts them again: cached = uncached."""
    model = build_model(load_config(None, [*OVERRIDES, *SAM2]).model).eval()
    assert model.backbone.sam.family == "sam2" and model.backbone.channels[-3:] == [4, 8, 32]
    query, supports, masks = episode(shots=2)
    cache = FeatureCache(model.encode, {"backbone": model.backbone.identity})
    ids = ["q0", "q1", "s0", "s1", "s2", "s3"]
    images = torch.cat([query, supports.flatten(0, 1)]).float() / 255
    cache.encode(images, ids)
    feats = cache.encode(images, ids)
    assert cache.hits == 6 and [tuple(f.shape[1:]) for f in feats[1:]] == [(4, 32, 32), (8, 16, 16), (32, 8, 8)]
    query_feats = [f[:2] for f in feats]
    support_feats = [f[2:].unflatten(0, (2, 2)) for f in feats]
    cached = model.forward_features(query_feats, support_feats, masks, None, (96, 96))
    uncached = model(query, supports, masks)
    assert torch.equal(cached, uncached) and set(uncached[:, 1].unique().tolist()) <= {-1.0, 1.0}
    maps, sam = model.backbone.split(support_feats)
    assert len(maps) == 1 and [tuple(m.shape[:2]) for m in sam] == [(2, 2)] * 3


def test_persam_with_sam2_and_presets_of_the_other_family_are_config_errors():
    from fewshot.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.sam.preset='tiny256' is a sam architecture .* sam2_tiny128"):
        load_config(None, ["model.sam.name=sam2.1_hiera_t", "model.sam.preset=tiny256"])
    sam_presets = r"\(tiny1024, tiny256, vith_ratio256\)"
    with pytest.raises(ConfigError, match=rf"zeroshot.sam.preset='sam2_tiny128' is a sam2 .* {sam_presets}"):
        load_config(None, ["zeroshot.sam.preset=sam2_tiny128"])

    for head in ("persam", "persam_f"):
        with pytest.raises(ConfigError, match=rf"model.head={head} is PerSAM, a SAM 1 method .*_hiera_l is SAM 2"):
            load_config(None, [f"model.head={head}", "model.sam.name=sam2.1_hiera_l"])


@pytest.mark.parametrize("name, preset", [("vit_b", "tiny256"), ("sam2.1_hiera_t", "sam2_tiny128")])
def test_gfsam_prompts_land_on_the_official_frame_points(name, preset):
    """GF-SAM's grid point (i, j) is the integer point idx * S / grid in SAM's frame: through pixels of a non-square
    query and the engine's to_frame (SAM 1: longest side S; SAM 2: the S x S square) it comes back there."""
    from fewshot.sam import load_sam
    from fewshot.sam.gfsam import grid_to_pixels

    sam, size, grid = load_sam(name, "none", preset), (60, 90), (7, 5)
    points = torch.tensor([[0, 0], [4, 6], [2, 3], [3, 1]])  # (x, y) on a 5-wide, 7-high grid
    pixels = grid_to_pixels(points, grid, sam.image_size, size, sam.frame_size(size))
    expected = torch.floor(points * torch.tensor([sam.image_size / grid[1], sam.image_size / grid[0]]))
    assert torch.allclose(sam.to_frame(pixels, size), expected, atol=1e-4)

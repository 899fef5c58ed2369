"""The text-conditioned head: the backbone's own text tower, the synonym rule, and checkpoints that carry the class
embeddings (testing one encodes no prompt), on a tiny random open_clip ViT."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import open_clip
import pytest
import torch

from fewshot.backbones import OpenClipBackbone
from fewshot.checkpoint import load_weights, read_weights, save_weights
from fewshot.config import BackboneConfig, Config, ModelConfig, TextHeadConfig, load_config
from fewshot.heads.text import TextHead
from fewshot.model import build_model
from fewshot.text import StoredText
from tools import test_fold

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = {1: "aeroplane", 2: "cat", 3: "pottedplant", 5: "dog"}  # aeroplane -> "aeroplane,airplane"


def text_head_config(name: str, use_supports: bool = False) -> ModelConfig:
    return ModelConfig(
        head="text",
        backbone=BackboneConfig(name=f"open_clip:{name}", pretrained="none", layers=[1, 2]),
        text=TextHeadConfig(dim=16, templates="single", use_supports=use_supports),
    )


@pytest.fixture(scope="module")
def backbone(tiny_clip) -> OpenClipBackbone:
    torch.manual_seed(0)
    return OpenClipBackbone(tiny_clip, layers=[1, 2])


@pytest.fixture
def encode_calls(monkeypatch) -> list[int]:
    """Counts batches through the real text tower (open_clip's CLIP.encode_text)."""
    calls: list[int] = []
    original = open_clip.model.CLIP.encode_text

    def counted(self, text, normalize: bool = False):
        calls.append(len(text))
        return original(self, text, normalize=normalize)

    monkeypatch.setattr(open_clip.model.CLIP, "encode_text", counted)
    return calls


def test_text_head_uses_the_backbones_text_tower(tiny_clip, backbone):
    head = TextHead.from_config(text_head_config(tiny_clip), [48, 48], CLASS_NAMES, text=backbone)
    assert head.text_owner.tolist() == [1, 1, 2, 3, 5] and not head.text_embeddings.requires_grad
    want = backbone.text.encode_names(["aeroplane", "airplane", "cat", "potted plant", "dog"], "single")
    torch.testing.assert_close(head.text_embeddings, want)  # the same CLIP as the image features, no second model


def test_text_head_shapes_gradients_and_novel_names(tiny_clip, backbone):
    torch.manual_seed(0)
    head = TextHead.from_config(text_head_config(tiny_clip), [24, 24], CLASS_NAMES, text=backbone)
    feats = [torch.randn(2, 24, 4, 4) for _ in range(2)]
    support_feats = [torch.randn(2, 1, 24, 4, 4) for _ in range(2)]
    masks = torch.randint(0, 2, (2, 1, 64, 64))
    logits = head(feats, support_feats, masks, torch.tensor([1, 2]))  # class 1 has two synonyms
    assert logits.shape == (2, 2, 4, 4)
    logits.logsumexp(1).mean().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"
    with torch.no_grad():  # another class name (a 'novel' class) changes the prediction; supports do not
        other = head(feats, support_feats, masks, torch.tensor([5, 2]))
        same = head(feats, support_feats, 1 - masks, torch.tensor([1, 2]))
    assert not torch.allclose(other[0], logits[0]) and torch.allclose(other[1], logits[1])
    torch.testing.assert_close(same, logits.detach())


def test_synonyms_take_the_most_probable_one(tiny_clip, backbone):
    """A class with synonyms scores, per pixel, as its synonym of highest foreground probability: the same heads with
    each synonym as a class of its own give the candidates."""
    torch.manual_seed(1)
    head = TextHead.from_config(text_head_config(tiny_clip), [24], CLASS_NAMES, text=backbone).eval()
    apart = TextHead([24], head.text_embeddings, torch.tensor([1, 2, 3, 4, 5]), dim=16)  # airplane becomes class 2
    apart.load_state_dict({**head.state_dict(), "text_owner": apart.text_owner})
    feats = [torch.randn(3, 24, 4, 4)]
    with torch.no_grad():
        got = head(feats, [], torch.zeros(3, 1, 8, 8), torch.tensor([2, 1, 5]))
        aeroplane, airplane = (apart(feats, [], torch.zeros(3, 1, 8, 8), torch.tensor([c] * 3))[1] for c in (1, 2))
    margin = lambda logits: logits[1] - logits[0]  # noqa: E731
    assert (margin(aeroplane) > margin(airplane)).any() and (margin(aeroplane) < margin(airplane)).any()
    want = torch.where((margin(aeroplane) > margin(airplane))[None], aeroplane, airplane)
    torch.testing.assert_close(got[1], want)
    torch.testing.assert_close(got[2], apart(feats, [], torch.zeros(3, 1, 8, 8), torch.tensor([5, 5, 5]))[2])


def test_text_head_supports_and_state(tiny_clip, backbone):
    head = TextHead.from_config(text_head_config(tiny_clip, use_supports=True), [24], CLASS_NAMES, text=backbone)
    feats, support_feats = [torch.randn(1, 24, 4, 4)], [torch.randn(1, 2, 24, 4, 4)]
    masks = torch.zeros(1, 2, 32, 32, dtype=torch.long)
    masks[..., :16, :] = 1
    with torch.no_grad():
        a = head(feats, support_feats, masks, torch.tensor([1]))
        b = head(feats, support_feats, 1 - masks, torch.tensor([1]))
    assert not torch.allclose(a, b)
    state = head.state_dict()
    assert {"text_embeddings", "text_owner"} <= set(state)
    clone = TextHead([24], torch.zeros_like(head.text_embeddings), dim=16, use_supports=True)
    clone.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(clone(feats, support_feats, masks, torch.tensor([1])), a)


def test_text_head_errors(tiny_clip, backbone):
    cfg = text_head_config(tiny_clip)
    cfg.backbone.name = "timm:vit_tiny_patch16_224"
    with pytest.raises(ValueError, match="open_clip"):
        TextHead.from_config(cfg, [24], CLASS_NAMES, text=None)
    head = TextHead([24], torch.randn(3, 32), dim=16)  # classes 1, 2, 3
    feats = [torch.randn(1, 24, 4, 4)]
    with pytest.raises(ValueError, match="class_ids"):
        head(feats, [], torch.zeros(1, 1, 8, 8), None)
    with pytest.raises(ValueError, match="did not embed"):
        head(feats, [], torch.zeros(1, 1, 8, 8), torch.tensor([4]))
    with pytest.raises(ValueError, match="class names"):
        TextHead.from_config(text_head_config(tiny_clip), [24], None, text=backbone)
    with pytest.raises(ValueError, match="another dataset"):
        StoredText(torch.randn(3, 32), torch.tensor([1, 2, 3])).encode_text([("cat",), ("sofa", "couch"), ("dog",)])


def test_checkpoint_carries_the_class_embeddings(tiny_clip, tmp_path, encode_calls):
    """Loading a text-head checkpoint encodes no prompt and gives the same logits."""
    cfg = dataclasses.replace(Config(), model=text_head_config(tiny_clip))
    torch.manual_seed(0)
    model = build_model(cfg.model, CLASS_NAMES).eval()
    assert encode_calls, "building the head encodes the class prompts"
    with torch.no_grad():
        model.head.background.normal_()  # trained-looking weights, so a wrong load would show
    path = tmp_path / "best.safetensors"
    save_weights(path, model, cfg)
    encode_calls.clear()
    state, trained_cfg, _ = read_weights(path)
    torch.manual_seed(1)  # another random backbone init: the embeddings must come from the file, not be recomputed
    loaded = build_model(trained_cfg.model, CLASS_NAMES, state=state).eval()
    load_weights(loaded, state, path)
    assert encode_calls == []
    query, supports = torch.rand(2, 3, 64, 64), torch.rand(2, 1, 3, 64, 64)
    masks = torch.zeros(2, 1, 64, 64, dtype=torch.long)
    with torch.no_grad():
        want = model(query, supports, masks, torch.tensor([1, 5]))
        got = loaded(query, supports, masks, torch.tensor([1, 5]))
    assert torch.equal(got, want)


def test_test_fold_with_a_text_checkpoint_encodes_no_prompt(tiny_clip, tmp_path, encode_calls):
    overrides = [
        f"data.root={tmp_path / 'synthetic'}",
        "data.synthetic.images=120",
        "data.synthetic.size=64",
        "data.image_size=64",
        "data.min_pixels=64",
        "data.episodes=4",
        "data.num_workers=0",
        "model.head=text",
        f"model.backbone.name=open_clip:{tiny_clip}",
        "model.backbone.layers=[1, 2]",
        "model.text.dim=16",
        "model.text.templates=single",
        "device=cpu",
    ]
    demo = str(REPO / "configs" / "demo.yaml")
    cfg = load_config(demo, overrides)
    from episodes.sources import build_source

    model = build_model(cfg.model, build_source(cfg.data).class_names)
    checkpoint, out = tmp_path / "best.safetensors", tmp_path / "results.json"
    save_weights(checkpoint, model, cfg)
    encode_calls.clear()
    assert test_fold.main([demo, *overrides, "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert encode_calls == []
    protocol = json.loads(out.read_text())["protocol"]
    assert protocol["shots"] == 0 and protocol["head"] == "text"  # text only: the zero-shot column

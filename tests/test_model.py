"""FewShotSegmenter with a tiny conv backbone and with random-init timm backbones: shapes, gradients, shot fusion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.backbones.base import Backbone
from fewshot.config import ModelConfig
from fewshot.heads import HEADS, build_head
from fewshot.losses import cross_entropy
from fewshot.model import FewShotSegmenter, build_model
from fewshot.text import StoredText


class TinyBackbone(Backbone):
    """Two conv stages (strides 4 and 8) standing in for a frozen backbone."""

    def __init__(self):
        super().__init__()
        self.frozen = True
        self.stage1 = nn.Conv2d(3, 8, kernel_size=3, stride=4, padding=1)
        self.stage2 = nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.feature_info = [{"num_chs": 8, "reduction": 4, "index": 0}, {"num_chs": 16, "reduction": 8, "index": 1}]
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        self.identity = "tiny:conv|none|0,1"

    def forward_intermediates(self, images: Tensor) -> list[Tensor]:
        x = (images - 0.5) / 0.25
        a = F.relu(self.norm(self.stage1(x)))
        return [a, F.relu(self.stage2(a))]


class CopyHead(nn.Module):
    """Predicts the support mask of the (single) shot as the query mask: makes vote counts known in advance."""

    def forward(self, query_feats, support_feats, support_masks, class_ids=None):
        fg = (support_masks[:, 0] == 1).float()
        return torch.stack([1 - fg, fg], dim=1)


# Every registered head (fewshot.heads.HEADS) with its defaults, fused in one pass and by HSNet's vote, plus variants:
# a new head is tested here without an edit.
VARIANTS = {
    "prototype_free": ("prototype", {"trainable": False}, "model"),
    "transformer_prototype": ("transformer", {"attention": "prototype"}, "model"),
    "text_supports": ("text", {"use_supports": True}, "model"),
}
CONFIGS = {
    **{name: (name, {}, "model") for name in HEADS},
    **{f"{name}_vote": (name, {}, "vote") for name in HEADS},
    **VARIANTS,
}
SMALL = {"proj_dim": 16, "dim": 16, "heads": 2}  # small widths where a head's config has these fields
CLASS_NAMES = {c: f"class {c}" for c in range(1, 6)}
IDS = torch.tensor([3, 5])  # the episodes' classes (text-conditioned heads read them)


def make_cfg(name: str) -> ModelConfig:
    head, overrides, fusion = CONFIGS[name]
    cfg = ModelConfig(head=head, shot_fusion=fusion)
    cfg.backbone.pretrained = "none"
    section = getattr(cfg, head, None)
    for key, value in {**SMALL, **overrides}.items():
        if section is not None and hasattr(section, key):
            setattr(section, key, value)
    return cfg


def stored_text() -> StoredText:
    """Random unit embeddings of CLASS_NAMES, as a text-head checkpoint stores them."""
    embeddings = F.normalize(torch.randn(5, 12, generator=torch.Generator().manual_seed(5)), dim=1)
    return StoredText(embeddings, torch.arange(5))


def make_head(cfg: ModelConfig, channels: list[int]) -> nn.Module:
    return build_head(cfg, channels, CLASS_NAMES, text=stored_text())


def make_model(name: str) -> FewShotSegmenter:
    torch.manual_seed(0)
    cfg = make_cfg(name)
    backbone = TinyBackbone()
    return FewShotSegmenter(backbone, make_head(cfg, backbone.channels), cfg.shot_fusion, cfg.head)


def make_episode(batch: int = 2, shots: int = 3, size: tuple[int, int] = (36, 44), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, generator=gen)
    supports = torch.randint(0, 256, (batch, shots, 3, *size), dtype=torch.uint8, generator=gen)
    masks = torch.zeros(batch, shots, *size, dtype=torch.long)
    masks[..., 8:24, 10:30] = 1
    masks[..., 7, :] = 255
    return query, supports, masks


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shape_gradients_and_frozen_backbone(name):
    model = make_model(name).train()
    query, supports, masks = make_episode(shots=3)
    logits = model(query, supports, masks, torch.tensor([3, 5]))
    assert logits.shape == (2, 2, 36, 44) and torch.isfinite(logits).all()
    assert not model.backbone.training  # frozen: eval-mode norms even in model.train()
    if name.endswith("vote"):  # K 1-shot votes carry no gradient; a 1-shot batch is the plain (trainable) pass
        assert not logits.requires_grad
        query, supports, masks = make_episode(shots=1)
        logits = model(query, supports, masks, IDS)
    target = (torch.arange(44) > 20).long().expand(2, 36, 44)
    if name == "prototype_free":
        assert not any(p.requires_grad for p in model.parameters())
        return
    cross_entropy(logits, target).backward()
    missing = [n for n, p in model.head.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"head parameters without gradient: {missing}"
    assert all(p.grad is None for p in model.backbone.parameters())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prediction_does_not_depend_on_support_order(name):
    model = make_model(name).eval().double()
    query, supports, masks = make_episode(shots=4)
    query, supports = query.double() / 255, supports.double() / 255
    perm = torch.tensor([3, 1, 0, 2])
    with torch.no_grad():
        ordered = model(query, supports, masks, IDS)
        shuffled = model(query, supports[:, perm], masks[:, perm], IDS)
    assert torch.allclose(ordered, shuffled, rtol=0, atol=1e-10)


def test_vote_is_half_the_max_vote():
    model = FewShotSegmenter(TinyBackbone(), CopyHead(), shot_fusion="vote")
    masks = torch.zeros(4, 3, 4, 4, dtype=torch.long)
    masks[0, :, 0, 0] = 1  # episode 0: votes 3 at (0,0), 2 at (0,1), 1 at (0,2): max 3 -> votes >= 1.5
    masks[0, :2, 0, 1] = 1
    masks[0, 0, 0, 2] = 1
    masks[1, :2, 1, 1] = 1  # episode 1: max 2 -> votes >= 1 (the equality case)
    masks[1, 2, 2, 2] = 1
    masks[2, 1, 3, 3] = 1  # episode 2: max 1 -> every voted pixel
    masks[2, 1, 0, 0] = 255  # void is not a vote; episode 3: no vote at all -> background
    query, supports = torch.zeros(4, 3, 4, 4), torch.zeros(4, 3, 3, 4, 4)
    pred = model(query, supports, masks).argmax(dim=1)
    expected = torch.zeros(4, 4, 4, dtype=torch.long)
    expected[0, 0, :2] = 1
    expected[1, 1, 1] = expected[1, 2, 2] = 1
    expected[2, 3, 3] = 1
    assert torch.equal(pred, expected)


@pytest.mark.parametrize("name", ["prototype_free", "prototype", "transformer", "prototype_vote"])
def test_empty_support_masks(name):
    model = make_model(name).eval()
    query, supports, masks = make_episode()
    masks = torch.where(masks == 255, masks, torch.zeros_like(masks))  # no foreground anywhere, void kept
    with torch.no_grad():
        logits = model(query, supports, masks, IDS)
    assert torch.isfinite(logits).all()
    if name == "prototype_free":
        assert (logits.argmax(dim=1) == 0).all()


def test_inputs_uint8_float_sizes_and_cached_features():
    model = make_model("prototype").eval()
    query, supports, masks = make_episode()
    with torch.no_grad():
        from_uint8 = model(query, supports, masks)
        from_float = model(query.float() / 255, supports.float() / 255, masks)
        feats = model.encode(query)
        support_feats = [f.unflatten(0, (2, 3)) for f in model.encode(supports.flatten(0, 1))]
        cached = model.forward_features(feats, support_feats, masks, None, (36, 44))
        small = F.interpolate(supports.flatten(0, 1).float(), size=(24, 32)).unflatten(0, (2, 3))
        small_masks = F.interpolate(masks.flatten(0, 1)[:, None].float(), size=(24, 32)).long()[:, 0]
        other_size = model(query, small.to(torch.uint8), small_masks.unflatten(0, (2, 3)))
    assert torch.allclose(from_uint8, from_float, atol=1e-5)
    assert torch.allclose(from_uint8, cached, atol=1e-5)
    assert other_size.shape == (2, 2, 36, 44) and torch.isfinite(other_size).all()


def test_encode_contexts():
    model = make_model("prototype")
    images = torch.rand(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert all(torch.is_inference(f) for f in model.encode(images))
    model.train()
    feats = model.encode(images)
    assert not any(torch.is_inference(f) or f.requires_grad for f in feats)


def test_bad_input_is_named():
    model = make_model("prototype")
    query, supports, masks = make_episode()
    with pytest.raises(ValueError, match=r"support_masks \(2, 3, 36, 40\).*\(2, 3, 3, 36, 44\)"):
        model(query, supports, masks[..., :40])
    with pytest.raises(ValueError, match="same B"):
        model(query[:1], supports, masks)
    with pytest.raises(ValueError, match="uint8 or float"):
        model(query.long(), supports, masks)
    with pytest.raises(ValueError, match="vote"):
        FewShotSegmenter(TinyBackbone(), CopyHead(), shot_fusion="mean")


def test_identity_and_auxiliary_loss():
    cfg = make_cfg("prototype")
    cfg.prototype.align_loss = 1.0
    backbone = TinyBackbone()
    model = FewShotSegmenter(backbone, make_head(cfg, backbone.channels), head_name="prototype")
    assert model.identity == "tiny:conv|none|0,1|prototype"
    query, supports, masks = make_episode()
    logits = model(query, supports, masks)
    feats = model.encode(supports.flatten(0, 1))
    loss = model.auxiliary_loss(model.encode(query), [f.unflatten(0, (2, 3)) for f in feats], masks, logits)
    assert torch.isfinite(loss) and loss > 0
    plain = FewShotSegmenter(backbone, make_head(make_cfg("transformer"), backbone.channels))
    logits = plain(query, supports, masks)
    loss = plain.auxiliary_loss(plain.encode(query), [f.unflatten(0, (2, 3)) for f in feats], masks, logits)
    assert loss.ndim == 0 and loss == 0  # a head without an auxiliary loss adds nothing


@pytest.mark.parametrize(
    "backbone, head, attention",
    [("timm:vit_tiny_patch16_224", "prototype", "masked"), ("timm:resnet18", "transformer", "prototype")],
)
def test_build_model_with_timm_backbones(backbone, head, attention):
    cfg = ModelConfig(head=head)
    cfg.backbone.name, cfg.backbone.layers, cfg.backbone.pretrained = backbone, [-2, -1], "none"
    cfg.prototype.proj_dim, cfg.transformer.dim, cfg.transformer.attention = 16, 16, attention
    model = build_model(cfg).train()
    assert model.identity.startswith(backbone) and model.identity.endswith(f"|{head}")
    query, supports, masks = make_episode(batch=1, shots=2, size=(64, 64))
    logits = model(query, supports, masks)
    assert logits.shape == (1, 2, 64, 64) and torch.isfinite(logits).all()
    cross_entropy(logits, masks[:, 0]).backward()
    assert all(p.grad is not None for p in model.head.parameters())
    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())

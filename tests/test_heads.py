"""Heads on random features: shapes, gradients, order of the supports, empty masks, hand-computed prototypes."""

from __future__ import annotations

import math

import pytest
import torch

from fewshot.config import ModelConfig
from fewshot.heads import HEADS, build_head
from fewshot.heads.prototype import PrototypeHead, masked_average, region_weights, shot_prototypes
from fewshot.heads.transformer import CrossAttention, TransformerHead
from fewshot.text import StoredText

CHANNELS = [8, 16]
SIZES = [(8, 10), (4, 5)]  # two layers at different strides

# Variants beyond each registered head's defaults. Every name of fewshot.heads.HEADS is tested with its defaults
# automatically (a new head needs no edit here), plus these variants.
VARIANTS = {
    "prototype_free": ("prototype", {"trainable": False}),
    "transformer_prototype": ("transformer", {"attention": "prototype"}),
    "text_supports": ("text", {"use_supports": True}),
}
SMALL = {"proj_dim": 16, "dim": 16, "heads": 2}  # small widths where a head's config has these fields
HEAD_CONFIGS = {**{name: (name, {}) for name in HEADS}, **VARIANTS}
CLASS_NAMES = {1: "cat", 2: "dog", 3: "sofa"}


def stored_text() -> StoredText:
    """Random unit class embeddings of CLASS_NAMES for text-conditioned heads, as a checkpoint stores them."""
    embeddings = torch.nn.functional.normalize(torch.randn(3, 12, generator=torch.Generator().manual_seed(5)), dim=1)
    return StoredText(embeddings, torch.tensor([0, 1, 2]))


def make_head(name: str) -> torch.nn.Module:
    head, overrides = HEAD_CONFIGS[name]
    cfg = ModelConfig(head=head)
    section = getattr(cfg, head, None)
    for key, value in {**SMALL, **overrides}.items():
        if section is not None and hasattr(section, key):
            setattr(section, key, value)
    torch.manual_seed(0)
    return build_head(cfg, CHANNELS, CLASS_NAMES, text=stored_text())


def uses_supports(head: torch.nn.Module) -> bool:
    return getattr(head, "use_supports", True)


def make_inputs(batch: int = 2, shots: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    query = [torch.randn(batch, c, *s, generator=gen) for c, s in zip(CHANNELS, SIZES, strict=True)]
    support = [torch.randn(batch, shots, c, *s, generator=gen) for c, s in zip(CHANNELS, SIZES, strict=True)]
    masks = torch.randint(0, 2, (batch, shots, 32, 40), generator=gen)
    masks[..., :4, :] = 255
    return query, support, masks


def test_region_weights_by_area_with_void():
    mask = torch.tensor([[1, 1, 0, 255], [1, 0, 0, 255], [0, 0, 0, 0], [0, 0, 0, 1]])
    fg, bg = region_weights(mask, (2, 2))
    assert torch.allclose(fg, torch.tensor([[0.75, 0.0], [0.0, 0.25]]))
    assert torch.allclose(bg, torch.tensor([[0.25, 0.5], [1.0, 0.75]]))  # void counts as neither
    single = torch.zeros(1, 1, 17, 17, dtype=torch.long)
    single[0, 0, 8, 8] = 1
    assert region_weights(single, (3, 3))[0].sum() > 0  # one pixel never vanishes on a coarser grid


def test_masked_average_and_shot_prototypes():
    feats = torch.arange(8.0).view(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    protos, present = masked_average(feats, torch.tensor([[[1.0, 0.0], [0.0, 3.0]]]))
    assert torch.allclose(protos, torch.tensor([[(0 + 3 * 3) / 4, (4 + 3 * 7) / 4]])) and present.all()
    protos, present = masked_average(feats, torch.zeros(1, 2, 2))
    assert torch.equal(protos, torch.zeros(1, 2)) and not present.any()

    support = torch.stack([feats[0], 2 * feats[0], 5 * feats[0]])[None]  # (1, 3, 2, 2, 2)
    weights = torch.zeros(1, 3, 2, 2)
    weights[0, 0, 0, 0] = 1  # shot 0: pixel value (0, 4)
    weights[0, 1, 1, 1] = 1  # shot 1: pixel value (6, 14); shot 2 has no region and must not count
    mean, present = shot_prototypes(support, weights)
    assert torch.allclose(mean, torch.tensor([[3.0, 9.0]])) and present.all()
    assert not shot_prototypes(support, torch.zeros(1, 3, 2, 2))[1].any()


def test_training_free_head_matches_cosine_by_hand():
    head = PrototypeHead([2], temperature=10.0, trainable=False)
    assert not list(head.parameters())
    support = torch.zeros(1, 1, 2, 2, 2)
    support[0, 0, :, 0, :] = torch.tensor([1.0, 0.0])[:, None]  # top row (foreground): (1, 0)
    support[0, 0, :, 1, :] = torch.tensor([0.0, 1.0])[:, None]  # bottom row (background): (0, 1)
    masks = torch.tensor([[[[1, 1], [0, 0]]]])
    query = torch.tensor([[3.0, 1.0], [1.0, 0.0]]).T.reshape(1, 2, 1, 2)  # pixels (3, 1) and (1, 0)
    logits = head([query], [support], masks)
    cos = 3 / math.sqrt(10)
    expected = torch.tensor([[[[10 * 1 / math.sqrt(10), 0.0]], [[10 * cos, 10.0]]]])  # [bg, fg] channels
    assert torch.allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize("name", list(HEAD_CONFIGS))
def test_head_shape_gradients_and_no_nan(name):
    head = make_head(name)
    query, support, masks = make_inputs()
    logits = head(query, support, masks, torch.tensor([1, 2]))
    scale = logits.shape[-2] // SIZES[0][0]  # on the finest grid, or a decoder's upsampling of it (transformer: 2x)
    assert logits.shape == (2, 2, SIZES[0][0] * scale, SIZES[0][1] * scale) and scale >= 1
    assert torch.isfinite(logits).all()
    params = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    if name == "prototype_free":
        assert not params
        return
    logits.logsumexp(dim=1).mean().backward()
    missing = [n for n, p in params if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name", list(HEAD_CONFIGS))
def test_head_does_not_depend_on_support_order(name):
    head = make_head(name).eval().double()  # float64: summation-order noise ~1e-15, far below any real change
    query, support, masks = make_inputs(shots=4)
    query, support = [q.double() for q in query], [s.double() for s in support]
    perm = torch.tensor([2, 0, 3, 1])
    ids = torch.tensor([1, 2])
    with torch.no_grad():
        ordered = head(query, support, masks, ids)
        shuffled = head(query, [s[:, perm] for s in support], masks[:, perm], ids)
        other = head(query, support, 1 - masks.clamp(max=1), ids)  # another support set
    assert torch.allclose(ordered, shuffled, rtol=0, atol=1e-10)
    if uses_supports(head):  # the output must follow the supports
        assert (ordered - other).abs().max() > 1e-6
    else:  # a text-only head ignores them
        assert torch.equal(ordered, other)


@pytest.mark.parametrize("name", list(HEAD_CONFIGS))
@pytest.mark.parametrize("fill", [0, 255])
def test_empty_support_foreground_gives_finite_logits(name, fill):
    head = make_head(name)
    query, support, _ = make_inputs()
    masks = torch.full((2, 3, 32, 40), fill)
    logits = head(query, support, masks, torch.tensor([1, 2]))
    assert torch.isfinite(logits).all()
    if name == "prototype_free":  # documented: no foreground prototype -> background everywhere
        assert (logits.argmax(dim=1) == 0).all()


def test_empty_foreground_in_some_shots_is_ignored():
    head = make_head("prototype_free")
    query, support, masks = make_inputs(shots=2)
    with torch.no_grad():
        one_shot = head(query, [s[:, :1] for s in support], masks[:, :1])
        masks[:, 1] = 0  # the second shot has no foreground: only its background prototype counts
        fg_two = head(query, support, masks)[:, 1]
    assert torch.allclose(one_shot[:, 1], fg_two, atol=1e-5)


def test_alignment_loss():
    query, support, masks = make_inputs()
    cfg = ModelConfig(head="prototype")
    cfg.prototype.proj_dim, cfg.prototype.align_loss = 16, 0.5
    head = build_head(cfg, CHANNELS)
    logits = torch.nn.functional.interpolate(head(query, support, masks), size=(32, 40), mode="bilinear")
    loss = head.auxiliary_loss(query, support, masks, logits)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in head.proj.parameters())
    cfg.prototype.align_loss = 0.0
    assert build_head(cfg, CHANNELS).auxiliary_loss(query, support, masks, logits) == 0
    cfg.prototype.trainable, cfg.prototype.align_loss = False, 0.5
    assert build_head(cfg, CHANNELS).auxiliary_loss(query, support, masks, logits) == 0
    assert not hasattr(make_head("transformer"), "auxiliary_loss")  # FewShotSegmenter adds 0 for it


def test_masked_attention_map_is_attention_weighted_mask():
    torch.manual_seed(0)
    attn = CrossAttention(dim=8, heads=2)
    x, context, mask = torch.randn(1, 5, 8), torch.randn(1, 7, 8), torch.rand(1, 7)
    _, maps = attn(x, context, extra=mask)
    q = attn.to_q(attn.norm_x(x)).view(1, 5, 2, 4).transpose(1, 2)
    k = attn.to_k(attn.norm_context(context)).view(1, 7, 2, 4).transpose(1, 2)
    weights = (q @ k.transpose(-1, -2) / 2).softmax(dim=-1)  # (1, 2, 5, 7); scale 1 / sqrt(4)
    assert torch.allclose(maps, weights @ mask[0], atol=1e-5)


def test_config_reaches_the_heads():
    cfg = ModelConfig(head="prototype")
    cfg.prototype.proj_dim, cfg.prototype.temperature = 24, 7.0
    head = build_head(cfg, CHANNELS)
    assert isinstance(head, PrototypeHead) and head.proj[1].out_channels == 24 and head.temperature == 7.0
    cfg = ModelConfig(head="transformer")
    cfg.transformer.dim, cfg.transformer.depth, cfg.transformer.attention = 32, 3, "prototype"
    head = build_head(cfg, CHANNELS)
    assert isinstance(head, TransformerHead) and len(head.blocks[0]) == 3 and head.proj[0].out_channels == 32


def test_bad_input_is_named():
    with pytest.raises(KeyError, match="prototype.*transformer"):
        build_head(ModelConfig(head="hsnet"), CHANNELS)
    with pytest.raises(ValueError, match="masked"):
        TransformerHead(CHANNELS, attention="dense")
    with pytest.raises(ValueError, match="divisible"):
        TransformerHead(CHANNELS, dim=10, heads=4)
    query, support, masks = make_inputs()
    for name in HEAD_CONFIGS:
        head = make_head(name)
        if uses_supports(head):  # a head that reads the supports checks that their masks fit them
            with pytest.raises(ValueError, match=r"\(2, 2, 32, 40\)"):
                head(query, support, masks[:, :2], torch.tensor([1, 2]))

"""Dense CLIP (every last-block method against a recomputation from the weights), the segmenter, the fold model and
the text-conditioned head, on a tiny random open_clip ViT."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from test_text import tiny_clip  # noqa: F401  (session fixture: registers the tiny open_clip config)

from fewshot.config import BackboneConfig, ModelConfig, TextHeadConfig, ZeroShotConfig
from fewshot.heads.text import TextHead
from fewshot.zeroshot import METHODS, DenseCLIP, TextEpisodeModel, ZeroShotSegmenter, window_boxes


@pytest.fixture(scope="module")
def dense(tiny_clip) -> DenseCLIP:  # noqa: F811
    torch.manual_seed(0)
    model = DenseCLIP(tiny_clip, "none", "vanilla")
    for block in model.model.visual.transformer.resblocks:  # non-trivial layer scales and biases
        block.ls_1.gamma.data.uniform_(0.5, 1.5)
        block.ls_2.gamma.data.uniform_(0.5, 1.5)
        block.attn.in_proj_bias.data.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def resized_clip(dense, tiny_clip):  # noqa: F811
    """The same weights in an open_clip model built for 48 x 80 inputs, position embeddings resized by open_clip."""
    import open_clip
    from open_clip.model import resize_pos_embed

    model = open_clip.create_model(tiny_clip, pretrained=None, force_image_size=(48, 80)).eval()
    state = dense.model.state_dict()
    resize_pos_embed(state, model)
    model.load_state_dict(state)
    return model


def reference_tokens(visual, images: torch.Tensor, method: str, std: float = 5.0) -> torch.Tensor:
    """Independent recomputation: open_clip's own embedding and blocks, then the method's last block head by head."""
    x = visual._embeds(images)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    if method == "vanilla":
        x = last(x)
    else:
        y = last.ln_1(x)
        C, heads = y.shape[-1], last.attn.num_heads
        w, b = last.attn.in_proj_weight, last.attn.in_proj_bias
        q, k, v = (y @ w[i * C : (i + 1) * C].T + b[i * C : (i + 1) * C] for i in range(3))
        gh, gw = visual.grid_size
        pos = [(i // gw, i % gw) for i in range(gh * gw)]
        prior = torch.zeros(1 + gh * gw, 1 + gh * gw)
        for i, (yi, xi) in enumerate(pos):
            for j, (yj, xj) in enumerate(pos):
                prior[1 + i, 1 + j] = math.exp(-((yi - yj) ** 2 + (xi - xj) ** 2) / (2 * std**2))
        outs = []
        d = C // heads
        for h in range(heads):
            qh, kh, vh = (t[..., h * d : (h + 1) * d] for t in (q, k, v))
            if method == "maskclip":
                outs.append(vh)
                continue
            qq = torch.softmax(qh @ qh.transpose(1, 2) / math.sqrt(d), dim=-1)
            kk = torch.softmax(kh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)
            attn = {
                "sclip": qq + kk,
                "clearclip": qq,
                "naclip": torch.softmax(kh @ kh.transpose(1, 2) / math.sqrt(d) + prior, dim=-1),
            }[method]
            outs.append(attn @ vh)
        gamma1, gamma2 = (getattr(ls, "gamma", 1.0) for ls in (last.ls_1, last.ls_2))  # no layer scale in ViT-B-16
        out = last.attn.out_proj(torch.cat(outs, dim=-1)) * gamma1
        if method in ("clearclip", "naclip"):
            x = out
        else:
            x = x + out
            x = x + gamma2 * last.mlp(last.ln_2(x))
    tokens = visual.ln_post(x)[:, 1:] @ visual.proj
    gh, gw = visual.grid_size
    return F.normalize(tokens, dim=-1).transpose(1, 2).reshape(len(images), -1, gh, gw)


@pytest.mark.parametrize("method", METHODS)
def test_methods_equal_recomputation(dense, resized_clip, method):
    torch.manual_seed(1)
    dense.method = method
    for model, size in ((dense.model, (64, 64)), (resized_clip, (48, 80))):
        images = torch.rand(2, 3, *size)
        with torch.no_grad():
            got = dense.encode_image_dense(images)
            want = reference_tokens(model.visual, (images - dense.mean) / dense.std, method)
        assert got.shape == want.shape == (2, 32, size[0] // 16, size[1] // 16)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    dense.method = "vanilla"


def test_methods_differ(dense):
    images = torch.rand(1, 3, 64, 64)
    outputs = {}
    with torch.no_grad():
        for method in METHODS:
            dense.method = method
            outputs[method] = dense.encode_image_dense(images)
    dense.method = "vanilla"
    for a in METHODS:
        for b in METHODS:
            assert a == b or not torch.allclose(outputs[a], outputs[b], atol=1e-4), (a, b)


def test_vanilla_equals_open_clip_tokens(dense, resized_clip):
    dense.method = "vanilla"
    for model, size in ((dense.model, (64, 64)), (resized_clip, (48, 80))):
        images = torch.rand(2, 3, *size)
        visual = model.visual
        visual.output_tokens = True
        with torch.no_grad():
            pooled, tokens = visual((images - dense.mean) / dense.std)  # tokens: after ln_post, before proj
        visual.output_tokens = False
        want = F.normalize(tokens @ visual.proj, dim=-1).transpose(1, 2).reshape(2, -1, size[0] // 16, size[1] // 16)
        torch.testing.assert_close(dense.encode_image_dense(images), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [(16, 16), (32, 96), (96, 48), (128, 112)])
def test_resampled_grid(dense, size):
    with torch.no_grad():
        features = dense.encode_image_dense(torch.rand(1, 3, *size))
    assert features.shape == (1, 32, size[0] // 16, size[1] // 16)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(1, size[0] // 16, size[1] // 16))
    assert dense.resampled_pos_embed((size[0] // 16, size[1] // 16)).shape == (1 + size[0] * size[1] // 256, 64)


def test_input_checks_and_uint8(dense):
    with pytest.raises(ValueError, match="multiple of the patch"):
        dense.encode_image_dense(torch.rand(1, 3, 50, 64))
    images = torch.randint(0, 256, (1, 3, 32, 48), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(dense.encode_image_dense(images), dense.encode_image_dense(images.float() / 255))


def test_unknown_method_and_random_weights_warning(tiny_clip, caplog):  # noqa: F811
    with pytest.raises(KeyError, match="clearclip"):
        DenseCLIP(tiny_clip, "none", "maskclip++")
    with caplog.at_level(logging.WARNING):
        model = DenseCLIP(tiny_clip, "none", "sclip")
    assert model.random_weights and "meaningless" in caplog.text
    assert model.encode_text(["cat", "dog"], "single").shape == (2, 32)


def test_window_boxes():
    assert window_boxes(100, 150, 0, 50) == [(0, 100, 0, 150)]
    boxes = window_boxes(300, 500, 224, 112)
    assert all(y1 - y0 == 224 and x1 - x0 == 224 for y0, y1, x0, x1 in boxes)
    assert {b[0] for b in boxes} == {0, 76} and {b[2] for b in boxes} == {0, 112, 224, 276}
    cover = torch.zeros(300, 500)
    for y0, y1, x0, x1 in boxes:
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    assert window_boxes(100, 60, 224, 112) == [(0, 100, 0, 60)]  # smaller than the window: one crop


def make_segmenter(dense, classes, **kwargs) -> ZeroShotSegmenter:
    dense.method = "sclip"
    settings = dict(templates="single", short_side=0, window=0, stride=32, logit_scale=10.0) | kwargs
    return ZeroShotSegmenter(dense, classes, **settings)


def test_segmenter_whole_image_matches_manual(dense):
    seg = make_segmenter(dense, ["cat", "sofa,couch"], background_prompts=["background", "wall"])
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        scores = seg(images)
        features = dense.encode_image_dense(images)  # (2, D, 4, 4)
        text = dense.encode_text(["background", "wall", "cat", "sofa", "couch"], "single")
    sims = F.interpolate(torch.einsum("bdhw,md->bmhw", features, text), size=(64, 64), mode="bilinear")
    channels = torch.stack([sims[:, :2].amax(1), sims[:, 2], sims[:, 3:].amax(1)], dim=1)
    torch.testing.assert_close(scores, (10.0 * channels).log_softmax(1), atol=1e-5, rtol=1e-4)
    assert seg.predict(images).shape == (2, 64, 64)


def test_segmenter_sliding_window_averages_overlaps(dense):
    seg = make_segmenter(dense, ["cat"], window=64, stride=32)
    images = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        sims = seg._similarity(images)  # (1, M, 64, 96)
        left, right = seg._encode(images[..., :64]), seg._encode(images[..., 32:])
    torch.testing.assert_close(sims[..., :32], left[..., :32])
    torch.testing.assert_close(sims[..., 32:64], (left[..., 32:] + right[..., :32]) / 2)
    torch.testing.assert_close(sims[..., 64:], right[..., 32:])


def test_segmenter_resizes_and_returns_input_size(dense):
    seg = make_segmenter(dense, ["cat", "dog"], short_side=48, window=32, stride=16)
    images = torch.randint(0, 256, (2, 3, 70, 101), dtype=torch.uint8)
    with torch.no_grad():
        scores = seg(images)
    assert scores.shape == (2, 3, 70, 101) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores.exp().sum(1), torch.ones(2, 70, 101))


def test_background_threshold_and_both(dense):
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        thr = make_segmenter(dense, ["cat", "dog"], background="threshold", threshold=0.6)(images)
        both = make_segmenter(dense, ["cat", "dog"], background="both", threshold=0.6)(images)
        prompt = make_segmenter(dense, ["cat", "dog"], background="prompt")(images)
    assert torch.allclose(thr[:, 0], torch.full_like(thr[:, 0], math.log(0.6)))
    torch.testing.assert_close(thr[:, 1:].exp().sum(1), torch.ones(1, 64, 64))
    torch.testing.assert_close(both[:, 0], prompt[:, 0].clamp(min=math.log(0.6)))
    torch.testing.assert_close(both[:, 1:], prompt[:, 1:])
    with pytest.raises(ValueError, match="at least 2 classes"):
        make_segmenter(dense, ["cat"], background="threshold")
    with pytest.raises(ValueError, match="non-empty list"):
        make_segmenter(dense, [])


def test_background_words_leave_out_prompted_classes(dense):
    seg = make_segmenter(dense, ["sky", "cat"])
    rows = int((seg.owner == 0).sum())
    assert rows == 26 and seg.text_embeddings.shape[0] == 26 + 2


def test_segmenter_from_config(dense):
    dense.method = "naclip"
    name = f"open_clip:{dense.name}"
    cfg = ZeroShotConfig(backbone=name, method="naclip", templates="single", short_side=64, window=0)
    seg = ZeroShotSegmenter.from_config(cfg, ["cat"], dense=dense)
    assert seg.window == 0 and seg.short_side == 64 and "win0" in seg.identity and "naclip" in seg.identity
    cfg.method = "sclip"
    with pytest.raises(ValueError, match="does not match"):
        ZeroShotSegmenter.from_config(cfg, ["cat"], dense=dense)


def test_text_episode_model(dense):
    seg = make_segmenter(dense, ["cat", "dog", "bird"])
    model = TextEpisodeModel(seg, [3, 7, 9])
    images = torch.rand(2, 3, 64, 64)
    class_ids = torch.tensor([7, 9])
    with torch.no_grad():
        logits = model(images, torch.rand(2, 1, 3, 64, 64), torch.zeros(2, 1, 64, 64), class_ids)
        labels = seg.predict(images)
    assert logits.shape == (2, 2, 64, 64)
    expected = torch.stack([labels[0] == 2, labels[1] == 3])  # class 7 -> channel 2, class 9 -> channel 3
    assert torch.equal(logits.argmax(1).bool(), expected)
    with pytest.raises(ValueError, match="not among"):
        model(images, None, None, torch.tensor([7, 8]))
    with pytest.raises(ValueError, match="class ids"):
        TextEpisodeModel(seg, [1, 2])


# ----------------------------------------------------------------------------------------------------------------
# Text-conditioned head


def text_head_config(name: str, use_supports: bool = False) -> ModelConfig:
    return ModelConfig(
        head="text",
        backbone=BackboneConfig(name=f"open_clip:{name}", pretrained="none"),
        text=TextHeadConfig(dim=16, templates="single", use_supports=use_supports),
    )


CLASS_NAMES = {1: "aeroplane", 2: "cat", 3: "pottedplant", 5: "dog"}


def test_text_head_shapes_gradients_and_novel_names(tiny_clip):  # noqa: F811
    torch.manual_seed(0)
    head = TextHead.from_config(text_head_config(tiny_clip), [24, 24], CLASS_NAMES)
    assert head.text_embeddings.shape == (6, 32) and not head.text_embeddings.requires_grad
    assert torch.all(head.text_embeddings[4] == 0) and torch.allclose(head.text_embeddings[5].norm(), torch.tensor(1.0))
    feats = [torch.randn(2, 24, 4, 4, requires_grad=False) for _ in range(2)]
    support_feats = [torch.randn(2, 1, 24, 4, 4) for _ in range(2)]
    masks = torch.randint(0, 2, (2, 1, 64, 64))
    logits = head(feats, support_feats, masks, torch.tensor([1, 2]))
    assert logits.shape == (2, 2, 4, 4)
    logits.logsumexp(1).mean().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"
    with torch.no_grad():  # another class name (a 'novel' class) changes the prediction; supports do not
        other = head(feats, support_feats, masks, torch.tensor([5, 2]))
        same = head(feats, support_feats, 1 - masks, torch.tensor([1, 2]))
    assert not torch.allclose(other[0], logits[0]) and torch.allclose(other[1], logits[1])
    torch.testing.assert_close(same, logits.detach())
    assert head.auxiliary_loss(feats, support_feats, masks, logits).item() == 0


def test_text_head_supports_and_state(tiny_clip):  # noqa: F811
    head = TextHead.from_config(text_head_config(tiny_clip, use_supports=True), [24], CLASS_NAMES)
    feats, support_feats = [torch.randn(1, 24, 4, 4)], [torch.randn(1, 2, 24, 4, 4)]
    masks = torch.zeros(1, 2, 32, 32, dtype=torch.long)
    masks[..., :16, :] = 1
    with torch.no_grad():
        a = head(feats, support_feats, masks, torch.tensor([2]))
        b = head(feats, support_feats, 1 - masks, torch.tensor([2]))
    assert not torch.allclose(a, b)
    state = head.state_dict()
    assert "text_embeddings" in state
    clone = TextHead([24], torch.zeros_like(head.text_embeddings), dim=16, use_supports=True)
    clone.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(clone(feats, support_feats, masks, torch.tensor([2])), a)


def test_text_head_errors(tiny_clip):  # noqa: F811
    cfg = text_head_config(tiny_clip)
    cfg.backbone.name = "timm:vit_tiny_patch16_224"
    with pytest.raises(ValueError, match="open_clip"):
        TextHead.from_config(cfg, [24], CLASS_NAMES)
    head = TextHead([24], torch.randn(3, 32), dim=16)
    feats = [torch.randn(1, 24, 4, 4)]
    with pytest.raises(ValueError, match="class_ids"):
        head(feats, [], torch.zeros(1, 1, 8, 8), None)
    with pytest.raises(ValueError, match="outside"):
        head(feats, [], torch.zeros(1, 1, 8, 8), torch.tensor([3]))
    with pytest.raises(ValueError, match="class names"):
        TextHead.from_config(text_head_config(tiny_clip), [24], None)

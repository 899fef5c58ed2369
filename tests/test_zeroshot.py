"""Dense CLIP (every last-block method against a recomputation from the weights), the segmenter against the official
scoring rule, and the fold model's competing-class rule, on a tiny random open_clip ViT."""

from __future__ import annotations

import logging
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import resize_pos_embed
from torch import nn

from fewshot.backbones.open_clip import resample_pos_embed
from fewshot.config import ZeroShotConfig, registry_names
from fewshot.zeroshot import LAST_BLOCKS, DenseCLIP, TextEpisodeModel, ZeroShotSegmenter, window_boxes
from fewshot.zeroshot.segmenter import rescaled_size

METHODS = list(LAST_BLOCKS)
RESIZED = (48, 80)  # a non-native input: a 3 x 5 patch grid instead of 4 x 4


@pytest.fixture(scope="module")
def dense(tiny_clip) -> DenseCLIP:
    torch.manual_seed(0)
    model = DenseCLIP(tiny_clip, "none", "vanilla")
    for block in model.backbone.visual.transformer.resblocks:  # non-trivial layer scales and biases
        block.ls_1.gamma.data.uniform_(0.5, 1.5)
        block.ls_2.gamma.data.uniform_(0.5, 1.5)
        block.attn.in_proj_bias.data.normal_(0, 0.2)
    return model


def resized_visual(dense: DenseCLIP, tiny_clip: str, style: str) -> nn.Module:
    """The same weights in an open_clip tower built for RESIZED inputs; its position embedding resampled by SCLIP's
    `interpolate_pos_encoding` formula ("dino") or by open_clip's own `resize_pos_embed` ("open_clip")."""
    model = open_clip.create_model(tiny_clip, pretrained=None, force_image_size=RESIZED).eval()
    state = {f"visual.{k}": v.clone() for k, v in dense.backbone.visual.state_dict().items()}
    pos = state["visual.positional_embedding"]
    if style == "open_clip":
        resize_pos_embed(state, model)
    else:  # SCLIP clip/model.py: w0 = H // patch + 0.1, scale_factor=(w0 / sqrt(N), h0 / sqrt(N)), bicubic
        n, dim = pos.shape[0] - 1, pos.shape[1]
        h0, w0 = RESIZED[0] // 16 + 0.1, RESIZED[1] // 16 + 0.1
        grid = pos[1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(h0 / math.sqrt(n), w0 / math.sqrt(n)), mode="bicubic")
        state["visual.positional_embedding"] = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, dim)])
    model.visual.load_state_dict({k[len("visual.") :]: v for k, v in state.items()})
    return model.visual


def normalised(dense: DenseCLIP, images: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (dense.backbone.mean, dense.backbone.std))
    return (images - mean) / std


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
def test_methods_equal_recomputation(dense, tiny_clip, method):
    torch.manual_seed(1)
    dense.method = method
    resized = resized_visual(dense, tiny_clip, "dino")  # the published methods' resampling
    for visual, size in ((dense.backbone.visual, (64, 64)), (resized, RESIZED)):
        images = torch.rand(2, 3, *size)
        with torch.no_grad():
            got = dense(images)
            want = reference_tokens(visual, normalised(dense, images), method)
        assert got.shape == want.shape == (2, 32, size[0] // 16, size[1] // 16)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    dense.method = "vanilla"


def test_methods_differ(dense):
    images = torch.rand(1, 3, 64, 64)
    outputs = {}
    with torch.no_grad():
        for method in METHODS:
            dense.method = method
            outputs[method] = dense(images)
    dense.method = "vanilla"
    for a in METHODS:
        for b in METHODS:
            assert a == b or not torch.allclose(outputs[a], outputs[b], atol=1e-4), (a, b)


def test_vanilla_equals_open_clip_tokens(dense, tiny_clip):
    """pos_embed="open_clip": the plain CLIP forward of open_clip's own model, at the native and another size."""
    as_open_clip = DenseCLIP(tiny_clip, "none", "vanilla", pos_embed="open_clip")
    as_open_clip.backbone.visual.load_state_dict(dense.backbone.visual.state_dict())
    resized = resized_visual(dense, tiny_clip, "open_clip")
    for visual, size in ((dense.backbone.visual, (64, 64)), (resized, RESIZED)):
        images = torch.rand(2, 3, *size)
        visual.output_tokens = True
        with torch.no_grad():
            pooled, tokens = visual(normalised(dense, images))  # tokens: after ln_post, before proj
        visual.output_tokens = False
        want = F.normalize(tokens @ visual.proj, dim=-1).transpose(1, 2).reshape(2, -1, size[0] // 16, size[1] // 16)
        torch.testing.assert_close(as_open_clip(images), want, atol=1e-5, rtol=1e-4)


def test_pos_embed_styles_differ_where_the_grid_does():
    pos = torch.randn(1 + 16, 8)
    for style in ("open_clip", "dino"):
        assert resample_pos_embed(pos, (4, 4), (4, 4), style) is pos
        out = resample_pos_embed(pos, (4, 4), (3, 7), style)
        assert out.shape == (1 + 21, 8) and torch.equal(out[0], pos[0])
    dino, plain = (resample_pos_embed(pos, (4, 4), (3, 7), s) for s in ("dino", "open_clip"))
    by_size = F.interpolate(pos[1:].T.reshape(1, 8, 4, 4), size=(3, 7), mode="bicubic").flatten(2)[0].T
    assert not torch.allclose(dino[1:], plain[1:]) and not torch.allclose(dino[1:], by_size)  # factor-based sampling
    with pytest.raises(KeyError, match="dino"):
        resample_pos_embed(pos, (4, 4), (3, 7), "bilinear")


@pytest.mark.parametrize("size", [(16, 16), (32, 96), (96, 48), (128, 112)])
def test_resampled_grid(dense, size):
    with torch.no_grad():
        features = dense(torch.rand(1, 3, *size))
    assert features.shape == (1, 32, size[0] // 16, size[1] // 16)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(1, size[0] // 16, size[1] // 16))


def test_input_checks_and_uint8(dense):
    with pytest.raises(ValueError, match="multiple of the patch"):
        dense(torch.rand(1, 3, 50, 64))
    images = torch.randint(0, 256, (1, 3, 32, 48), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(dense(images), dense(images.float() / 255))


def test_unknown_method_and_random_weights_warning(tiny_clip, caplog):
    with pytest.raises(KeyError, match="clearclip"):
        DenseCLIP(tiny_clip, "none", "maskclip++")
    with caplog.at_level(logging.WARNING):
        model = DenseCLIP(tiny_clip, "none", "sclip")
    assert model.random_weights and "meaningless" in caplog.text
    assert model.encode_text(["cat", "dog"], "single").embeddings.shape == (2, 32)
    with pytest.raises(ValueError, match="open_clip:<model>"):
        DenseCLIP.from_config(ZeroShotConfig(backbone="timm:vit_base_patch16_224"))


def test_config_methods_are_the_last_blocks():
    assert registry_names("zeroshot.method") == sorted(LAST_BLOCKS)


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


def test_segmenter_whole_image_follows_the_official_scoring(dense):
    """SCLIP's postprocess: softmax over every prompt word at the logit scale, then each class's maximum."""
    seg = make_segmenter(dense, ["cat", "sofa,couch"], background_prompts=["background", "wall"])
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        scores = seg(images)
        features = dense(images)  # (2, D, 4, 4)
        words = ["cat", "sofa", "couch", "background", "wall"]
        text = torch.cat([dense.encode_text([w], "single").embeddings for w in words])
    sims = F.interpolate(torch.einsum("bdhw,md->bmhw", features, text), size=(64, 64), mode="bilinear")
    probs = (10.0 * sims).softmax(1)  # over the five words
    channels = torch.stack([probs[:, 3:].amax(1), probs[:, 0], probs[:, 1:3].amax(1)], dim=1)
    torch.testing.assert_close(scores, channels.log(), atol=1e-5, rtol=1e-4)
    assert seg.predict(images).shape == (2, 64, 64)


def test_segmenter_sliding_window_averages_overlaps(dense):
    seg = make_segmenter(dense, ["cat"], window=64, stride=32)
    images = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        sims = seg._similarity(images, (64, 96))  # (1, M, 64, 96)
        left, right = seg._encode(images[..., :64], (64, 64)), seg._encode(images[..., 32:], (64, 64))
    torch.testing.assert_close(sims[..., :32], left[..., :32])
    torch.testing.assert_close(sims[..., 32:64], (left[..., 32:] + right[..., :32]) / 2)
    torch.testing.assert_close(sims[..., 64:], right[..., 32:])


def test_crops_off_the_patch_grid_drop_the_remainder(dense):
    """As CLIP's strided patch convolution: a 40 x 56 crop is encoded on its top-left 32 x 48, then stretched."""
    seg = make_segmenter(dense, ["cat"])
    crop = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        got = seg._encode(crop, (40, 56))
        features = dense(crop[..., :32, :48])  # (1, D, 2, 3)
    want = F.interpolate(torch.einsum("ndhw,md->nmhw", features, seg.text_embeddings), size=(40, 56), mode="bilinear")
    torch.testing.assert_close(got, want)


def test_segmenter_resizes_as_mmseg_and_returns_input_size(dense):
    assert rescaled_size(70, 101, 48) == (48, 69)  # int(101 * 48 / 70 + 0.5)
    assert rescaled_size(333, 500, 336) == (336, 505)  # VOC 500 x 333 at SCLIP's short side
    assert rescaled_size(100, 5000, 336) == (41, 2048)  # the long side is capped at 2048
    seg = make_segmenter(dense, ["cat", "dog"], short_side=48, window=32, stride=16)
    images = torch.randint(0, 256, (2, 3, 70, 101), dtype=torch.uint8)
    with torch.no_grad():
        scores = seg(images)
    assert scores.shape == (2, 3, 70, 101) and torch.isfinite(scores).all() and (scores <= 0).all()


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
    with pytest.raises(ValueError, match="repeat"):
        make_segmenter(dense, ["dog", "cat", "Dog"])
    with pytest.raises(ValueError, match="name a class"):
        make_segmenter(dense, ["cat", "sky"], background_prompts=["background", "sky"])


def test_background_words_leave_out_prompted_classes(dense):
    seg = make_segmenter(dense, ["sky", "cat"])
    rows = int((seg.owner == 0).sum())
    assert rows == 26 and seg.text_embeddings.shape[0] == 26 + 2


def test_segmenter_from_config(dense):
    dense.method = "naclip"
    cfg = ZeroShotConfig(method="naclip", templates="single", short_side=64, window=0, background="both")
    seg = ZeroShotSegmenter.from_config(cfg, ["cat"], dense)
    assert (seg.window, seg.short_side, seg.background) == (0, 64, "both")
    assert seg.identity.startswith(f"zeroshot:{dense.identity}|single|both") and "win0" in seg.identity


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
    assert model.protocol_fields() == {"shots": 0, "shot_fusion": "none"}
    with pytest.raises(ValueError, match="not among"):
        model(images, None, None, torch.tensor([7, 8]))
    with pytest.raises(ValueError, match="class ids"):
        TextEpisodeModel(seg, [1, 2])


class HandSetScores(nn.Module):
    """A segmenter stand-in whose scores [1, 1 + N, 1, P] are given: only the fold model's rule is under test."""

    def __init__(self, scores: torch.Tensor):
        super().__init__()
        self.scores, self.num_classes, self.identity = scores, scores.shape[1] - 1, "hand-set"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scores.expand(len(images), -1, -1, -1)


def test_other_fold_classes_count_as_background():
    """LSeg's rule: the episode's class must beat background and every other class of the fold. Pixel by pixel
    (columns): background wins; the class wins; class 6, then class 8, beats the class, which beats background."""
    scores = torch.tensor(
        [
            [-0.1, -3.0, -3.0, -3.0],  # background
            [-2.0, -0.1, -2.0, -2.0],  # class 4, asked for
            [-3.0, -2.0, -1.0, -3.0],  # class 6
            [-3.0, -3.0, -3.0, -1.5],  # class 8
        ]
    )[None, :, None]  # (1, 4, 1, 4)
    model = TextEpisodeModel(HandSetScores(scores), [4, 6, 8])
    logits = model(torch.zeros(1, 3, 1, 4), None, None, torch.tensor([4]))
    assert torch.equal(logits[0, 1, 0], torch.tensor([-2.0, -0.1, -2.0, -2.0]))  # the class's own score
    assert torch.equal(logits[0, 0, 0], torch.tensor([-0.1, -2.0, -1.0, -1.5]))  # best of background and the others
    assert logits.argmax(1)[0, 0].tolist() == [0, 1, 0, 0]  # background alone would give [0, 1, 1, 1]

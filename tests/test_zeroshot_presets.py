"""The official settings: PAMR against a pixel-loop recomputation, SCLIP's area rule and the probability threshold on
hand-set scores, the patch-remainder and resize rules, and every preset's settings reaching the segmenter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot.backbones.open_clip import resample_pos_embed
from fewshot.config import ZeroShotConfig
from fewshot.text import ClassEmbeddings, parse_classes, synonym_owner
from fewshot.zeroshot import DenseCLIP, ZeroShotSegmenter
from fewshot.zeroshot.benchmarks import PRESETS, codebase_preset, get_benchmark, preset_for
from fewshot.zeroshot.benchmarks.datasets import NAMES_DIR
from fewshot.zeroshot.benchmarks.run import benchmark_labels, build_dense, build_segmenter
from fewshot.zeroshot.refine import area_filter, pamr


class FakeDense(nn.Module):
    """Features = the L2-normalised pixel colours (patch 1, D = 3); each word's text embedding is a fixed random
    unit vector, so every cosine is known."""

    identity = "fake"
    mean = (0.5, 0.5, 0.5)

    def __init__(self, patch_size: int = 1):
        super().__init__()
        self.patch_size = patch_size
        self.seen: list[tuple[int, int]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(images.shape[-2:]))
        p = self.patch_size
        return F.normalize(F.avg_pool2d(images.float() - 0.4, p), dim=1)

    def word(self, word: str) -> torch.Tensor:
        seed = sum(ord(c) * 31**i for i, c in enumerate(word)) % 2**31
        return F.normalize(torch.randn(3, generator=torch.Generator().manual_seed(seed)), dim=0)

    def encode_text(self, classes, templates=None) -> ClassEmbeddings:
        parsed = parse_classes(classes)
        rows = torch.stack([self.word(w) for synonyms in parsed for w in synonyms])
        return ClassEmbeddings(rows, synonym_owner(parsed), parsed)


def reference_pamr(image: np.ndarray, scores: np.ndarray, steps: int, dilations: list[int]) -> np.ndarray:
    """PAMR pixel by pixel: neighbours clamped at the border, std over all windows' values (ddof 1)."""
    K, H, W = image.shape

    def at(a, y, x):
        return a[:, min(max(y, 0), H - 1), min(max(x, 0), W - 1)]

    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    weights = np.zeros((len(offsets) * len(dilations), H, W))
    for y in range(H):
        for x in range(W):
            window = [at(image, y + dy * d, x + dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            std = np.std(np.stack(window), axis=0, ddof=1)  # (K,)
            logits = [
                np.mean(-np.abs(image[:, y, x] - at(image, y + dy * d, x + dx * d)) / (1e-8 + 0.1 * std))
                for d in dilations
                for dy, dx in offsets
            ]
            weights[:, y, x] = np.exp(logits - np.max(logits)) / np.exp(logits - np.max(logits)).sum()
    out = scores.copy()
    for _ in range(steps):
        new = np.zeros_like(out)
        for y in range(H):
            for x in range(W):
                neighbours = [at(out, y + dy * d, x + dx * d) for d in dilations for dy, dx in offsets]
                new[:, y, x] = sum(w * n for w, n in zip(weights[:, y, x], neighbours, strict=True))
        out = new
    return out


def test_pamr_equals_a_pixel_loop_recomputation():
    g = torch.Generator().manual_seed(0)
    image, scores = torch.rand(1, 3, 7, 9, generator=g), torch.rand(1, 4, 7, 9, generator=g)
    got = pamr(image, scores, steps=3, dilations=(1, 2))
    want = reference_pamr(image[0].double().numpy(), scores[0].double().numpy(), 3, [1, 2])
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-4, atol=1e-5)


def test_pamr_keeps_scores_inside_an_edge():
    """Two flat halves: a neighbour across the edge gets (almost) no weight, so a score flat on each half stays."""
    image = torch.zeros(1, 3, 6, 8)
    image[..., 4:] = 1.0
    image += torch.rand(image.shape, generator=torch.Generator().manual_seed(1)) * 1e-3
    scores = torch.zeros(1, 2, 6, 8)
    scores[:, 0, :, :4], scores[:, 1, :, 4:] = 1.0, 1.0
    torch.testing.assert_close(pamr(image, scores, steps=10, dilations=(1, 2)), scores, atol=1e-3, rtol=0)


def test_area_rule_on_hand_set_probabilities():
    """Foreground areas 6, 1, 2 pixels of 9 (0.67, 0.11, 0.22): at 0.15 class 2 is zeroed and its pixel goes to the
    next best class; background and the kept classes are untouched."""
    labels = torch.tensor([[1, 1, 1, 1, 1, 1, 2, 3, 3, 0]])  # one row of 10 pixels
    probs = F.one_hot(labels, 4).permute(0, 2, 1).float()[..., None] * 0.6 + 0.1  # (1, 4, 10, 1): winner 0.7
    probs[0, 3, 6] = 0.5  # the runner-up of class 2's pixel
    out = area_filter(probs, 0.15)
    assert out[0, 2].abs().sum() == 0 and torch.equal(out[0, [0, 1, 3]], probs[0, [0, 1, 3]])
    assert out.argmax(1)[0, :, 0].tolist() == [1, 1, 1, 1, 1, 1, 3, 3, 3, 0]
    assert torch.equal(area_filter(probs, 0.1), probs)  # 1/9 > 0.1: every class kept


def official_labels(cos: np.ndarray, owner: list[int], scale: float, thd: float, area: float) -> np.ndarray:
    """SCLIP's postprocess on cosines [M, H, W] with prompt owners (0 = background): softmax over all prompts,
    max per class, area_thd, argmax, then pixels below prob_thd become 0."""
    e = np.exp(scale * cos - (scale * cos).max(0))
    p = e / e.sum(0)
    n = max(owner) + 1
    probs = np.stack([p[[i for i, o in enumerate(owner) if o == c]].max(0) for c in range(n)])
    if area:
        counts = np.bincount(probs.argmax(0).ravel(), minlength=n)[1:]
        probs[1:] *= (counts > area * counts.sum())[:, None, None]
    labels = probs.argmax(0)
    labels[probs.max(0) < thd] = 0
    return labels


def test_probability_threshold_and_area_rule_follow_the_official_postprocess():
    dense = FakeDense()
    classes = [["cat", "kitten"], ["sofa", "couch", "settee"], ["dog"]]
    background = ["sky", "wall"]
    seg = ZeroShotSegmenter(dense, classes, background="both", background_prompts=background, threshold=0.3,
                            logit_scale=8.0, short_side=0, window=0, area_threshold=0.1)  # fmt: skip
    images = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    words = [w for synonyms in classes for w in synonyms] + background
    owner = [1, 1, 2, 2, 2, 3, 0, 0]
    cos = np.einsum("dhw,md->mhw", dense(images)[0].numpy(), torch.stack([dense.word(w) for w in words]).numpy())
    want = official_labels(cos, owner, 8.0, 0.3, 0.1)
    assert (want == 0).any() and len(np.unique(want)) >= 3  # the case exercises the threshold
    assert np.array_equal(seg.predict(images)[0].numpy(), want)


def test_no_background_mode_and_shared_words():
    dense = FakeDense()
    seg = ZeroShotSegmenter(dense, ["cat", "dog"], background="none", short_side=0, window=0)
    assert seg(torch.rand(1, 3, 4, 4))[:, 0].isneginf().all()
    with pytest.raises(ValueError, match="also name a class"):
        ZeroShotSegmenter(dense, ["bed", "dog"], background_prompts=["bed", "sky"], short_side=0, window=0)
    ZeroShotSegmenter(dense, ["bed", "dog"], background_prompts=["bed", "sky"], short_side=0, window=0,
                      shared_background_words=True)  # fmt: skip


def test_remainder_rules():
    """A 10 x 13 crop with patch 4: floor encodes 8 x 12; centre pads to 12 x 16 with the mean colour (1 px top,
    2 left) and cuts; corner pads bottom-right and stretches the padded grid's scores over the crop."""
    crop = torch.rand(1, 3, 10, 13)
    for rule, size in (("floor", (8, 12)), ("centre", (12, 16)), ("corner", (12, 16))):
        dense = FakeDense(patch_size=4)
        seg = ZeroShotSegmenter(dense, ["cat"], short_side=0, window=0, remainder=rule, background="none")
        with torch.no_grad():
            got = seg._encode(crop, (10, 13))
        assert dense.seen == [size] and got.shape[-2:] == (10, 13)
    padded = torch.full((1, 3, 12, 16), 0.5)
    padded[..., 1:11, 1:14] = crop
    dense = FakeDense(patch_size=4)
    seg = ZeroShotSegmenter(dense, ["cat"], short_side=0, window=0, remainder="centre", background="none")
    want = seg._scores(padded, (12, 16))[..., 1:11, 1:14]
    torch.testing.assert_close(seg._encode(crop, (10, 13)), want)


def test_mmcv_resize_rounds_to_uint8_levels():
    images = torch.randint(0, 256, (1, 3, 30, 45), dtype=torch.uint8)
    for resize in ("torch", "mmcv"):
        seg = ZeroShotSegmenter(FakeDense(), ["cat"], short_side=17, window=0, resize=resize, background="none")
        out = seg._rescaled(images) * 255
        assert out.shape[-2:] == (17, 26)
        levels = torch.allclose(out, out.round(), atol=1e-4)
        assert levels == (resize == "mmcv")


def test_size_style_pos_embed_is_bicubic_without_antialias():
    pos = torch.randn(1 + 16, 8)
    got = resample_pos_embed(pos, (4, 4), (3, 5), "size")
    grid = pos[1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(3, 5), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)[0]
    torch.testing.assert_close(got[1:], want)
    assert not torch.allclose(got, resample_pos_embed(pos, (4, 4), (3, 5), "open_clip"))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_reaches_the_segmenter(name):
    preset = PRESETS[name]
    bench = get_benchmark(name.split("/")[1])
    seg = build_segmenter(preset, bench, FakeDense())
    for key in ("logit_scale", "short_side", "long_side", "window", "stride", "area_threshold", "pamr_steps",
                "pamr_dilations", "remainder", "resize"):  # fmt: skip
        assert getattr(seg, key) == getattr(preset, key), key
    names = bench.class_names(NAMES_DIR / preset.names_file)
    if bench.background:
        assert seg.background == ("both" if preset.threshold else "prompt")
        assert [tuple(c) for c in names[1:]] == seg.classes and seg.threshold == (preset.threshold or 0.5)
        assert len(seg.text_embeddings) == sum(len(c) for c in names)  # line 0 is the background prompt set
    else:
        assert seg.background == "none" and [tuple(c) for c in names] == seg.classes


def test_official_values_and_switches():
    assert (PRESETS["sclip/voc21"].logit_scale, PRESETS["sclip/voc21"].area_threshold) == (65.0, 0.1)
    assert PRESETS["naclip/voc21"].window == 0 and PRESETS["naclip/voc21"].pamr_steps == 10
    assert PRESETS["naclip/context59"].pamr_dilations == (8, 16) and PRESETS["naclip/context59"].window == 224
    assert (
        PRESETS["clearclip/voc21"].threshold == 0.5 and PRESETS["clearclip/voc21"].names_file == "voc21_clearclip.txt"
    )
    assert (PRESETS["clearclip/cityscapes"].window, PRESETS["clearclip/cityscapes"].stride) == (224, 224)
    assert PRESETS["sclip/cityscapes"].short_side == 560
    assert preset_for("naclip", "voc21").with_overrides(["pamr_steps=0"]).pamr_steps == 0
    with pytest.raises(KeyError, match="did you mean 'window'"):
        PRESETS["sclip/voc21"].with_overrides(["windwo=0"])
    with pytest.raises(KeyError, match="no official preset"):
        preset_for("lseg", "voc21")
    codebase = codebase_preset(ZeroShotConfig(), "voc21")
    assert codebase.name == "codebase/voc21" and codebase.resize == "torch" and codebase.precision == "fp32"


def test_build_dense_takes_the_presets_method_and_resampling(tiny_clip):
    preset = PRESETS["clearclip/voc21"].with_overrides(["pos_embed='size'"])
    dense = build_dense(f"open_clip:{tiny_clip}", "none", preset, torch.device("cpu"))
    assert dense.method == "clearclip" and dense.backbone.pos_embed == "size"
    assert dense.backbone.visual.conv1.weight.dtype == torch.float32  # fp16 only on a GPU, as clip.load


def test_proxy_attention_equals_a_recomputation(tiny_clip):
    """ProxyCLIP's last block from the weights: VFM cosine similarities, centred by beta times their mean, scaled by
    gamma, negatives masked, softmax; CLIP's values resized to the VFM grid; out_proj; no residual or FFN."""
    from fewshot.zeroshot.proxy import proxy_attention

    torch.manual_seed(0)
    block = DenseCLIP(tiny_clip, "none", "vanilla").backbone.visual.transformer.resblocks[-1]
    x, vfm = torch.randn(2, 1 + 2 * 3, 48), torch.randn(2, 8, 4, 6)
    got = proxy_attention(block, x, (2, 3), vfm, beta=1.2, gamma=3.0)
    v = F.linear(block.ln_1(x), block.attn.in_proj_weight[96:], block.attn.in_proj_bias[96:])[:, 1:]  # (2, 6, 48)
    v = F.interpolate(v.transpose(1, 2).reshape(2, 48, 2, 3), size=(4, 6), mode="bilinear").flatten(2).transpose(1, 2)
    f = F.normalize(vfm.flatten(2), dim=1)
    sim = torch.einsum("bcm,bcn->bmn", f, f)
    sim = (sim - 1.2 * sim.mean(dim=(1, 2), keepdim=True)) * 3.0
    weights = torch.where(sim < 0, torch.full_like(sim, -torch.inf), sim).softmax(-1)
    torch.testing.assert_close(got, block.attn.out_proj(weights @ v), rtol=1e-4, atol=1e-5)  # heads share weights


def test_proxyclip_runs_on_the_vfm_grid(tiny_clip):
    from fewshot.zeroshot.proxy import ProxyCLIP

    preset = PRESETS["proxyclip/voc21"].with_overrides(["vfm='vit_tiny_patch16_224'", "short_side=112", "window=112"])
    dense = build_dense(f"open_clip:{tiny_clip}", "none", preset, torch.device("cpu"))
    assert isinstance(dense, ProxyCLIP) and dense.patch_size == 56
    with torch.no_grad():
        features = dense(torch.rand(1, 3, 112, 168))
        assert features.shape == (1, 32, 7, 10) and torch.allclose(features.norm(dim=1), torch.ones(1, 7, 10))
        seg = build_segmenter(preset, get_benchmark("voc21"), dense)
        assert seg.predict(torch.randint(0, 256, (1, 3, 120, 150), dtype=torch.uint8)).shape == (1, 120, 150)
    assert PRESETS["proxyclip/cityscapes"].window == 224 and PRESETS["proxyclip/ade20k"].short_side == 448


def official_inference(dense, rows, owner, image, preset, pad_to=0) -> torch.Tensor:
    """SCLIP / NACLIP / ClearCLIP inference re-implemented from their segmentors (forward_slide / forward_feature,
    PAMR, postprocess_result) on an image already at its working size: labels [H, W]."""
    H, W = image.shape[-2:]
    p = dense.patch_size

    def feature(crop):  # forward_feature: conv1 floors the crop, logits go back to the crop's size
        h, w = crop.shape[-2:]
        sims = torch.einsum("ndhw,md->nmhw", dense(crop[..., : h - h % p, : w - w % p]), rows)
        return F.interpolate(sims, size=(h, w), mode="bilinear")

    if not preset.window:
        logits = feature(image)
    else:
        crop, stride = preset.window, preset.stride
        preds, count = torch.zeros(1, len(rows), H, W), torch.zeros(1, 1, H, W)
        for hi in range(max(H - crop + stride - 1, 0) // stride + 1):
            for wi in range(max(W - crop + stride - 1, 0) // stride + 1):
                y2, x2 = min(hi * stride + crop, H), min(wi * stride + crop, W)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                window = image[..., y1:y2, x1:x2]
                h, w = window.shape[-2:]
                if pad_to and (h % pad_to or w % pad_to):  # ClearCLIP's compute_padsize, zero after normalising
                    dh, dw = -h % pad_to, -w % pad_to
                    mean = torch.tensor(dense.mean).view(1, 3, 1, 1)
                    padded = F.pad(window - mean, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)) + mean
                    out = feature(padded)[..., dh // 2 : dh // 2 + h, dw // 2 : dw // 2 + w]
                else:
                    out = feature(window)
                preds += F.pad(out, (x1, W - x2, y1, H - y2))
                count[..., y1:y2, x1:x2] += 1
        logits = F.interpolate(preds / count, size=(H, W), mode="bilinear")
    if preset.pamr_steps:
        logits = reference_pamr(image[0].double().numpy(), logits[0].double().numpy(), preset.pamr_steps,
                                list(preset.pamr_dilations))  # fmt: skip
        logits = torch.from_numpy(logits)[None].float()
    cos = logits[0].numpy()
    return torch.from_numpy(official_labels(cos, owner, preset.logit_scale, preset.threshold, preset.area_threshold))


OFFICIAL_CASES = ["sclip/voc21", "naclip/voc21", "clearclip/context60", "sclip/coco_object", "naclip/context60",
                  "clearclip/voc21", "sclip/voc20", "naclip/cityscapes"]  # fmt: skip


@pytest.mark.parametrize("name", OFFICIAL_CASES)
def test_label_maps_equal_the_official_inference(tiny_clip, name):
    """The segmenter under an official preset against the official inference re-implemented above, pixel for pixel
    (tiny CLIP, 64 px windows in place of 224 / 448, PAMR dilations 1 and 2 on the small image)."""
    overrides = ["short_side=0", "templates='single'", "logit_scale=20.0"]
    overrides += ["pamr_steps=2", "pamr_dilations=(1, 2)"] if name.startswith("naclip") else []
    overrides += ["window=72", "stride=36"] if name.startswith("clearclip") else []
    overrides += ["window=64", "stride=32"] if PRESETS[name].window == 224 else []
    preset = PRESETS[name].with_overrides(overrides)
    torch.manual_seed(0)
    dense = DenseCLIP(tiny_clip, "none", preset.method)
    bench = get_benchmark(name.split("/")[1])
    seg = build_segmenter(preset, bench, dense)
    image = torch.rand(1, 3, 72, 100, generator=torch.Generator().manual_seed(5))
    names = bench.class_names(NAMES_DIR / preset.names_file)
    if bench.background:  # the official owner indices: 0 = the background line
        words = [w for synonyms in names[1:] for w in synonyms] + names[0]
        owner = [i + 1 for i, synonyms in enumerate(names[1:]) for _ in synonyms] + [0] * len(names[0])
    else:
        words = [w for synonyms in names for w in synonyms]
        owner = [i for i, synonyms in enumerate(names) for _ in synonyms]
    with torch.no_grad():
        rows = torch.cat([dense.encode_text([w], "single").embeddings for w in words])
        want = official_inference(dense, rows, owner, image, preset, pad_to=16 if preset.remainder == "centre" else 0)
        got = benchmark_labels(seg.predict(image)[0], bench)
    assert len(want.unique()) > 1
    assert (got == want).float().mean() == 1.0


def test_maskclip_release_protocol(tiny_clip):
    """MaskCLIP's own settings reach the model: exact GELU and LayerNorm eps 1e-6 in every block, ImageNet statistics,
    85 templates, whole image at 512 (PC59: long side 520), raw cosines, bottom-right padding."""
    from fewshot.text import get_templates

    preset = PRESETS["maskclip_release/context59"]
    assert (preset.short_side, preset.long_side, preset.window, preset.logit_scale) == (520, 520, 0, 1.0)
    assert len(get_templates(preset.templates)) == 85 and "maskclip_release/voc21" not in PRESETS
    dense = build_dense(f"open_clip:{tiny_clip}-quickgelu", "none", preset, torch.device("cpu"))
    visual = dense.backbone.visual
    assert all(type(block.mlp.gelu) is nn.GELU for block in visual.transformer.resblocks)
    assert all(m.eps == 1e-6 for m in visual.modules() if isinstance(m, nn.LayerNorm))
    assert dense.backbone.mean == (0.485, 0.456, 0.406) and dense.backbone.pos_embed == "size"
    seg = build_segmenter(preset, get_benchmark("context59"), dense)
    assert (seg.remainder, seg.background) == ("corner", "none")

"""Backbones: shapes and strides per layer, frozen mode, weight files, error messages, QuickGELU, open_clip parity."""

from __future__ import annotations

import logging
import math

import open_clip
import pytest
import timm
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file
from torch import nn

from fewshot.backbones import BACKBONES, OpenClipBackbone, TimmBackbone, build_backbone
from fewshot.backbones.base import prepare_images
from fewshot.backbones.weights import (
    WeightsError,
    WeightSource,
    create_open_clip_model,
    load_state_dict,
    open_clip_quick_gelu,
    parse_weights,
)
from fewshot.config import BackboneConfig

SIZES = [(64, 64), (70, 50), (33, 97)]  # square, and non-square sides that are not multiples of the patch


def save_weights(state: dict[str, torch.Tensor], path) -> str:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return str(path)


def normalised(images: torch.Tensor, cfg: dict) -> torch.Tensor:
    return (images - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)


# --- weight strings and files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, kind, value",
    [
        ("none", "none", ""),
        ("", "none", ""),
        ("openai", "tag", "openai"),
        ("laion2b_s34b_b88k", "tag", "laion2b_s34b_b88k"),
        ("hf-hub:timm/resnet50.a1_in1k", "hf-hub", "timm/resnet50.a1_in1k"),
        ("/w/dinov2_vits14.pth", "file", "/w/dinov2_vits14.pth"),
        ("ckpt/model.safetensors", "file", "ckpt/model.safetensors"),
    ],
)
def test_parse_weights(text: str, kind: str, value: str) -> None:
    assert parse_weights(text) == WeightSource(kind, value)


@pytest.mark.parametrize("text", ["hf-hub:no-org", "some/folder", "weights.ckpt"])
def test_parse_weights_rejects_unknown_forms(text: str) -> None:
    with pytest.raises(WeightsError, match="pretrained="):
        parse_weights(text)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors"])
def test_load_state_dict_formats(tmp_path, suffix: str) -> None:
    state = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    loaded = load_state_dict(save_weights(state, tmp_path / f"w{suffix}"))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("wrap", ["state_dict", "model"])
def test_load_state_dict_unwraps_checkpoints_and_ddp_prefix(tmp_path, wrap: str) -> None:
    state = {"module.a": torch.ones(2), "module.b": torch.zeros(1)}
    torch.save({wrap: state, "epoch": 3}, tmp_path / "c.pt")
    assert sorted(load_state_dict(tmp_path / "c.pt")) == ["a", "b"]


def test_load_state_dict_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_state_dict(tmp_path / "missing.safetensors")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pt"):
        load_state_dict(tmp_path / "garbage.pt")
    torch.save([torch.ones(1)], tmp_path / "list.bin")
    with pytest.raises(WeightsError, match="list.bin"):
        load_state_dict(tmp_path / "list.bin")


# --- timm: shapes, layers, pruning -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_timm_resnet_shapes_and_strides(size: tuple[int, int]) -> None:
    backbone = TimmBackbone("resnet18", layers=[0, -4, -3, -2, -1])
    assert backbone.channels == [64, 64, 128, 256, 512] and backbone.strides == [2, 4, 8, 16, 32]
    assert [info["index"] for info in backbone.feature_info] == [0, 1, 2, 3, 4] and backbone.patch_size == 1
    features = backbone(torch.rand(2, 3, *size))
    for feature, info in zip(features, backbone.feature_info, strict=True):
        s = info["reduction"]
        assert feature.shape == (2, info["num_chs"], math.ceil(size[0] / s), math.ceil(size[1] / s))


@pytest.mark.parametrize("size", SIZES)
def test_timm_vit_any_size_resized_to_patch_multiple(size: tuple[int, int]) -> None:
    backbone = TimmBackbone("vit_tiny_patch16_224", layers=[0, 5, -1])
    assert backbone.channels == [192] * 3 and backbone.strides == [16] * 3 and backbone.patch_size == 16
    assert [info["index"] for info in backbone.feature_info] == [0, 5, 11]
    grid = (int(size[0] / 16 + 0.5), int(size[1] / 16 + 0.5))  # nearest multiple of the patch
    assert [tuple(f.shape) for f in backbone(torch.rand(2, 3, *size))] == [(2, 192, *grid)] * 3


def test_timm_dinov2_patch14() -> None:
    backbone = TimmBackbone("vit_small_patch14_dinov2", layers=[-1])
    assert backbone.feature_info == [{"num_chs": 384, "reduction": 14, "index": 11}]
    assert backbone.mean == (0.485, 0.456, 0.406)
    assert backbone(torch.rand(1, 3, 100, 60))[0].shape == (1, 384, 7, 4)  # 100 -> 98, 60 -> 56


def test_timm_runs_only_the_blocks_needed() -> None:
    vit = TimmBackbone("vit_tiny_patch16_224", layers=[1, 3])
    assert len(vit.model.blocks) == 4
    resnet = TimmBackbone("resnet18", layers=[1, 2])
    assert len(resnet.model.layer3) == 0 and len(resnet.model.layer4) == 0


@pytest.mark.parametrize("layers, message", [([12], "-12..11"), ([-1, 11], "repeats"), ([], "empty")])
def test_timm_bad_layers(layers: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TimmBackbone("vit_tiny_patch16_224", layers=layers)


def test_uint8_and_float_images_agree() -> None:
    backbone = TimmBackbone("resnet18", layers=[-1])
    images = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8)
    torch.testing.assert_close(backbone(images)[0], backbone(images.float() / 255)[0])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        backbone(torch.rand(3, 40, 40))


def test_prepare_images_rounds_to_nearest_multiple() -> None:
    x = prepare_images(torch.rand(1, 3, 23, 8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), multiple=16)
    assert x.shape[-2:] == (16, 16)
    ones = prepare_images(torch.ones(1, 3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), multiple=16)
    assert torch.allclose(ones, torch.full_like(ones, 2.0))


# --- frozen ----------------------------------------------------------------------------------------------------------


def tiny_model(family: str, tiny_clip: str) -> str:
    """A small random model of each registered backbone family; a new family fails the registry tests until it has
    one here."""
    models = {"timm": "vit_tiny_patch16_224", "open_clip": tiny_clip}
    assert family in models, f"backbone family {family!r} of BACKBONES has no tiny model in tests/test_backbones.py"
    return models[family]


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_every_backbone_family_keeps_the_interface(family: str, tiny_clip: str) -> None:
    """What the heads and the feature cache rely on, for every registered family: one feature map per layer with the
    announced channels at a non-square size, an identity that names the family, no state changed by a forward."""
    backbone = build_backbone(BackboneConfig(name=f"{family}:{tiny_model(family, tiny_clip)}", pretrained="none",
                                             layers=[-2, -1]))  # fmt: skip
    assert backbone.identity.startswith(f"{family}:") and len(backbone.channels) == 2
    images = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        first, again = backbone(images), backbone(images[:1])
    for feats, channels in zip(first, backbone.channels, strict=True):
        assert feats.dim() == 4 and feats.shape[:2] == (2, channels) and torch.isfinite(feats).all()
    for a, b in zip(first, again, strict=True):  # an image's features do not depend on its batch
        torch.testing.assert_close(a[:1], b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_frozen_has_no_grads_and_stays_in_eval(family: str, tiny_clip: str) -> None:
    name = tiny_model(family, tiny_clip)
    backbone = BACKBONES[family](name, layers=[-1], frozen=True)
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not any(m.training for m in backbone.modules())
    assert not backbone(torch.rand(1, 3, 64, 64))[0].requires_grad

    trainable = BACKBONES[family](name, layers=[-1], frozen=False).train()
    assert all(p.requires_grad for p in trainable.parameters()) and trainable.training
    trainable(torch.rand(1, 3, 64, 64))[0].sum().backward()
    missing = [n for n, p in trainable.named_parameters() if p.grad is None]
    assert len(missing) < len(list(trainable.parameters())), "no backbone parameter got a gradient"
    first = next(p for p in trainable.parameters() if p.grad is not None)
    assert first.grad.abs().sum() > 0


# --- weights from files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, layers, size",
    [("vit_tiny_patch16_224", [1, -1], (64, 48)), ("resnet18", [2, 4], (64, 48))],
)
def test_timm_weights_files_load_back_identically(tmp_path, name: str, layers: list[int], size) -> None:
    torch.manual_seed(0)
    kwargs = {"dynamic_img_size": True} if name.startswith("vit") else {}  # same parameters, any input size
    reference = timm.create_model(name, **kwargs).eval()  # with its 1000-class head, as timm checkpoints are saved
    state = reference.state_dict()
    images = torch.rand(2, 3, *size)
    with torch.no_grad():
        expected = reference.forward_intermediates(
            normalised(images, reference.pretrained_cfg), indices=layers, intermediates_only=True
        )
    paths = [save_weights(state, tmp_path / f"w{suffix}") for suffix in (".pt", ".bin", ".safetensors")]
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    for path in [*paths, str(tmp_path / "wrapped.pth")]:
        backbone = TimmBackbone(name, pretrained=path, layers=layers)
        assert str(tmp_path) in backbone.identity
        with torch.no_grad():
            features = backbone(images)
        for got, want in zip(features, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_timm_wrong_weights_name_the_file_and_keys(tmp_path) -> None:
    state = timm.create_model("vit_tiny_patch16_224").state_dict()
    missing_key = {k: v for k, v in state.items() if k != "blocks.0.attn.qkv.weight"}
    path = save_weights(missing_key, tmp_path / "missing_key.pt")
    with pytest.raises(WeightsError, match=r"missing_key\.pt.*blocks\.0\.attn\.qkv\.weight"):
        TimmBackbone("vit_tiny_patch16_224", pretrained=path)
    path = save_weights(timm.create_model("resnet18").state_dict(), tmp_path / "resnet.safetensors")
    with pytest.raises(WeightsError, match=r"resnet\.safetensors.*missing keys"):
        TimmBackbone("vit_tiny_patch16_224", pretrained=path)
    path = save_weights({**state, "blocks.0.mlp.fc1.weight": torch.zeros(7, 192)}, tmp_path / "shape.bin")
    with pytest.raises(WeightsError, match=r"shape\.bin.*blocks\.0\.mlp\.fc1\.weight"):
        TimmBackbone("vit_tiny_patch16_224", pretrained=path)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        TimmBackbone("resnet18", pretrained=str(tmp_path / "nowhere.pth"))


def test_timm_never_silently_random(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="fewshot.backbones.timm"):
        TimmBackbone("resnet18", pretrained="none")
    assert "random weights" in caplog.text
    with pytest.raises(WeightsError, match="a1_in1k"):  # unknown tag: the valid ones are listed
        TimmBackbone("resnet18", pretrained="no_such_tag")
    with pytest.raises(WeightsError, match="carries tag"):
        TimmBackbone("resnet18.a1_in1k", pretrained="tv_in1k")
    with pytest.raises(WeightsError, match="resnet18.a1_in1k"):  # a real tag, but offline: an error, not random
        TimmBackbone("resnet18", pretrained="a1_in1k")
    with pytest.raises(WeightsError, match="hf-hub:timm/resnet18.a1_in1k"):
        TimmBackbone("resnet18", pretrained="hf-hub:timm/resnet18.a1_in1k")


# --- open_clip -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_open_clip_shapes(tiny_clip: str, size: tuple[int, int]) -> None:
    backbone = OpenClipBackbone(tiny_clip, layers=[0, -1])
    assert backbone.feature_info == [{"num_chs": 48, "reduction": 16, "index": i} for i in (0, 2)]
    assert backbone.mean == open_clip.OPENAI_DATASET_MEAN and backbone.std == open_clip.OPENAI_DATASET_STD
    assert len(backbone.visual.transformer.resblocks) == 3
    grid = (int(size[0] / 16 + 0.5), int(size[1] / 16 + 0.5))
    assert [tuple(f.shape) for f in backbone(torch.rand(2, 3, *size))] == [(2, 48, *grid)] * 2
    assert len(OpenClipBackbone(tiny_clip, layers=[0]).visual.transformer.resblocks) == 1


@pytest.fixture()
def tiny_clip_file(tiny_clip: str, tmp_path) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip).eval()
    return model, save_weights(model.state_dict(), tmp_path / "clip.pt")


def test_open_clip_dense_features_equal_open_clip_tokens(tiny_clip_file, tiny_clip: str) -> None:
    model, path = tiny_clip_file
    visual = model.visual
    backbone = OpenClipBackbone(tiny_clip, pretrained=path, layers=[1, 2])
    images = torch.rand(2, 3, 64, 64)  # the native size
    x = normalised(images, {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD})
    with torch.no_grad():
        block1, block2 = backbone(images)
        intermediate = visual.forward_intermediates(x, indices=[1], intermediates_only=True)["image_intermediates"][0]
        visual.output_tokens = True
        _, tokens = visual(x)  # (N, L, D) after the last block and ln_post
    torch.testing.assert_close(block1, intermediate, rtol=0, atol=1e-5)
    ours = visual.ln_post(block2.flatten(2).transpose(1, 2))  # (N, h * w, D)
    torch.testing.assert_close(ours, tokens, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(96, 96), (48, 48), (96, 64)])
def test_open_clip_pos_embed_matches_open_clip_resize(tiny_clip_file, size: tuple[int, int], tiny_clip: str) -> None:
    """Other sizes: equal to open_clip's own model built for that size from the same file (it resizes on load)."""
    _, path = tiny_clip_file
    resized = open_clip.create_model(tiny_clip, pretrained=path, force_image_size=size).eval()
    backbone = OpenClipBackbone(tiny_clip, pretrained=path, layers=[-1])
    images = torch.rand(1, 3, *size)
    x = normalised(images, {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD})
    with torch.no_grad():
        (ours,) = backbone(images)
        expected = resized.visual.forward_intermediates(x, indices=[2], intermediates_only=True)
    torch.testing.assert_close(ours, expected["image_intermediates"][0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_open_clip_weight_formats_agree(tiny_clip_file, tmp_path, suffix: str, tiny_clip: str) -> None:
    model, path = tiny_clip_file
    other = save_weights(model.state_dict(), tmp_path / f"clip{suffix}")
    images = torch.rand(1, 3, 64, 80)
    with torch.no_grad():
        a = OpenClipBackbone(tiny_clip, pretrained=path, layers=[-1])(images)[0]
        b = OpenClipBackbone(tiny_clip, pretrained=other, layers=[-1])(images)[0]
    assert torch.equal(a, b)


def test_open_clip_errors(tiny_clip: str, tmp_path) -> None:
    path = save_weights(timm.create_model("resnet18").state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(WeightsError, match=r"resnet\.pt"):
        OpenClipBackbone(tiny_clip, pretrained=path)
    with pytest.raises(FileNotFoundError, match=r"gone\.pt"):
        OpenClipBackbone(tiny_clip, pretrained=str(tmp_path / "gone.pt"))
    with pytest.raises(KeyError, match="ViT-B-16"):
        OpenClipBackbone("ViT-B-61")
    with pytest.raises(WeightsError, match="openai"):  # an unknown tag lists the model's tags, nothing is fetched
        create_open_clip_model("ViT-B-16", "no_such_tag")
    with pytest.raises(ValueError, match="VisionTransformer"):
        OpenClipBackbone("RN50")
    with pytest.raises(WeightsError, match="hf-hub:nobody/no-such-clip"):  # offline: an error, not random
        create_open_clip_model("ViT-B-16", "hf-hub:nobody/no-such-clip")


# --- QuickGELU -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, pretrained, expected",
    [
        ("ViT-B-16", "openai", True),
        ("ViT-L-14", "openai", True),
        ("ViT-B-16", "dfn2b", True),  # open_clip marks these weights quick_gelu too
        ("ViT-B-16", "laion2b_s34b_b88k", False),
        ("ViT-B-16-quickgelu", "none", True),
        ("ViT-B-16", "/w/clip.pt", False),
    ],
)
def test_quick_gelu_decision(name: str, pretrained: str, expected: bool) -> None:
    assert open_clip_quick_gelu(name, parse_weights(pretrained)) is expected


def test_openai_tag_creates_with_quick_gelu(monkeypatch, tiny_clip: str) -> None:
    calls = []

    def fake_create_model(name, pretrained=None, **kwargs):
        calls.append((name, pretrained, kwargs))
        return original(tiny_clip)

    original = open_clip.create_model
    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    create_open_clip_model("ViT-B-16", "openai")
    create_open_clip_model("ViT-B-16", "laion2b_s34b_b88k")
    assert [(c[1], c[2]["force_quick_gelu"]) for c in calls] == [("openai", True), ("laion2b_s34b_b88k", False)]


def test_quickgelu_model_really_uses_quick_gelu(tiny_clip_file, tiny_clip: str) -> None:
    _, path = tiny_clip_file
    quick = OpenClipBackbone(f"{tiny_clip}-quickgelu", pretrained=path, layers=[-1])
    plain = OpenClipBackbone(tiny_clip, pretrained=path, layers=[-1])
    assert isinstance(quick.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(plain.visual.transformer.resblocks[0].mlp.gelu, nn.GELU)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(quick(images)[0], plain(images)[0])


# --- build_backbone --------------------------------------------------------------------------------------------------


def test_build_backbone_and_lookup_errors(tiny_clip: str) -> None:
    backbone = build_backbone(BackboneConfig(name="timm:resnet18", pretrained="none", layers=[-2, -1]))
    assert isinstance(backbone, TimmBackbone) and backbone.identity == "timm:resnet18|none|3,4"
    backbone = build_backbone(BackboneConfig(name=f"open_clip:{tiny_clip}", pretrained="none", layers=[-1]))
    assert isinstance(backbone, OpenClipBackbone) and backbone.identity == f"open_clip:{tiny_clip}|none|2"
    with pytest.raises(KeyError, match=r"\['open_clip', 'timm'\]"):
        build_backbone(BackboneConfig(name="torchvision:resnet50"))
    with pytest.raises(ValueError, match="<family>:<model>"):
        build_backbone(BackboneConfig(name="resnet50"))
    with pytest.raises(KeyError, match="resnet50"):
        build_backbone(BackboneConfig(name="timm:resnet5O"))


def test_open_clip_text_tower_is_the_same_model_outside_the_state_dict(tiny_clip_file, tiny_clip: str) -> None:
    """One CLIP serves both towers: the backbone's text embeddings are the loaded model's, and the text tower is
    neither a parameter nor a state-dict entry of the backbone (checkpoints and caches see the image tower only)."""
    model, path = tiny_clip_file
    backbone = OpenClipBackbone(tiny_clip, pretrained=path, layers=[-1])
    assert all(k.startswith("visual.") for k in backbone.state_dict())
    got = backbone.encode_text(["cat", "sofa,couch"], ["a photo of a {}."])
    tokens = open_clip.get_tokenizer(tiny_clip)(["a photo of a cat.", "a photo of a sofa.", "a photo of a couch."])
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(got.embeddings, want)
    assert got.owner.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="final block"):
        OpenClipBackbone(tiny_clip, layers=[0], last_block=lambda block, x, grid: x)
    with pytest.raises(KeyError, match="dino"):
        OpenClipBackbone(tiny_clip, pos_embed="bicubic")

"""Resizing and augmentation: output shapes and types, keep-aspect padding, image and mask staying aligned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from episodes.transforms import EpisodeTransform, build_transform
from fewshot.config import AugmentConfig, DataConfig

STRONG = AugmentConfig(hflip=True, scale=(0.7, 1.3), rotate=30.0, crop=True)
OFF = AugmentConfig(hflip=False, scale=(1.0, 1.0), rotate=0.0, crop=True)


def _pair(h: int = 60, w: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric mask (an L of blocks plus void) and an image whose brightness encodes it."""
    mask = np.zeros((h, w), np.uint8)
    mask[5:30, 8:40] = 1
    mask[30:55, 8:22] = 1
    mask[40:50, 60:80] = 255
    image = np.full((h, w, 3), 40, np.uint8)
    image[mask == 1] = 210
    image[mask == 255] = 120
    image[..., 2] = np.linspace(20, 90, w, dtype=np.uint8)[None]  # a left-right ramp in blue reveals flips
    return image, mask


def _check_aligned(image: torch.Tensor, mask: torch.Tensor) -> None:
    """Where the mask is locally constant, the image holds the value that mask label was drawn with."""
    m = torch.nn.functional.pad(mask[None, None].float(), (2, 2, 2, 2), mode="replicate")
    windows = m.unfold(2, 5, 1).unfold(3, 5, 1)[0, 0]  # (S, S, 5, 5)
    interior = (windows == mask[..., None, None]).all(-1).all(-1)
    red = image[0].int()
    fg, bg = interior & (mask == 1), interior & (mask == 0)
    assert fg.any() and bg.any()
    assert (red[fg] > 125).all() and (red[bg] < 125).all()  # 40 and 210 apart from the antialiasing blur
    assert (mask[(image == 0).all(0)] == 255).all()  # padding (never 0 in the source image) is void in the mask


@pytest.mark.parametrize("resize", ["square", "keep_aspect"])
def test_evaluation_shapes_types_and_determinism(resize: str) -> None:
    image, mask = _pair()
    transform = build_transform(DataConfig(image_size=48, resize=resize), train=False)
    out_image, out_mask = transform(image, mask, None)
    assert out_image.shape == (3, 48, 48) and out_image.dtype == torch.uint8
    assert out_mask.shape == (48, 48) and out_mask.dtype == torch.int64
    assert set(out_mask.unique().tolist()) <= {0, 1, 255}
    again = transform(image, mask, np.random.default_rng(7))
    assert torch.equal(out_image, again[0]) and torch.equal(out_mask, again[1])
    _check_aligned(out_image, out_mask)


def test_keep_aspect_pads_bottom_right_with_zero_and_void() -> None:
    image, mask = _pair(60, 90)  # long side 90 -> 48, short side 60 -> 32
    out_image, out_mask = build_transform(DataConfig(image_size=48, resize="keep_aspect"), train=False)(image, mask)
    assert (out_mask[32:] == 255).all() and (out_image[:, 32:] == 0).all()
    assert (out_mask[:32] != 255).float().mean() > 0.9
    tall_image, tall_mask = _pair(90, 60)
    out_image, out_mask = build_transform(DataConfig(image_size=48, resize="keep_aspect"), train=False)(
        tall_image, tall_mask
    )
    assert (out_mask[:, 32:] == 255).all() and (out_image[:, :, 32:] == 0).all()


@pytest.mark.parametrize("resize", ["square", "keep_aspect"])
def test_augmentation_keeps_image_and_mask_aligned(resize: str) -> None:
    image, mask = _pair()
    transform = EpisodeTransform(64, resize, STRONG)
    outputs = [transform(image, mask, np.random.default_rng(seed)) for seed in range(25)]
    for out_image, out_mask in outputs:
        assert out_image.shape == (3, 64, 64) and out_mask.shape == (64, 64)
        assert set(out_mask.unique().tolist()) <= {0, 1, 255}
        _check_aligned(out_image, out_mask)
    assert len({o[1].sum().item() for o in outputs}) > 20  # the augmentation really varies
    assert any((o[1] == 255).sum() > 300 for o in outputs)  # rotation / down-scaling bring in void


def test_training_is_seeded_and_equals_evaluation_without_augmentation() -> None:
    image, mask = _pair()
    data = DataConfig(image_size=40, augment=STRONG)
    train = build_transform(data, train=True)
    a, b = train(image, mask, np.random.default_rng(3)), train(image, mask, np.random.default_rng(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = train(image, mask, np.random.default_rng(4))
    assert not torch.equal(a[1], c[1])
    with pytest.raises(ValueError, match="needs an rng"):
        train(image, mask, None)
    evaluation = build_transform(data, train=False)(image, mask)
    plain = EpisodeTransform(40, "square", OFF)(image, mask, np.random.default_rng(0))
    assert torch.equal(plain[0], evaluation[0]) and torch.equal(plain[1], evaluation[1])


def test_horizontal_flip_mirrors_both() -> None:
    image, mask = _pair()
    evaluation = EpisodeTransform(40, "square")(image, mask)
    flip_only = EpisodeTransform(40, "square", AugmentConfig(hflip=True, scale=(1.0, 1.0), rotate=0.0))
    seen = set()
    for seed in range(12):
        out_image, out_mask = flip_only(image, mask, np.random.default_rng(seed))
        flipped = torch.equal(out_mask, evaluation[1].flip(-1))
        assert flipped or torch.equal(out_mask, evaluation[1])
        expected = evaluation[0].flip(-1) if flipped else evaluation[0]
        assert (out_image.int() - expected.int()).abs().max() <= 1
        seen.add(flipped)
    assert seen == {True, False}


def test_bad_input_is_refused() -> None:
    image, mask = _pair()
    with pytest.raises(ValueError, match="same size"):
        EpisodeTransform(32, "square")(image, mask[:10])
    with pytest.raises(ValueError, match="square, keep_aspect"):
        EpisodeTransform(32, "stretch")

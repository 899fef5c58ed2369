"""The frozen-feature cache: exact features, keys that miss when anything changes, disk round trips, and a cached
evaluation / training step equal to the uncached one on tiny synthetic data."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import Tensor, nn

from fewshot.cache import CacheError, FeatureCache, build_feature_cache, cache_key, cache_mode, image_checksums
from fewshot.config import Config, load_config


class TinyBackbone(nn.Module):
    """Two conv layers; counts the images it encodes."""

    identity = "test:tiny|none|[0, 1]"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.seen = 0

    def forward(self, images: Tensor) -> list[Tensor]:
        self.seen += images.shape[0]
        x = images.float() / 255 if images.dtype == torch.uint8 else images
        a = torch.relu(self.conv1(x))
        return [a, torch.relu(self.conv2(a))]


def images(n: int, seed: int = 0) -> Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_memory_cache_returns_exactly_the_backbone_features_and_encodes_each_unique_image_once():
    backbone = TinyBackbone()
    cache = FeatureCache(backbone, {"backbone": backbone.identity})
    x = images(4)
    ids = ["a", "b", "a", "c"]
    x[2] = x[0]  # the same id is the same image
    out = cache.encode(x, ids)
    assert backbone.seen == 3  # a, b, c
    with torch.no_grad():
        expected = backbone(x)
    assert all(torch.equal(o, e) for o, e in zip(out, expected, strict=True))
    again = cache.encode(x[[3, 1]], ["c", "b"])
    assert backbone.seen == 3 + 4  # all hits (4: the reference pass above)
    assert all(torch.equal(o, e[[3, 1]]) for o, e in zip(again, expected, strict=True))
    assert cache.stats()["hits"] == 3 and cache.stats()["misses"] == 3 and cache.stats()["entries"] == 3
    assert not out[0].is_inference()  # usable in autograd (training heads on cached features)


def test_a_changed_id_pixel_is_caught_and_without_ids_nothing_is_cached():
    backbone = TinyBackbone()
    cache = FeatureCache(backbone, {"backbone": backbone.identity})
    x = images(2)
    cache.encode(x, ["a", "b"])
    flipped = x.flip(-1)  # same pixel sum, other positions
    assert torch.equal(image_checksums(flipped)[:, 0], image_checksums(x)[:, 0])
    with pytest.raises(CacheError, match="other pixels"):
        cache.encode(flipped, ["a", "b"])
    cache.encode(x, None)
    assert cache.stats()["entries"] == 2 and backbone.seen == 4


def test_autocast_is_part_of_the_key():
    backbone = TinyBackbone()
    cache = FeatureCache(backbone, {"backbone": backbone.identity})
    x = images(2)
    cache.encode(x, ["a", "b"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cache.encode(x, ["a", "b"])
    assert backbone.seen == 4 and out[0].dtype == torch.bfloat16


def test_budget_past_max_gb_still_returns_features_but_stores_none():
    backbone = TinyBackbone()
    cache = FeatureCache(backbone, {"backbone": backbone.identity}, max_gb=1e-9)
    x = images(3)
    out = cache.encode(x, ["a", "b", "c"])
    with torch.no_grad():
        assert torch.equal(out[1], backbone(x)[1])
    assert cache.stats()["entries"] == 0


def test_disk_cache_round_trips_in_float16_and_is_not_reused_under_another_key(tmp_path):
    backbone = TinyBackbone()
    x = images(5)
    ids = [f"img{i}" for i in range(5)]
    key = {"backbone": backbone.identity, "transform": {"image_size": 16}}
    writer = FeatureCache(backbone, key, store="disk", folder=tmp_path)
    first = writer.encode(x[:3], ids[:3])
    writer.encode(x[2:], ids[2:])  # a pending entry (img2) served before the flush
    writer.flush()
    assert backbone.seen == 5
    reader = FeatureCache(backbone, key, store="disk", folder=tmp_path)
    out = reader.encode(x[[4, 0, 0]], ["img4", "img0", "img0"])
    assert backbone.seen == 5  # every entry read back from disk
    with torch.no_grad():
        expected = backbone(x[[4, 0, 0]])
    for o, e in zip(out, expected, strict=True):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o, e, rtol=1e-3, atol=1e-3)  # float16 storage
    torch.testing.assert_close(out[0][1], first[0][0], rtol=1e-3, atol=1e-3)
    backbone.seen = 0
    other = FeatureCache(backbone, {**key, "transform": {"image_size": 32}}, store="disk", folder=tmp_path)
    other.encode(x[:2], ids[:2])
    assert backbone.seen == 2  # another key misses
    other.flush()
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    with pytest.raises(CacheError, match="other pixels"):
        FeatureCache(backbone, key, store="disk", folder=tmp_path).encode(x[[1]], ["img0"])


def test_cache_key_changes_with_backbone_and_transform():
    model = nn.Module()
    model.backbone = TinyBackbone()
    cfg = Config()
    base = cache_key(model, cfg.data, train=False)
    for change in ({"image_size": 320}, {"resize": "keep_aspect"}, {"root": "/elsewhere"}):
        assert cache_key(model, dataclasses.replace(cfg.data, **change), train=False) != base
    assert cache_key(model, cfg.data, train=True) != base  # augmented views are other pixels
    views = dataclasses.replace(cfg.data, augment=dataclasses.replace(cfg.data.augment, views=4))
    assert cache_key(model, views, train=True) != cache_key(model, cfg.data, train=True)
    model.backbone.identity = "test:tiny|none|[1]"
    assert cache_key(model, cfg.data, train=False) != base
    weighted = cache_key(model, cfg.data, train=False, with_weights=True)
    with torch.no_grad():
        model.backbone.conv1.weight.add_(1)
    assert cache_key(model, cfg.data, train=False, with_weights=True) != weighted


def test_cache_mode_is_memory_only_where_exact():
    cfg = Config()
    assert cache_mode(cfg, train=False) == "memory"
    assert cache_mode(cfg, train=True) == "off"  # fresh random augmentation per episode
    assert cache_mode(load_config(None, ["data.augment.views=4"]), train=True) == "memory"
    no_aug = ["data.augment.hflip=False", "data.augment.scale=(1.0, 1.0)", "data.augment.rotate=0.0"]
    assert cache_mode(load_config(None, no_aug), train=True) == "memory"
    assert cache_mode(load_config(None, ["model.backbone.frozen=False"]), train=False) == "off"
    assert cache_mode(load_config(None, ["cache.features='off'"]), train=False) == "off"
    assert cache_mode(load_config(None, ["cache.features='disk'"]), train=False) == "disk"
    keep_aspect = load_config(None, [*no_aug, "data.resize=keep_aspect"])  # random placement on the canvas
    assert cache_mode(keep_aspect, train=True) == "off"
    text_only = nn.Module()  # e.g. the zero-shot fold model: no separate backbone pass to cache
    assert build_feature_cache(cfg, text_only) is None


# --------------------------------------------------------------------------------------------------------------------
# Against the real episode machinery on tiny synthetic data.


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> Config:
    root = tmp_path_factory.mktemp("synthetic")
    return load_config(
        None,
        [
            f"data.root={root}",
            "data.synthetic.images=240",
            "data.synthetic.size=48",
            "data.image_size=48",
            "data.min_pixels=16",
            "data.episodes=10",
            "data.seeds=[0, 1]",
            "data.num_workers=0",
            "model.backbone.layers=[0, 1]",
            "eval.batch_size=4",
            "device=cpu",
            "train.batch_size=3",
        ],
    )


def test_cached_evaluation_gives_the_same_metrics_as_uncached(tiny_cfg):
    from fewshot.evaluation import test_model
    from fewshot.model import build_model

    torch.manual_seed(0)
    model = build_model(tiny_cfg.model)
    off = test_model(dataclasses.replace(tiny_cfg, cache=dataclasses.replace(tiny_cfg.cache, features="off")), model)
    on = test_model(tiny_cfg, model)
    for key in ("miou", "fbiou", "pixel_acc", "mean_pixel_acc", "class_iou"):
        assert on[key] == off[key]
    assert [s["miou"] for s in on["seeds"]] == [s["miou"] for s in off["seeds"]]


def test_training_views_are_keyed_and_a_cached_step_equals_the_uncached_one(tiny_cfg):
    import episodes
    from fewshot.engine import TrainStep
    from fewshot.losses import build_loss
    from fewshot.model import build_model

    cfg = dataclasses.replace(
        tiny_cfg, data=dataclasses.replace(tiny_cfg.data, augment=dataclasses.replace(tiny_cfg.data.augment, views=2))
    )
    dataset = episodes.build_train_dataset(cfg.data, seed=0)
    batch = episodes.collate_episodes([dataset[i] for i in range(6)])
    ids = batch["query_id"] + [i for s in batch["support_ids"] for i in s]
    assert all(re.fullmatch(r".+@v[01]", i) for i in ids)
    again = episodes.collate_episodes([dataset[i] for i in range(6)])
    assert again["query_id"] == batch["query_id"] and torch.equal(again["query_image"], batch["query_image"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    cache = build_feature_cache(cfg, model, train=True)
    assert cache is not None and cache.store == "memory"
    criterion = build_loss(cfg.loss)
    plain, cached = TrainStep(model, criterion), TrainStep(model, criterion, encode=cache)
    for _ in range(2):  # misses, then hits
        loss = cached(batch)
        loss.backward()
        torch.testing.assert_close(loss, plain(batch), rtol=0, atol=0)
    assert cache.stats()["hits"] >= len(ids)
    assert any(p.grad is not None for p in model.head.parameters())

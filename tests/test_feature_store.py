"""The feature store: exact features by id, each encoded once, keys that never mix, checksums that catch other
pixels under a cached id, and float16 disk round trips."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from fewshot.feature_store import CacheError, FeatureCache, image_checksums


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


def test_lookup_serves_held_ids_without_pixels_and_names_missing_ones():
    backbone = TinyBackbone()
    cache = FeatureCache(backbone, {"backbone": backbone.identity})
    cpu = torch.device("cpu")
    x = images(3)
    cache.encode(x, ["a", "b", "c"])
    with torch.no_grad():
        expected = backbone(x[[2, 0, 2]])
    seen = backbone.seen
    out = cache.lookup(["c", "a", "c"], cpu)
    assert backbone.seen == seen and all(torch.equal(o, e) for o, e in zip(out, expected, strict=True))
    assert cache.missing(["a", "d", "e", "d"], cpu) == ["d", "e"]
    with pytest.raises(CacheError, match=r"2 id\(s\) \(d, e\)"):
        cache.lookup(["a", "d", "e"], cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(CacheError, match="bfloat16"):
        cache.lookup(["a"], cpu)  # features made without autocast are not served under it


def test_a_key_is_kept_as_its_json_round_trip_so_a_disk_folder_accepts_it_again(tmp_path):
    backbone = TinyBackbone()
    key = {"backbone": backbone.identity, "transform": {"augment": {"scale": (0.9, 1.1)}}}  # a tuple, as asdict gives
    writer = FeatureCache(backbone, key, store="disk", folder=tmp_path)
    writer.encode(images(1), ["a"])
    writer.flush()
    reader = FeatureCache(backbone, key, store="disk", folder=tmp_path)
    reader.encode(images(1), ["a"])
    assert backbone.seen == 1 and reader.key == json.loads(json.dumps(key))

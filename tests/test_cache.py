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
            "data.dataset=synthetic",
            f"data.root={root}",
            "data.synthetic.images=240",
            "data.synthetic.size=48",
            "data.image_size=48",
            "data.min_pixels=16",
            "data.episodes=10",
            "data.seeds=[0, 1]",
            "data.num_workers=0",
            "model.backbone.name=timm:vit_tiny_patch16_224",
            "model.backbone.pretrained=none",
            "model.backbone.layers=[0, 1]",
            "train.amp=none",
            "eval.amp=none",
            "optim.warmup_iters=0",
            "optim.grad_clip=0",
            "eval.batch_size=4",
            "device=cpu",
            "train.batch_size=3",
        ],
    )


def with_data(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes))


def with_views(cfg: Config, views: int = 2) -> Config:
    return with_data(cfg, augment=dataclasses.replace(cfg.data.augment, views=views))


def without_cache(cfg: Config) -> Config:
    return dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, features="off"))


def count_image_loads(monkeypatch, cfg: Config) -> list[str]:
    """Ids passed to the source's load_image from now on (every image decode of the episode machinery)."""
    import episodes

    source_type = type(episodes.build_test_dataset(cfg.data).source)
    load_image = source_type.load_image
    loads: list[str] = []

    def counting(self, image_id: str):
        loads.append(image_id)
        return load_image(self, image_id)

    monkeypatch.setattr(source_type, "load_image", counting)
    return loads


@pytest.mark.parametrize(("shots", "resolution"), [(1, "resized"), (2, "original")])
def test_cached_evaluation_equals_uncached_and_decodes_each_image_once(tiny_cfg, monkeypatch, shots, resolution):
    import episodes
    from fewshot.evaluation import test_model
    from fewshot.model import build_model

    cfg = with_data(tiny_cfg, shots=shots, eval_resolution=resolution)
    loads = count_image_loads(monkeypatch, cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    off = test_model(without_cache(cfg), model)
    assert len(loads) == 2 * 10 * (1 + shots)  # seeds x episodes x images
    loads.clear()
    on = test_model(cfg, model)
    for key in ("miou", "fbiou", "pixel_acc", "mean_pixel_acc", "class_iou"):
        assert on[key] == off[key]
    assert [s["miou"] for s in on["seeds"]] == [s["miou"] for s in off["seeds"]]
    test_sets = [episodes.build_test_dataset(cfg.data, seed) for seed in (0, 1)]
    used = {i for dataset in test_sets for e in dataset.episodes for i in (e.query, *e.supports)}
    assert sorted(loads) == sorted(used)  # phase 1 decodes each image of both seeds once; phase 2 loads masks only


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


def test_fill_cache_encodes_each_missing_view_once_and_reports_a_full_cache(tiny_cfg, monkeypatch):
    import episodes
    from fewshot.evaluation import fill_cache
    from fewshot.model import build_model

    cfg = with_views(tiny_cfg)
    dataset = episodes.build_train_dataset(cfg.data, seed=0)
    needs = dataset.needs(range(8))
    used = [key for i in range(8) for key in dataset.image_keys(i)]
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    batches: list[int] = []

    def encoder(x: Tensor) -> list[Tensor]:
        batches.append(x.shape[0])
        return model.encode(x)

    cpu = torch.device("cpu")
    loads = count_image_loads(monkeypatch, cfg)
    cache = FeatureCache(encoder, {"backbone": "test"})
    masks = fill_cache(cache, dataset, needs, batch_size=4, workers=0, device=cpu)
    assert masks is not None and len(masks.resized) == len(needs) and not masks.original
    assert sum(batches) == len(loads) == len(set(used)) and max(batches) <= 4
    again = fill_cache(cache, dataset, needs, batch_size=4, workers=0, device=cpu)  # masks only: nothing decoded
    assert again is not None and sum(batches) == len(loads) == len(set(used))
    assert all(torch.equal(m, again.resized[k]) for k, m in masks.resized.items())
    batch = episodes.collate_episodes([dataset[i] for i in range(3)])
    ids = [*batch["query_id"], *[i for s in batch["support_ids"] for i in s]]
    pixels = torch.cat([batch["query_image"], batch["support_images"].flatten(0, 1)])
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(cache.lookup(ids, cpu), model.encode(pixels), strict=True))
    small = FeatureCache(encoder, {"backbone": "test"}, max_gb=1e-9)
    assert fill_cache(small, dataset, needs, batch_size=4, workers=0, device=cpu) is None


def test_a_warm_disk_cache_tests_without_decoding_an_image(tiny_cfg, tmp_path, monkeypatch):
    from fewshot.evaluation import test_model
    from fewshot.model import build_model

    cfg = dataclasses.replace(tiny_cfg, cache=dataclasses.replace(tiny_cfg.cache, features="disk", dir=str(tmp_path)))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    first = test_model(cfg, model)
    loads = count_image_loads(monkeypatch, cfg)
    second = test_model(cfg, model)
    assert loads == [] and second["miou"] == first["miou"] and second["class_iou"] == first["class_iou"]


def test_training_views_are_keyed_and_a_cached_step_equals_the_uncached_one(tiny_cfg):
    import episodes
    from fewshot.engine import TrainStep, to_device
    from fewshot.losses import build_loss
    from fewshot.model import build_model
    from fewshot.trainer import training_episodes

    cfg = with_views(tiny_cfg)
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
    batch = to_device(batch, torch.device("cpu"))
    for _ in range(2):  # misses, then hits
        loss = cached(batch)
        loss.backward()
        torch.testing.assert_close(loss, plain(batch), rtol=0, atol=0)
    assert cache.stats()["hits"] >= len(ids)
    assert any(p.grad is not None for p in model.head.parameters())

    # the trainer's path: every view of the run's steps encoded up front, then batches from memory without pixels
    run = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_iters=2))  # steps 0, 1: episodes 0..5
    in_memory = training_episodes(run, dataset, build_feature_cache(cfg, model, train=True), 0, torch.device("cpu"))
    assert in_memory.masks is not None
    memory_batch = to_device(episodes.collate_episodes([in_memory[i] for i in range(6)]), torch.device("cpu"))
    assert "query_image" not in memory_batch
    torch.testing.assert_close(cached(memory_batch), plain(batch), rtol=0, atol=0)
    with pytest.raises(ValueError, match="without images"):
        plain(memory_batch)


def test_cached_training_run_equals_the_uncached_one_and_decodes_each_view_once(tiny_cfg, tmp_path, monkeypatch):
    import episodes
    from fewshot.trainer import train

    cfg = with_views(tiny_cfg)
    steps = {"max_iters": 3, "batch_size": 8, "val_every": 2, "val_episodes": 6, "checkpoint_every": 10}
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **steps))
    loads = count_image_loads(monkeypatch, cfg)
    states = {}
    for name, run_cfg in (("off", without_cache(cfg)), ("on", cfg)):
        loads.clear()
        run_cfg = dataclasses.replace(run_cfg, run=dataclasses.replace(run_cfg.run, dir=str(tmp_path / name)))
        result = train(run_cfg)
        states[name] = torch.load(tmp_path / name / "last.pt", weights_only=False)["model"]
        states[name + "_best"] = result["best"]
    assert states["on_best"] == states["off_best"]
    assert states["on"].keys() == states["off"].keys()
    for key, value in states["off"].items():
        torch.testing.assert_close(states["on"][key], value, rtol=0, atol=0)
    train_set = episodes.build_train_dataset(cfg.data, seed=cfg.seed)
    used = [key for i in range(3 * 8) for key in train_set.image_keys(i)]  # 3 steps x batch 8
    views = set(used)
    assert len(views) < len(used)  # some views repeat: an image-loading run would decode them again
    val_set = episodes.build_val_dataset(cfg.data, episodes=6, seed=cfg.train.val_seed)
    val_images = {i for e in val_set.episodes for i in (e.query, *e.supports)}
    assert sorted(loads) == sorted([k for k, _ in views] + list(val_images))  # each view and val image decoded once

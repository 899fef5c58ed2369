"""The encoder and its feature cache on the real episode machinery: keys built from the sources' and transforms'
identities, phase 1 (each image view decoded and encoded once), episodes from memory equal to the loaded ones, and
cached evaluation and training equal to uncached for every head in the registry, on tiny synthetic data."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cdfss_data import make_chest_xray, make_deepglobe_binary, make_fss1000, make_isic
from PIL import Image
from torch import Tensor, nn

import episodes
from episodes.sources import SOURCES, build_source
from episodes.transforms import EpisodeTransform, build_transform
from fewshot.cache import (
    CachedEpisodes,
    Encoder,
    ImageViews,
    build_encoder,
    cache_key,
    cache_mode,
    collate_images,
    episode_needs,
)
from fewshot.config import AugmentConfig, Config, load_config
from fewshot.engine import TrainStep, encode_episodes, to_device
from fewshot.evaluation import evaluate_fold
from fewshot.feature_store import CacheError, FeatureCache
from fewshot.heads import HEADS
from fewshot.losses import build_loss
from fewshot.model import build_model

CPU = torch.device("cpu")
TINY = [
    "data.dataset=synthetic",
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
]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def tiny_cfg(synthetic_root) -> Config:
    return load_config(None, [f"data.root={synthetic_root}", *TINY])


def with_data(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes))


def with_views(cfg: Config, views: int = 2) -> Config:
    return with_data(cfg, augment=dataclasses.replace(cfg.data.augment, views=views))


def without_cache(cfg: Config) -> Config:
    return dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, features="off"))


def count_image_loads(monkeypatch, cfg: Config) -> list[str]:
    """Ids passed to the source's load_image from now on (every image decode of the episode machinery)."""
    source_type = type(build_source(cfg.data))
    load_image = source_type.load_image
    loads: list[str] = []

    def counting(self, image_id: str):
        loads.append(image_id)
        return load_image(self, image_id)

    monkeypatch.setattr(source_type, "load_image", counting)
    return loads


def batch_of(dataset, indices) -> dict:
    return to_device(episodes.collate_episodes([dataset[i] for i in indices]), CPU)


def assert_same(a: list[Tensor], b: list[Tensor]) -> None:
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------------------------------------------------
# Keys: every pixel-affecting setting changes them, the others do not.


def _folder_layout(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.new("RGB", (8, 6)).save(root / "images" / "a.png")
    Image.new("L", (8, 6)).save(root / "masks" / "a.png")
    (root / "classes.txt").write_text("thing\n")
    for name in ("some.txt", "other.txt"):  # the id lists of NEUTRAL
        (root / name).write_text("a\n")
    return root


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, tuple[list[str], Path]]:
    """Per dataset of SOURCES: overrides that place it on a small layout of its own, and a second root with the same
    layout. A new source fails here until it gets one."""
    tmp = tmp_path_factory.mktemp("layouts")
    for name in ("voc_a", "voc_b", "coco_a", "coco_b"):
        (tmp / name).mkdir()
    for copy in ("a", "b"):
        _folder_layout(tmp / f"folder_{copy}")
        make_deepglobe_binary(tmp / f"deepglobe_{copy}", "patnet")
        make_isic(tmp / f"isic_{copy}", "sorted")
        make_chest_xray(tmp / f"chest_{copy}")
        make_fss1000(tmp / f"fss_{copy}", tmp / "fss_splits", {"trn": 2, "val": 1, "test": 1})
    small = ["data.synthetic.images=5", "data.synthetic.size=32"]
    return {
        "pascal": ([f"data.root={tmp / 'voc_a'}"], tmp / "voc_b"),
        "coco": ([f"data.root={tmp / 'coco_a'}"], tmp / "coco_b"),
        "folder": ([f"data.root={tmp / 'folder_a'}"], tmp / "folder_b"),
        "synthetic": ([f"data.root={tmp / 'syn_a'}", *small], tmp / "syn_b"),
        "deepglobe": ([f"data.root={tmp / 'deepglobe_a'}"], tmp / "deepglobe_b"),
        "isic": ([f"data.root={tmp / 'isic_a'}"], tmp / "isic_b"),
        "chest_xray": ([f"data.root={tmp / 'chest_a'}"], tmp / "chest_b"),
        "fss1000": ([f"data.root={tmp / 'fss_a'}", f"data.fss1000.splits={tmp / 'fss_splits'}"], tmp / "fss_b"),
    }


BACKBONE = SimpleNamespace(backbone=SimpleNamespace(identity="test:tiny|none|0,1"))
PIXELS = {  # settings besides data.root and the transform's that move or change an image's pixels, per dataset
    "coco": [
        "data.coco.val_images=elsewhere",
        "data.coco.train_images=/elsewhere/train",
        "data.coco.val_json=other/val.json",
        "data.coco.train_json=/elsewhere/train.json",
    ],
    "synthetic": ["data.synthetic.images=6", "data.synthetic.size=40", "data.synthetic.seed=1"],
}
NEUTRAL = [  # settings of masks, lists and episodes only: the features are reused across them
    "data.fold=1",
    "data.shots=5",
    "data.episodes=7",
    "data.min_pixels=3",
    "data.lists=bam",
    "data.eval_resolution=original",
    "data.train_list=some.txt",
    "data.val_list=other.txt",
]
NEUTRAL_COCO = ["data.coco.crowd=foreground", "data.coco.split=consecutive", "data.coco.val_images=val2014"]


def key_of(dataset: str, overrides: list[str], layouts, train: bool = False) -> dict:
    base, _ = layouts[dataset]
    data = load_config(None, [f"data.dataset={dataset}", *base, *overrides]).data
    return cache_key(BACKBONE, build_source(data), build_transform(data, train))


@pytest.mark.parametrize("dataset", sorted(SOURCES))
def test_the_key_changes_with_every_pixel_affecting_setting_and_no_other(dataset, layouts):
    base = key_of(dataset, [], layouts)
    assert json.loads(json.dumps(base)) == base  # JSON data, as key.json stores it
    _, other_root = layouts[dataset]
    changes = [f"data.root={other_root}", "data.image_size=64", "data.resize=keep_aspect", *PIXELS.get(dataset, [])]
    for change in changes:
        assert key_of(dataset, [change], layouts) != base, change
    for change in NEUTRAL + (NEUTRAL_COCO if dataset == "coco" else []):
        assert key_of(dataset, [change], layouts) == base, change
    augmented = key_of(dataset, ["data.augment.views=2"], layouts, train=True)
    assert augmented != base  # augmented views are other pixels
    plain = ["data.augment.hflip=False", "data.augment.scale=(1.0, 1.0)", "data.augment.rotate=0.0"]
    assert key_of(dataset, plain, layouts, train=True) == base  # training without augmentation: the test pixels


def _changed(value):
    """Another valid value of an augmentation setting (a new setting of another type needs a rule here)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5
    if isinstance(value, tuple):
        return tuple(v * 0.5 for v in value)
    raise TypeError(f"no rule to change an augmentation setting of value {value!r}: add one to _changed")


def test_every_augmentation_setting_keys_augmented_pixels():
    augment = AugmentConfig(views=2)
    base = EpisodeTransform(224, "keep_aspect", augment).identity()
    for setting in dataclasses.fields(AugmentConfig):  # read from the schema: a new setting is covered too
        changed = dataclasses.replace(augment, **{setting.name: _changed(getattr(augment, setting.name))})
        assert EpisodeTransform(224, "keep_aspect", changed).identity() != base, setting.name


def test_the_key_follows_the_backbone_and_on_disk_its_weights(tiny_cfg):
    model = nn.Module()
    model.backbone = nn.Conv2d(3, 4, 3)
    model.backbone.identity = "test:tiny|none|[0, 1]"
    source, transform = build_source(tiny_cfg.data), build_transform(tiny_cfg.data, train=False)
    base = cache_key(model, source, transform)
    model.backbone.identity = "test:tiny|none|[1]"
    assert cache_key(model, source, transform) != base
    weighted = cache_key(model, source, transform, with_weights=True)
    with torch.no_grad():
        model.backbone.weight.add_(1)
    assert cache_key(model, source, transform, with_weights=True) != weighted


def test_a_source_without_identity_cannot_be_cached(tiny_cfg):
    class Anonymous:
        pass

    with pytest.raises(TypeError, match="Anonymous has no identity"):
        cache_key(BACKBONE, Anonymous(), build_transform(tiny_cfg.data, train=False))


def test_cache_mode_is_memory_only_where_exact():
    def mode(overrides: list[str], train: bool) -> str:
        cfg = load_config(None, overrides)
        return cache_mode(cfg, build_transform(cfg.data, train))

    assert mode([], train=False) == "memory"
    assert mode([], train=True) == "off"  # fresh random augmentation per episode
    assert mode(["data.augment.views=4"], train=True) == "memory"
    no_aug = ["data.augment.hflip=False", "data.augment.scale=(1.0, 1.0)", "data.augment.rotate=0.0"]
    assert mode(no_aug, train=True) == "memory"
    assert mode(["model.backbone.frozen=False"], train=False) == "off"
    assert mode(["cache.features='off'"], train=False) == "off"
    assert mode(["cache.features='disk'"], train=False) == "disk"
    assert mode([*no_aug, "data.resize=keep_aspect"], train=True) == "off"  # random placement on the canvas


# --------------------------------------------------------------------------------------------------------------------
# The encoder: ids in, features out, from pixels, the cache, or both.


def test_an_encoder_serves_ids_from_the_batch_pixels_and_from_its_cache(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg.model).eval()
    x = torch.randint(0, 256, (4, 3, 48, 48), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.inference_mode():  # features of a batch as computed (other batch sizes may round differently)
        every, first, last = model.encode(x), model.encode(x[:2]), model.encode(x[2:])
        plain = Encoder(model)
        assert_same(plain.features(x, ["a", "b", "c", "d"], ["c", "a", "c"]), [f[[2, 0, 2]] for f in every])
        with pytest.raises(CacheError, match="no feature cache"):
            plain.features(x[:0], [], ["a"])
        cached = Encoder(model, FeatureCache(model.encode, {"backbone": "test"}))
        cached.encode(x[:2], ["a", "b"])
        assert_same(cached.features(x[:0], [], ["b", "a", "b"]), [f[[1, 0, 1]] for f in first])  # no pixels
        mixed = cached.features(x[2:], ["c", "d"], ["a", "d", "c"])  # pixels and cache
        assert_same(mixed, [torch.stack([f[0], g[1], g[0]]) for f, g in zip(first, last, strict=True)])
    assert cached.cache.misses == 4


# --------------------------------------------------------------------------------------------------------------------
# Phase 1 and the episodes from memory.


def test_prepare_encodes_each_missing_view_once_and_falls_back_when_the_cache_is_full(tiny_cfg, monkeypatch):
    cfg = with_views(tiny_cfg)
    dataset = episodes.build_train_dataset(cfg.data, seed=0)
    used = [key for i in range(8) for key in dataset.image_keys(i)]
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    batches: list[int] = []

    def counting(x: Tensor) -> list[Tensor]:
        batches.append(x.shape[0])
        return model.encode(x)

    key = cache_key(model, dataset.source, dataset.transform)
    encoder = Encoder(model, FeatureCache(counting, key))
    loads = count_image_loads(monkeypatch, cfg)
    [in_memory] = encoder.prepare([dataset], [range(8)], batch_size=4, workers=0, device=CPU)
    assert isinstance(in_memory, CachedEpisodes)
    assert sum(batches) == len(loads) == len(set(used)) and max(batches) <= 4
    [again] = encoder.prepare([dataset], [range(8)], batch_size=4, workers=0, device=CPU)  # masks only: no decode
    assert sum(batches) == len(loads) == len(set(used))
    assert all(torch.equal(m, again.masks.resized[k]) for k, m in in_memory.masks.resized.items())
    loaded, memory = batch_of(dataset, range(3)), batch_of(in_memory, range(3))
    assert memory["images"].shape[0] == 0 and memory["image_ids"] == []
    with torch.inference_mode():
        assert_same(encode_episodes(encoder, memory)[1], encode_episodes(Encoder(model), loaded)[1])
    small = Encoder(model, FeatureCache(counting, key, max_gb=1e-9))
    [fallback] = small.prepare([dataset], [range(8)], batch_size=4, workers=0, device=CPU)
    assert fallback is dataset  # the items bring their pixels again
    other = episodes.build_test_dataset(cfg.data)  # the evaluation transform: other pixels than the cache's
    with pytest.raises(ValueError, match="made for other data"):
        encoder.prepare([other], [range(2)], batch_size=4, workers=0, device=CPU)


def _phase1_masks(dataset, indices: range, with_pixels: bool) -> tuple[dict, dict]:
    """What phase 1 makes with ImageViews, without a cache: the episodes' masks, and the pixels by id."""
    needs = episode_needs(dataset, indices)
    views = ImageViews(dataset.source, dataset.transform, needs, set(needs) if with_pixels else set())
    batch = collate_images([views[k] for k in range(len(views))])
    masks = {(i, c): (resized, original) for i, classes in zip(batch["id"], batch["masks"], strict=True)
             for c, resized, original in classes}  # fmt: skip
    pixels = dict(zip(batch["image_id"], batch["image"], strict=True)) if with_pixels else {}
    return masks, pixels


@pytest.mark.parametrize("build", ["test", "train_views", "train_plain"])
def test_items_from_memory_equal_the_loaded_ones_without_pixels(tiny_cfg, build: str) -> None:
    data = tiny_cfg.data
    if build == "test":
        original = dataclasses.replace(data, eval_resolution="original", shots=2, episodes=24)
        dataset = episodes.build_test_dataset(original)
    elif build == "train_views":
        dataset = episodes.build_train_dataset(with_views(tiny_cfg, 3).data, seed=5)
    else:  # no augmentation: a deterministic transform, the other case a training feature cache allows
        plain = dataclasses.replace(data.augment, hflip=False, scale=(1.0, 1.0), rotate=0.0)
        dataset = episodes.build_train_dataset(dataclasses.replace(data, augment=plain), seed=5)
    masks, pixels = _phase1_masks(dataset, range(8), with_pixels=True)
    alone, _ = _phase1_masks(dataset, range(8), with_pixels=False)  # mask_only: no image decoded
    assert masks.keys() == alone.keys()
    for key, (resized, original) in masks.items():
        assert np.array_equal(resized, alone[key][0]) and (original is None) == (alone[key][1] is None)
    kept = {key for key, (_, original) in masks.items() if original is not None}
    assert kept == ({(e.query, e.class_id) for e in dataset.episodes[:8]} if build == "test" else set())
    model = SimpleNamespace(backbone=None, encode=None)
    cache = FeatureCache(lambda x: [x.float()], cache_key(SimpleNamespace(backbone=SimpleNamespace(identity="px")),
                                                          dataset.source, dataset.transform))  # fmt: skip
    [in_memory] = Encoder(model, cache).prepare([dataset], [range(8)], batch_size=4, workers=0, device=CPU)
    for i in range(8):
        full, item = dataset[i], in_memory[i]
        assert item["images"].shape == (0, 3, 48, 48) and item["image_ids"] == []
        assert full.keys() == item.keys() and full["image_ids"] == [full["query_id"], *full["support_ids"]]
        for key in full.keys() - {"images", "image_ids"}:
            a, b = full[key], item[key]
            assert torch.equal(a, b) if isinstance(a, Tensor) else a == b, key
        assert all(torch.equal(pixels[i], x) for i, x in zip(full["image_ids"], full["images"], strict=True))
        keys = dataset.image_keys(i)
        assert full["image_ids"] == [k if v is None else f"{k}@v{v}" for k, v in keys]
    prepared = episode_needs(dataset, range(8))
    outside = next(i for i in range(8, len(dataset)) if dataset.image_keys(i)[0] not in prepared)
    with pytest.raises(KeyError, match=f"episode {outside}: no mask in memory"):
        in_memory[outside]


def test_needs_merge_classes_and_keep_originals_of_queries_only(tiny_cfg) -> None:
    dataset = episodes.build_test_dataset(dataclasses.replace(tiny_cfg.data, eval_resolution="original", shots=2))
    needs = episode_needs(dataset, range(10))
    for episode in dataset.episodes[:10]:
        assert needs[episode.query, None][episode.class_id] is True
    supports_only = {s for e in dataset.episodes[:10] for s in e.supports} - {e.query for e in dataset.episodes[:10]}
    assert supports_only and all(not any(needs[s, None].values()) for s in supports_only)
    assert episode_needs(dataset, range(5), into=episode_needs(dataset, range(5, 10))) == needs


# --------------------------------------------------------------------------------------------------------------------
# Cached equals uncached, end to end.


@pytest.mark.parametrize(("shots", "resolution"), [(1, "resized"), (2, "original")])
def test_cached_evaluation_equals_uncached_and_decodes_each_image_once(tiny_cfg, monkeypatch, shots, resolution):
    cfg = with_data(tiny_cfg, shots=shots, eval_resolution=resolution)
    loads = count_image_loads(monkeypatch, cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    off = evaluate_fold(without_cache(cfg), model)
    assert len(loads) == 2 * 10 * (1 + shots)  # seeds x episodes x images
    loads.clear()
    on = evaluate_fold(cfg, model)
    for key in ("miou", "fbiou", "pixel_acc", "mean_pixel_acc", "class_iou"):
        assert on[key] == off[key]
    assert [s["miou"] for s in on["seeds"]] == [s["miou"] for s in off["seeds"]]
    test_sets = [episodes.build_test_dataset(cfg.data, seed) for seed in (0, 1)]
    used = {i for dataset in test_sets for e in dataset.episodes for i in (e.query, *e.supports)}
    assert sorted(loads) == sorted(used)  # phase 1 decodes each image of both seeds once; phase 2 loads masks only


def test_a_warm_disk_cache_tests_without_decoding_an_image(tiny_cfg, tmp_path, monkeypatch):
    cfg = dataclasses.replace(tiny_cfg, cache=dataclasses.replace(tiny_cfg.cache, features="disk", dir=str(tmp_path)))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    first = evaluate_fold(cfg, model)
    loads = count_image_loads(monkeypatch, cfg)
    second = evaluate_fold(cfg, model)
    assert loads == [] and second["miou"] == first["miou"] and second["class_iou"] == first["class_iou"]


def _coco_with_two_image_folders(root: Path) -> None:
    """COCO-20i fold 0's novel classes, 3 images each (one instance), in val2014/ and in val2014_b/ under the same
    file names with other pixels."""
    from episodes.classes import COCO_CLASS_OF_CATEGORY, COCO_CLASSES
    from episodes.folds import coco_fold

    category = {c: cat for cat, c in COCO_CLASS_OF_CATEGORY.items()}
    _, novel = coco_fold(0, "interleaved")
    images, annotations = [], []
    rng = np.random.default_rng(0)
    for folder in ("val2014", "val2014_b"):
        (root / folder).mkdir(parents=True)
    for n, class_id in enumerate(c for c in novel for _ in range(3)):
        name = f"COCO_val2014_{n:012d}.jpg"
        images.append({"id": n, "file_name": name, "height": 24, "width": 32})
        polygon = [4, 4, 28, 4, 28, 20, 4, 20]
        annotations.append({"id": n, "image_id": n, "category_id": category[class_id], "iscrowd": 0,
                            "segmentation": [polygon]})  # fmt: skip
        for folder in ("val2014", "val2014_b"):
            Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / folder / name, quality=95)
    (root / "annotations").mkdir()
    categories = [{"id": cat, "name": COCO_CLASSES[c - 1]} for c, cat in category.items()]
    (root / "annotations" / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )


def test_a_disk_cache_is_not_reused_for_another_coco_image_folder(tmp_path, monkeypatch):
    root = tmp_path / "coco"
    _coco_with_two_image_folders(root)
    base = [f"data.root={root}", "data.dataset=coco", "data.min_pixels=1", "data.episodes=12", "data.image_size=32",
            "data.num_workers=0", "model.backbone.name=timm:vit_tiny_patch16_224", "model.backbone.pretrained=none",
            "model.backbone.layers=[0, 1]", "eval.amp=none", "eval.batch_size=4", "device=cpu",
            "cache.features=disk", f"cache.dir={tmp_path / 'features'}"]  # fmt: skip
    first, moved = load_config(None, base), load_config(None, [*base, f"data.coco.val_images={root / 'val2014_b'}"])
    torch.manual_seed(0)
    model = build_model(first.model).eval()
    evaluate_fold(first, model)
    loads = count_image_loads(monkeypatch, moved)
    on_b = evaluate_fold(moved, model)
    assert loads  # the other folder's images were decoded and encoded, not served from the first folder's entries
    off_b = evaluate_fold(without_cache(moved), model)
    assert on_b["class_iou"] == pytest.approx(off_b["class_iou"], abs=1e-6)
    assert len([p for p in (tmp_path / "features").iterdir() if p.is_dir()]) == 2  # one key folder per image folder
    dataset = episodes.build_test_dataset(moved.data)  # the disk entries now serve B's pixels, not A's
    ids = dataset.image_ids(0)
    encoder = build_encoder(moved, model, dataset)
    assert encoder.cache.missing(ids, CPU) == []
    a = build_source(first.data)
    pixels = {name: torch.stack([dataset.transform(s.load_image(i), s.load_class_mask(i, 1))[0] for i in ids])
              for name, s in (("a", a), ("b", dataset.source))}  # fmt: skip
    with torch.inference_mode():
        stored = encoder.lookup(ids, CPU)
        for layer, b_feats, a_feats in zip(stored, model.encode(pixels["b"]), model.encode(pixels["a"]), strict=True):
            torch.testing.assert_close(layer, b_feats, rtol=1e-2, atol=1e-2)  # float16 on disk
            assert not torch.allclose(layer, a_feats, rtol=1e-2, atol=1e-2)


def test_training_views_are_keyed_and_a_cached_step_equals_the_uncached_one(tiny_cfg):
    cfg = with_views(tiny_cfg)
    dataset = episodes.build_train_dataset(cfg.data, seed=0)
    batch = batch_of(dataset, range(6))
    ids = batch["query_id"] + [i for s in batch["support_ids"] for i in s]
    assert all(re.fullmatch(r".+@v[01]", i) for i in ids) and batch["image_ids"]
    again = batch_of(dataset, range(6))
    assert again["image_ids"] == batch["image_ids"] and torch.equal(again["images"], batch["images"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    encoder = build_encoder(cfg, model, dataset)
    assert encoder.cache is not None and encoder.cache.store == "memory"
    criterion = build_loss(cfg.loss)
    plain, cached = TrainStep(model, criterion, Encoder(model)), TrainStep(model, criterion, encoder)
    for _ in range(2):  # misses, then hits
        loss = cached(batch)
        loss.backward()
        torch.testing.assert_close(loss, plain(batch), rtol=0, atol=0)
    assert encoder.cache.stats()["hits"] >= len(set(ids))
    assert any(p.grad is not None for p in model.head.parameters())
    [in_memory] = encoder.prepare([dataset], [range(6)], 4, 0, CPU)  # the trainer's path: held, masks made once
    memory_batch = batch_of(in_memory, range(6))
    assert memory_batch["images"].shape[0] == 0
    torch.testing.assert_close(cached(memory_batch), plain(batch), rtol=0, atol=0)
    with pytest.raises(CacheError, match="no feature cache"):
        plain(memory_batch)


def test_cached_training_run_equals_the_uncached_one_and_decodes_each_view_once(tiny_cfg, tmp_path, monkeypatch):
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


HEAD_SETTINGS = {  # small settings of a head; any head not named here runs with its defaults
    "prototype": ["model.prototype.proj_dim=8"],
    "transformer": ["model.transformer.dim=16", "model.transformer.heads=2", "model.transformer.depth=1"],
    "text": ["model.text.dim=16", "model.text.templates=single"],
}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_every_head_scores_and_trains_alike_cached_or_not(synthetic_root, tiny_clip, head):
    overrides = [
        f"data.root={synthetic_root}",
        *TINY,
        "data.episodes=6",
        "data.augment.views=2",
        f"model.head={head}",
        f"model.backbone.name=open_clip:{tiny_clip}",
        *HEAD_SETTINGS.get(head, []),
    ]
    cfg = load_config(None, overrides)  # fmt: skip
    train_set = episodes.build_train_dataset(cfg.data, seed=0)
    torch.manual_seed(0)
    model = build_model(cfg.model, class_names=train_set.source.class_names)
    off, on = evaluate_fold(without_cache(cfg), model), evaluate_fold(cfg, model)
    assert [s["class_iou"] for s in on["seeds"]] == [s["class_iou"] for s in off["seeds"]]
    criterion = build_loss(cfg.loss)
    encoder = build_encoder(cfg, model, train_set)
    [in_memory] = encoder.prepare([train_set], [range(4)], 4, 0, CPU)
    assert isinstance(in_memory, CachedEpisodes)
    grads = []
    model.train()
    for step, batch in ((TrainStep(model, criterion, Encoder(model)), batch_of(train_set, range(4))),
                        (TrainStep(model, criterion, encoder), batch_of(in_memory, range(4)))):  # fmt: skip
        model.zero_grad(set_to_none=True)
        loss = step(batch)
        loss.backward()
        grads.append([loss.detach(), *(p.grad for p in model.parameters() if p.requires_grad)])
    assert len(grads[0]) > 1
    for plain, cached in zip(*grads, strict=True):
        torch.testing.assert_close(cached, plain, rtol=0, atol=0)

"""The episode Dataset and the package's front door, on a small synthetic set generated in a temp dir."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import episodes
from episodes.dataset import EpisodeDataset, collate_episodes
from fewshot.config import DataConfig, SyntheticConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    root = tmp_path_factory.mktemp("syn") / "voc"
    return DataConfig(
        dataset="synthetic", root=str(root), synthetic=SyntheticConfig(images=250, size=64), min_pixels=64,
        image_size=48, episodes=24, num_workers=0,
    )  # fmt: skip


def _equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            if not all(torch.equal(p, q) for p, q in zip(x, y, strict=True)):
                return False
        elif x != y:
            return False
    return True


def test_test_items_have_documented_shapes_and_valid_episodes(data: DataConfig) -> None:
    dataset = episodes.build_test_dataset(data)
    assert isinstance(dataset, EpisodeDataset) and len(dataset) == 24
    _, novel = dataset.source.fold_classes(data.fold)
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["images"].shape == (2, 3, 48, 48) and item["images"].dtype == torch.uint8  # query, support
        assert item["query_mask"].shape == (48, 48) and item["query_mask"].dtype == torch.uint8
        assert item["support_masks"].shape == (1, 48, 48) and item["support_masks"].dtype == torch.uint8
        assert item["index"] == i and item["class_id"] in novel and "query_mask_original" not in item
        assert item["query_id"] not in item["support_ids"] and len(item["support_ids"]) == 1
        assert item["image_ids"] == [item["query_id"], *item["support_ids"]] == dataset.image_ids(i)
        episode = dataset.episodes[i]
        assert item["image_ids"] == [episode.query, *episode.supports]  # evaluation: the ids themselves
        assert set(item["query_mask"].unique().tolist()) <= {0, 1, 255}
        assert (item["query_mask"] == 1).any() and all((m == 1).any() for m in item["support_masks"])


def test_several_seeds_share_one_source_and_equal_single_builds(data: DataConfig) -> None:
    several = episodes.build_test_datasets(data, [0, 1, 2])
    assert len({id(d.source) for d in several}) == 1  # one source: a COCO json is read once for all seeds
    for seed, dataset in zip([0, 1, 2], several, strict=True):
        single = episodes.build_test_dataset(data, seed=seed)
        assert dataset.episodes == single.episodes and dataset.seed == single.seed == seed


def test_test_episodes_are_deterministic_and_seeded(data: DataConfig) -> None:
    first = episodes.build_test_dataset(data).episodes
    assert first == episodes.build_test_dataset(data).episodes
    assert first != episodes.build_test_dataset(data, seed=1).episodes
    assert first == episodes.build_test_dataset(dataclasses.replace(data, seeds=[1]), seed=0).episodes
    assert (
        episodes.build_test_dataset(dataclasses.replace(data, seeds=[1])).episodes
        == episodes.build_test_dataset(data, seed=1).episodes
    )  # the default seed is the first of data.seeds
    val = episodes.build_val_dataset(data, episodes=10, seed=1000)
    assert len(val) == 10 and val.episodes != first[:10]
    five_shot = episodes.build_test_dataset(dataclasses.replace(data, shots=3, episodes=4))
    assert five_shot[0]["images"].shape == (4, 3, 48, 48) and five_shot[0]["support_masks"].shape == (3, 48, 48)
    assert len(set(five_shot.episodes[0].supports)) == 3


def test_original_resolution_mask_is_kept_on_request(data: DataConfig) -> None:
    dataset = episodes.build_test_dataset(dataclasses.replace(data, eval_resolution="original"))
    item = dataset[3]
    original = item["query_mask_original"]
    assert original.shape == (64, 64) and original.dtype == torch.uint8
    expected = dataset.source.load_class_mask(item["query_id"], item["class_id"])
    assert np.array_equal(original.numpy(), expected)


def test_training_items_are_a_pure_function_of_the_index(data: DataConfig) -> None:
    train = episodes.build_train_dataset(data, seed=7)
    base, _ = train.source.fold_classes(data.fold)
    items = [train[i] for i in range(6)]
    assert all(_equal(train[i], items[i]) for i in reversed(range(6)))
    assert all(item["class_id"] in base for item in items)
    assert all((item["query_mask"] == 1).any() for item in items)
    other = episodes.build_train_dataset(data, seed=8)
    assert not all(_equal(other[i], items[i]) for i in range(6))
    # the same episode under another augmentation seed: same ids, other pixels
    reseeded = EpisodeDataset(train.source, train.episodes, train.transform, keep_original=False, seed=99)
    assert reseeded[0]["query_id"] == items[0]["query_id"]
    assert not torch.equal(reseeded[0]["query_mask"], items[0]["query_mask"])
    # augmentation drawn per episode: the ids name the episode too, so equal ids always mean equal pixels
    episode = train.episodes[4]
    assert items[4]["image_ids"] == [f"{i}@e4" for i in (episode.query, *episode.supports)]


@pytest.mark.parametrize("build", ["test", "train"])
def test_dataloader_workers_do_not_change_the_data(data: DataConfig, build: str) -> None:
    dataset = episodes.build_test_dataset(data) if build == "test" else episodes.build_train_dataset(data, seed=3)
    subset = torch.utils.data.Subset(dataset, range(8))
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(subset, batch_size=4, num_workers=workers, collate_fn=episodes.collate_episodes)
        batches[workers] = list(loader)
    assert len(batches[0]) == 2
    assert all(_equal(a, b) for a, b in zip(batches[0], batches[2], strict=True))


def test_collate_stacks_tensors_and_keeps_ragged_originals_as_lists(data: DataConfig) -> None:
    dataset = episodes.build_test_dataset(dataclasses.replace(data, eval_resolution="original"))
    items = [dataset[0], dataset[1]]
    items[1]["query_mask_original"] = items[1]["query_mask_original"][:40]  # ragged, as real images are
    batch = collate_episodes(items)
    assert batch["images"].shape == (4, 3, 48, 48) and batch["query_mask"].shape == (2, 48, 48)
    assert torch.equal(batch["images"][2:], items[1]["images"]) and batch["support_masks"].shape == (2, 1, 48, 48)
    assert batch["image_ids"] == [*items[0]["image_ids"], *items[1]["image_ids"]]
    assert batch["class_ids"].dtype == torch.int64 and batch["class_ids"].tolist() == [i["class_id"] for i in items]
    assert batch["index"].tolist() == [0, 1] and batch["query_id"] == [i["query_id"] for i in items]
    assert batch["support_ids"] == [i["support_ids"] for i in items]
    assert [m.shape for m in batch["query_mask_original"]] == [(64, 64), (40, 64)]


def test_out_of_range_index_raises(data: DataConfig) -> None:
    dataset = episodes.build_test_dataset(data)
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_episode_file_is_used_when_set(data: DataConfig, tmp_path: Path) -> None:
    from episodes.lists import eval_pairs
    from episodes.sampler import file_protocol, save_episodes

    dataset = episodes.build_test_dataset(data)
    picked = dataset.episodes[::-1]
    path = tmp_path / "eps.json"
    save_episodes(path, picked, file_protocol(data, data.seeds[0], eval_pairs(dataset.source, data)))
    assert episodes.build_test_dataset(dataclasses.replace(data, episode_file=str(path))).episodes == picked


def test_fixed_views_key_the_augmented_pixels(data: DataConfig) -> None:
    views = dataclasses.replace(data, augment=dataclasses.replace(data.augment, views=2))
    train = episodes.build_train_dataset(views, seed=0)
    seen: dict[str, torch.Tensor] = {}
    for i in range(30):
        item = train[i]
        for image_id, image in zip(item["image_ids"], item["images"], strict=True):
            name, view = image_id.rsplit("@v", 1)
            assert view in {"0", "1"} and name in train.source.image_ids("trn")
            if image_id in seen:
                assert torch.equal(seen[image_id], image)  # a view is the same pixels whichever episode draws it
            seen[image_id] = image
    assert len(seen) < 3 * 30  # views repeat


@pytest.mark.parametrize("resize", ["square", "keep_aspect"])
@pytest.mark.parametrize("train", [False, True])
def test_mask_transform_equals_the_full_transforms_mask(resize: str, train: bool) -> None:
    from episodes.transforms import build_transform

    data = DataConfig(image_size=40, resize=resize)  # default augmentation: flip, scale, rotation, crop
    transform = build_transform(data, train=train)
    rng = np.random.default_rng(0)
    for h, w in [(30, 50), (64, 40), (40, 40)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = rng.choice(np.array([0, 1, 255], np.uint8), size=(h, w))
        for seed in range(4):
            _, expected = transform(image, mask, np.random.default_rng(seed))
            alone = transform.mask_only(mask, np.random.default_rng(seed))
            assert alone.dtype == torch.uint8 and torch.equal(alone.long(), expected)

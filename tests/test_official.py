"""data.sampler=hsnet / pfenet: the official test episodes of HSNet and PFENet, checked against re-implementations of
their code written here (numpy's legacy global RandomState, Python's `random` in PFENet's 8 workers, torch's base
seeds), on synthetic data and, in the slow tests, on the real HSNet / PFENet lists and masks of ../shared/data."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pickle
import pickletools
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import episodes
from episodes.base import DataError, Episode
from episodes.folds import coco_fold, pascal_fold
from episodes.lists import eval_pairs
from episodes.official import LegacyStream, fold_sampler, hsnet_class_uniform, hsnet_walk, pfenet_base_seeds
from episodes.sampler import load_episodes, save_episodes
from fewshot.config import ConfigError, DataConfig, Fss1000Config, SyntheticConfig, TargetConfig, load_config
from fewshot.provenance import episode_fields

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _global_rngs():
    """The re-implementations draw from numpy's and Python's global generators, as the official code does."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    yield
    np.random.set_state(numpy_state)
    random.setstate(python_state)


# --------------------------------------------------------------------------------------------------------------------
# The official algorithms, re-implemented from their code (HSNet data/pascal.py, coco.py, fss.py; PFENet
# util/dataset.py, test.py; torch's DataLoader worker seeding).


def hsnet_pascal_reference(list_file: Path, shots: int, episodes: int = 1000, seed: int = 0) -> list[tuple]:
    metadata = [[name, int(cc)] for name, cc in (line.split("__") for line in list_file.read_text().split("\n")[:-1])]
    classwise: dict[int, list[str]] = {}
    for name, c in metadata:
        classwise.setdefault(c, []).append(name)
    np.random.seed(seed)
    out = []
    for idx in range(episodes):
        query, c = metadata[idx % len(metadata)]
        supports = []
        while True:
            support = np.random.choice(classwise[c], 1, replace=False)[0]
            if query != support:
                supports.append(str(support))
            if len(supports) == shots:
                break
        out.append((query, tuple(supports), c))
    return out


def hsnet_coco_reference(classwise: dict[int, list[str]], fold: int, shots: int, episodes: int = 1000) -> list[tuple]:
    """classwise: HSNet's 0-based class index -> 'val2014/COCO_val2014_<id>.jpg' (its pickle)."""
    class_ids = [fold + 4 * v for v in range(20)]
    np.random.seed(0)
    out = []
    for _ in range(episodes):
        c = np.random.choice(class_ids, 1, replace=False)[0]
        query = np.random.choice(classwise[c], 1, replace=False)[0]
        supports = []
        while True:
            support = np.random.choice(classwise[c], 1, replace=False)[0]
            if query != support:
                supports.append(Path(support).stem)
            if len(supports) == shots:
                break
        out.append((Path(query).stem, tuple(supports), int(c) + 1))
    return out


def hsnet_fss_reference(root: Path, split_file: Path, offset: int, shots: int) -> list[tuple]:
    categories = sorted(split_file.read_text().split("\n")[:-1])
    metadata = []
    for cat in categories:
        for path in sorted(glob.glob(f"{root / cat}/*")):
            if os.path.basename(path).split(".")[1] == "jpg":
                metadata.append(path)
    np.random.seed(0)
    out = []
    for query in metadata:
        class_sample = categories.index(query.split("/")[-2]) + offset
        supports = []
        while True:
            support = os.path.join(os.path.dirname(query), str(np.random.choice(range(1, 11), 1, replace=False)[0]))
            if query != support + ".jpg":
                supports.append(support)
            if len(supports) == shots:
                break
        out.append((_fss_id(query), tuple(_fss_id(s) for s in supports), class_sample))
    return out


def _fss_id(path: str) -> str:
    return "/".join(Path(path).with_suffix("").parts[-2:])


def pfenet_reference(
    labels: dict[str, dict[int, int]],
    val_ids: list[str],
    novel: list[int],
    shots: int,
    episodes: int,
    seed: int = 321,
    min_pixels: int = 2 * 32 * 32,
) -> tuple[list[tuple], list[str], dict[int, list[str]]]:
    """labels: image -> {value: pixel count} of np.unique(label); returns (episodes, data_list, sub_class_file_list).
    PFENet's rule is 2 x 32 x 32 pixels; the synthetic images are smaller."""
    data_list, sub_class_file_list = [], {c: [] for c in novel}
    for name in val_ids:
        label_class = [c for c in labels[name] if c not in (0, 255) and c in novel and labels[name][c] >= min_pixels]
        if label_class:
            data_list.append(name)
            for c in label_class:
                sub_class_file_list[c].append(name)
    generator = torch.Generator()
    generator.manual_seed(seed)  # validate(): torch.manual_seed(321); each pass's iterator draws its base seed
    out = []
    while len(out) < episodes:
        base_seed = torch.empty((), dtype=torch.int64).random_(generator=generator).item()
        states = {}
        for i, query in enumerate(data_list[: episodes - len(out)]):
            worker = i % 8
            if worker not in states:
                random.seed(base_seed + worker)
                states[worker] = random.getstate()
            random.setstate(states[worker])
            label_class = [c for c in labels[query] if c not in (0, 255) and c in novel]
            class_chosen = label_class[random.randint(1, len(label_class)) - 1]
            files = sub_class_file_list[class_chosen]
            chosen: list[int] = []
            for _ in range(shots):
                support_idx = random.randint(1, len(files)) - 1
                support = query
                while support == query or support_idx in chosen:
                    support_idx = random.randint(1, len(files)) - 1
                    support = files[support_idx]
                chosen.append(support_idx)
            states[worker] = random.getstate()
            out.append((query, tuple(files[j] for j in chosen), class_chosen))
    return out, data_list, sub_class_file_list


def unique_counts(mask_dir: Path, ids: list[str]) -> dict[str, dict[int, int]]:
    """np.unique of each label, as PFENet's make_dataset / __getitem__ read them."""
    out = {}
    for i in ids:
        values, counts = np.unique(np.asarray(Image.open(mask_dir / f"{i}.png")), return_counts=True)
        out[i] = dict(zip(values.tolist(), counts.tolist(), strict=True))
    return out


def as_tuples(records: list[Episode]) -> list[tuple]:
    return [(e.query, e.supports, e.class_id) for e in records]


# --------------------------------------------------------------------------------------------------------------------
# The generators themselves.


def test_the_legacy_stream_is_numpys_choice_draw_for_draw() -> None:
    """LegacyStream.index(n) takes the element np.random.choice(list, 1, replace=False)[0] takes, with the same use of
    the stream, whatever the lengths (1 draws nothing; 19,217 is COCO's person pool)."""
    names = [f"COCO_val2014_{i:012d}" for i in range(19217)]
    for seed in (0, 1, 321, 2**32 - 1):
        lengths = np.random.RandomState(seed // 2).randint(1, 60, 200).tolist() + [1, 2, 3, 19217, 1000, 1, 19216]
        stream = LegacyStream(seed)
        np.random.seed(seed)
        for n in lengths:
            assert names[stream.index(n)] == np.random.choice(names[:n], 1, replace=False)[0]
        assert stream.index(2**20) == np.random.permutation(2**20)[0]  # and the streams are still in step


def test_pfenet_base_seeds_are_torchs_dataloader_seeds() -> None:
    assert pfenet_base_seeds(321, 3) == [7119482877287995930, 1437229359153720095, 8847909884838522568]
    for seed in (0, 1, 321, 2**32 - 1, 2**32 + 5):
        generator = torch.Generator()
        generator.manual_seed(seed)
        drawn = [torch.empty((), dtype=torch.int64).random_(generator=generator).item() for _ in range(20)]
        assert pfenet_base_seeds(seed, 20) == drawn


class _Draws(torch.utils.data.Dataset):
    """Item i draws 1 + i % 3 numbers from its worker's `random`, as PFENet's __getitem__ draws a varying count."""

    def __len__(self) -> int:
        return 21

    def __getitem__(self, i: int) -> list[int]:
        return [random.randint(1, 10**6) for _ in range(1 + i % 3)]


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:This DataLoader will create 8 worker processes")
def test_pfenet_worker_streams_are_a_real_dataloaders() -> None:
    """What pfenet_episodes assumes of torch's DataLoader (8 workers, shuffle off, no worker_init_fn): item i of each
    pass draws from worker i mod 8's `random`, seeded with that pass's base seed + worker, and the streams run on."""
    torch.manual_seed(321)
    loader = torch.utils.data.DataLoader(_Draws(), batch_size=None, num_workers=8)
    seen = [[item for item in loader] for _ in range(2)]
    for base_seed, items in zip(pfenet_base_seeds(321, 2), seen, strict=True):
        streams = [random.Random(base_seed + w) for w in range(8)]
        assert items == [[streams[i % 8].randint(1, 10**6) for _ in range(1 + i % 3)] for i in range(21)]


# --------------------------------------------------------------------------------------------------------------------
# Synthetic data in the PASCAL layout: the whole path from the config to the episodes.


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    """Synthetic PASCAL-layout data with HSNet-style list files made from its pairs (val and trn, per fold)."""
    folder = tmp_path_factory.mktemp("official")
    data = DataConfig(dataset="synthetic", root=str(folder / "voc"), synthetic=SyntheticConfig(images=400, size=64),
                      min_pixels=64, image_size=32, num_workers=0, cache_dir=str(folder / "cache"))  # fmt: skip
    source = episodes.build_test_dataset(dataclasses.replace(data, episodes=1)).source
    for split in ("val", "trn"):
        (folder / "hsnet" / split).mkdir(parents=True)
        for fold in range(4):
            pairs = eval_pairs(source, dataclasses.replace(data, fold=fold, split=split))
            lines = sorted(f"{image}__{c:02d}" for c, ids in pairs.items() for image in ids)
            (folder / "hsnet" / split / f"fold{fold}.txt").write_text("".join(f"{line}\n" for line in lines))
    return dataclasses.replace(data, list_dir=str(folder / "hsnet"))


def hsnet(data: DataConfig, **changes) -> DataConfig:
    return dataclasses.replace(data, sampler="hsnet", lists="hsnet", **changes)


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("fold", [0, 2])
def test_hsnet_walk_is_hsnets_code(syn: DataConfig, fold: int, shots: int) -> None:
    data = hsnet(syn, fold=fold, shots=shots, episodes=300)
    drawn = as_tuples(episodes.build_test_dataset(data).episodes)
    assert drawn == hsnet_pascal_reference(Path(syn.list_dir) / "val" / f"fold{fold}.txt", shots, 300)
    assert as_tuples(episodes.build_test_dataset(data, seed=7).episodes) == hsnet_pascal_reference(
        Path(syn.list_dir) / "val" / f"fold{fold}.txt", shots, 300, seed=7
    )
    assert as_tuples(episodes.build_test_dataset(dataclasses.replace(data, episodes=40)).episodes) == drawn[:40]
    if shots == 5:  # small pools: HSNet's independent draws repeat supports, as its published 5-shot episodes do
        assert any(len(set(s)) < shots for _, s, _ in drawn)


def test_hsnet_class_uniform_is_hsnets_coco_code() -> None:
    classwise = {c: [f"val2014/COCO_val2014_{c:04d}{i:08d}.jpg" for i in range(3 + 7 * c)] for c in range(1, 80, 4)}
    pools = {c + 1: [Path(p).stem for p in paths] for c, paths in classwise.items()}
    for shots in (1, 5):
        assert as_tuples(hsnet_class_uniform(pools, 500, shots, 0)) == hsnet_coco_reference(classwise, 1, shots, 500)


def test_pfenet_is_pfenets_code_with_its_class_choice_below_the_pixel_rule(syn: DataConfig) -> None:
    """min_pixels 250 on 64 px images: some query classes present are below the rule, and PFENet may choose them."""
    data = dataclasses.replace(syn, sampler="pfenet", min_pixels=250, episodes=200)
    source = episodes.build_test_dataset(dataclasses.replace(data, episodes=1)).source
    val_ids = source.image_ids("val")
    labels = unique_counts(source.mask_dir, val_ids)
    for fold in (0, 1):
        for shots in (1, 2):
            case = dataclasses.replace(data, fold=fold, shots=shots)
            drawn = as_tuples(episodes.build_test_dataset(case, seed=321).episodes)
            novel = pascal_fold(fold)[1]
            reference, data_list, pools = pfenet_reference(labels, val_ids, novel, shots, 200, 321, 250)
            assert drawn == reference
            assert len(data_list) < 200  # several passes over PFENet's list
            assert any(q not in pools[c] for q, _, c in drawn)  # a query class below the 2 x 32 x 32 rule
            assert all(len(set(s)) == shots for _, s, _ in drawn)  # PFENet's supports are distinct


@pytest.mark.parametrize("sampler", ["hsnet", "pfenet"])
def test_official_episode_files_load_back_with_their_repeats_and_classes(
    syn: DataConfig, sampler: str, tmp_path: Path
) -> None:
    if sampler == "hsnet":
        data = hsnet(syn, shots=5, episodes=200)
    else:
        data = dataclasses.replace(syn, sampler="pfenet", min_pixels=250, shots=1, episodes=200)
    path = tmp_path / "episodes.json"
    assert episodes.save_test_episodes(data, 0, path) == 200
    drawn = episodes.build_test_dataset(data).episodes
    assert json.loads(path.read_text())["protocol"]["sampler"] == sampler
    assert episodes.build_test_dataset(dataclasses.replace(data, episode_file=str(path))).episodes == drawn
    with pytest.raises(DataError, match="sampler: file '.*' vs config 'native'"):
        episodes.build_test_dataset(dataclasses.replace(syn, shots=data.shots, episode_file=str(path)))


def test_repeated_supports_load_only_from_a_sampler_that_draws_them(tmp_path: Path) -> None:
    repeated = [Episode("q", ("a", "a"), 1), Episode("r", ("a", "b"), 1)]
    for sampler, loads in (("hsnet", True), ("native", False), ("pfenet", False)):
        data = DataConfig(sampler=sampler, episodes=2, shots=2)
        path = tmp_path / f"{sampler}.json"
        save_episodes(path, repeated, episode_fields(data, 0))
        if loads:
            assert load_episodes(path, episode_fields(data, 0)) == repeated
        else:
            with pytest.raises(DataError, match=r"episode 0 is not valid: it has repeated supports \['a', 'a'\]"):
                load_episodes(path, episode_fields(data, 0))
    save_episodes(path, [Episode("q", ("q", "a"), 1)] * 2, episode_fields(DataConfig(sampler="hsnet", episodes=2), 0))
    with pytest.raises(DataError, match="its query 'q' is among its supports"):  # never the query, any sampler
        load_episodes(path, episode_fields(DataConfig(sampler="hsnet", episodes=2), 0))


# --------------------------------------------------------------------------------------------------------------------
# HSNet's FSS-1000 loader (data.dataset=fss1000).


@pytest.fixture(scope="module")
def fss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An FSS-1000-like root (10 jpg + png per class) and HSNet's class splits: 2 trn, 3 test, 2 val classes."""
    root = tmp_path_factory.mktemp("fss")
    names = {"trn": ["ant", "bee"], "test": ["zebra", "apple", "kite"], "val": ["owl", "cup"]}
    pixels = np.zeros((8, 8), np.uint8)
    pixels[2:6, 2:6] = 255
    for name in (n for group in names.values() for n in group):
        (root / "data" / name).mkdir(parents=True)
        for k in range(1, 11):
            Image.fromarray(np.full((8, 8, 3), k * 20, np.uint8)).save(root / "data" / name / f"{k}.jpg")
            Image.fromarray(pixels).save(root / "data" / name / f"{k}.png")
    (root / "splits").mkdir()
    for split, group in names.items():
        (root / "splits" / f"{split}.txt").write_text("".join(f"{n}\n" for n in group))  # HSNet's files are unsorted
    return root


@pytest.mark.parametrize("split, offset", [("test", 760), ("val", 520)])
@pytest.mark.parametrize("shots", [1, 5])
def test_hsnet_fss_is_hsnets_code_with_its_class_numbering(
    fss: Path, split: str, offset: int, shots: int, tmp_path: Path
) -> None:
    fss1000 = Fss1000Config(splits=str(fss / "splits"), classes=split)
    episodes_per_image = 30 if split == "test" else 20  # 3 test and 2 val classes of 10 images
    data = DataConfig(dataset="fss1000", root=str(fss / "data"), fss1000=fss1000, num_workers=0, sampler="hsnet",
                      shots=shots, episodes=episodes_per_image)  # fmt: skip
    reference = hsnet_fss_reference(fss / "data", fss / "splits" / f"{split}.txt", offset, shots)
    path = tmp_path / "fss.json"
    episodes.save_test_episodes(data, 0, path)
    stored = json.loads(path.read_text())
    numbering = {int(k): v for k, v in stored["protocol"]["hsnet_class_ids"].items()}
    assert [(e["query"], tuple(e["supports"]), numbering[e["class_id"]]) for e in stored["episodes"]] == reference
    assert episodes.build_test_dataset(dataclasses.replace(data, episode_file=str(path))).episodes == [
        Episode.from_json(e) for e in stored["episodes"]
    ]
    cross_domain = dataclasses.replace(data, dataset="pascal", root="unused", target=TargetConfig("fss1000", data.root))
    assert episodes.build_test_dataset(cross_domain).episodes == [Episode.from_json(e) for e in stored["episodes"]]
    with pytest.raises(DataError, match=f"one episode per image \\({data.episodes}\\).*data.episodes={data.episodes}"):
        episodes.build_test_dataset(dataclasses.replace(data, episodes=data.episodes + 1))


def test_hsnet_fss_1000_repeats_supports_as_the_published_episodes_do() -> None:
    """FSS-1000's 240 test classes of 10 images: HSNet's 5-shot test repeats a support in 1,793 of its 2,400
    episodes (OFFICIAL_EPISODES.md); that depends only on the walk (images 1, 10, 2, ..., 9 per class) and the
    stream, so no image is needed."""
    stems = sorted(str(k) for k in range(1, 11))
    walk = [(f"class{c:03d}/{stem}", c) for c in range(240) for stem in stems]
    pools = {c: [f"class{c:03d}/{k}" for k in range(1, 11)] for c in range(240)}
    drawn = hsnet_walk(walk, pools, 2400, 5, 0)
    assert sum(len(set(e.supports)) < 5 for e in drawn) == 1793


# --------------------------------------------------------------------------------------------------------------------
# What does not fit.


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.sampler=pfenet", "data.dataset=coco"], r"PFENet's own COCO lists .*not public.*data.sampler=hsnet"),
        (["data.sampler=hsnet"], r"set data.lists=hsnet \(not 'pfenet'\) and data.list_dir \(now ''\)"),
        (["data.sampler=hsnet", "data.lists=hsnet"], r"data.list_dir \(now ''\) to a copy of HSNet's data/splits"),
        (["data.sampler=pfenet", "data.lists=hsnet"], r"set data.lists=pfenet \(or bam.*data.sampler=hsnet"),
        (["data.sampler=hsnet", "data.lists=hsnet", "data.list_dir=x", "data.ways=2"], r"1-way.*data.ways=2.*native"),
        (["data.sampler=pfenet", "data.split=trn"], r"split val; .*data.split='trn' need data.sampler=native"),
        (["data.sampler=pfenet", "data.seeds=[-1]"], r"seeds \[-1\] cannot seed PFENet's generators"),
        (["data.sampler=pfenet", "data.dataset=folder"], r"PFENet's loaders of data.dataset pascal \| synthetic"),
        (["data.sampler=hsnet", "data.dataset=folder"], r"\| fss1000 \(FSS-1000: data.dataset=fss1000\), not 'folder'"),
        (["data.sampler=pfenet", "data.support_draw=independent"], r"PFENet draws distinct supports"),
        (["data.sampler=hsnet", "data.target.dataset=isic", "data.target.root=x"], r"not 'isic'; use data.sampler=nat"),
        (["data.sampler=hsnet", "data.lists=hsnet", "data.list_dir=x", "data.dataset=coco",
          "data.coco.split=consecutive"], r"interleaved; data.coco.split='consecutive' needs native"),
        (["data.sampler=hsnet_v2"], r"data.sampler='hsnet_v2' is not valid \(did you mean 'hsnet'\?\)"),
    ],
)  # fmt: skip
def test_a_sampler_that_does_not_fit_is_refused_at_config_load(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_hsnet_lists_or_pools_too_small_are_refused_at_build(syn: DataConfig, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"fold0.txt do not exist"):
        episodes.build_test_dataset(hsnet(syn, list_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="data.lists=hsnet"):  # a config built by hand is checked at build too
        episodes.build_test_dataset(dataclasses.replace(syn, sampler="hsnet"))
    (tmp_path / "val").mkdir()
    query = (Path(syn.list_dir) / "val" / "fold0.txt").read_text().split("\n")[0]
    (tmp_path / "val" / "fold0.txt").write_text(f"{query}\n")
    with pytest.raises(DataError, match="never ends on a class listing fewer than 2 images"):
        episodes.build_test_dataset(hsnet(syn, list_dir=str(tmp_path)))
    with pytest.raises(DataError, match="PFENet's loader never ends .* fewer than 30 other images"):
        episodes.build_test_dataset(dataclasses.replace(syn, sampler="pfenet", shots=30))


@pytest.mark.integration
def test_official_episodes_are_the_same_in_any_process_and_hash_seed(syn: DataConfig) -> None:
    cases = [hsnet(syn, shots=5, episodes=100), dataclasses.replace(syn, sampler="pfenet", min_pixels=250, shots=2)]
    keys = ("dataset", "root", "sampler", "lists", "list_dir", "shots", "episodes", "min_pixels", "cache_dir")
    configs = json.dumps([{k: getattr(data, k) for k in keys} | {"synthetic": {"images": 400, "size": 64}}
                          for data in cases])  # fmt: skip
    script = (
        "import hashlib, json, sys; import episodes; from fewshot.config import from_dict\n"
        "for data in json.loads(sys.argv[1]):\n"
        "    records = episodes.build_test_dataset(from_dict({'data': data}).data).episodes\n"
        "    print(hashlib.sha256(json.dumps([e.to_json() for e in records]).encode()).hexdigest())"
    )
    here = [digest(episodes.build_test_dataset(data).episodes) for data in cases]
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-c", script, configs], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == here


def digest(records: list[Episode]) -> str:
    return hashlib.sha256(json.dumps([e.to_json() for e in records]).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# The real lists and masks: every official episode of HSNet's and PFENet's tests.

SELF_CHECK = {  # ../shared/OFFICIAL_EPISODES.md, fold 0
    ("hsnet", 1): [("2007_000033", 1, ["2010_001174"]), ("2007_000061", 4, ["2007_005705"]),
                   ("2007_000129", 2, ["2008_003108"]), ("2007_000346", 5, ["2008_002864"]),
                   ("2007_000529", 4, ["2008_001135"]), ("2007_000559", 5, ["2007_005294"])],
    ("hsnet", 5): [("2007_000033", 1, ["2010_001174", "2007_001884", "2011_002515", "2010_000238", "2011_001114"]),
                   ("2007_000061", 4, ["2011_001589", "2008_001580", "2008_001260", "2011_001793", "2011_000234"]),
                   ("2007_000129", 2, ["2010_000083", "2007_006449", "2008_000725", "2010_006070", "2007_003188"])],
    ("pfenet", 1): [("2007_000033", 1, ["2008_003926"]), ("2007_000061", 4, ["2009_000828"]),
                    ("2007_000129", 2, ["2007_005107"]), ("2007_000346", 5, ["2007_005304"]),
                    ("2007_000529", 4, ["2009_000469"]), ("2007_000559", 5, ["2008_005812"])],
}  # fmt: skip


def real_pascal(shared_data: Path, tmp_path_factory: pytest.TempPathFactory, **changes) -> DataConfig:
    """The real masks with PFENet's val list (the 1,449 VOC val ids); no JPEG is needed to draw episodes."""
    cache = tmp_path_factory.getbasetemp() / "fewshot_real_cache"  # shared with test_lists / test_index
    return DataConfig(
        root=str(shared_data / "voc2012_segclassaug"),
        val_list=str(shared_data / "splits/pfenet/val.txt"),
        train_list=str(shared_data / "voc2012_segclassaug/train_aug_list_from_repo.txt"),
        cache_dir=str(cache),
        **changes,
    )


@pytest.mark.slow
def test_real_hsnet_pascal_episodes(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    list_dir = shared_data / "splits/hsnet/pascal"
    repeated = []
    for fold in range(4):
        lines = (list_dir / "val" / f"fold{fold}.txt").read_text().split("\n")[:-1]
        assert lines == sorted(set(lines))  # HSNet's files: sorted by (image id, class), no repeated pair
        for shots in (1, 5):
            data = real_pascal(shared_data, tmp_path_factory, sampler="hsnet", lists="hsnet", list_dir=str(list_dir),
                               fold=fold, shots=shots)  # fmt: skip
            drawn = as_tuples(episodes.build_test_dataset(data).episodes)
            assert drawn == hsnet_pascal_reference(list_dir / "val" / f"fold{fold}.txt", shots)
            if shots == 5:
                repeated.append(sum(len(set(s)) < 5 for _, s, _ in drawn))
            if fold == 0:
                assert [(q, c, list(s)) for q, s, c in drawn[: len(SELF_CHECK["hsnet", shots])]] == SELF_CHECK[
                    "hsnet", shots
                ]
    assert repeated == [133, 112, 53, 133]  # OFFICIAL_EPISODES.md: episodes with a repeated support


class _CocoLists:
    """A COCO source that knows the image ids of HSNet's val lists only (no annotations are needed to draw)."""

    name = "coco"
    num_folds = 4

    def __init__(self, root: Path, ids: list[str]) -> None:
        self.root, self.ids, self.class_names = root, ids, {}

    def image_ids(self, split: str) -> list[str]:
        return list(self.ids)

    def fold_classes(self, fold: int) -> tuple[list[int], list[int]]:
        return coco_fold(fold)


def _plain_pickle(path: Path) -> dict:
    """HSNet's pickle, loaded as HSNet loads it once pickletools shows it names no class or function."""
    assert not {op.name for op, _, _ in pickletools.genops(path.read_bytes())} & {"GLOBAL", "STACK_GLOBAL", "REDUCE"}
    return pickle.loads(path.read_bytes())


@pytest.mark.slow
def test_real_hsnet_coco_episodes(shared_data: Path) -> None:
    list_dir = shared_data / "splits/hsnet/coco"
    distinct = []
    for fold in range(4):
        classwise = _plain_pickle(list_dir / "val" / f"fold{fold}.pkl")
        source = _CocoLists(list_dir, sorted({Path(p).stem for paths in classwise.values() for p in paths}))
        for shots in (1, 5):
            data = DataConfig(dataset="coco", sampler="hsnet", lists="hsnet", list_dir=str(list_dir), fold=fold,
                              shots=shots)  # fmt: skip
            drawn = as_tuples(fold_sampler(source, data).draw(1000, 0))
            assert drawn == hsnet_coco_reference(classwise, fold, shots)
            if shots == 1:
                distinct.append(len({q for q, _, _ in drawn}))
    assert distinct == [943, 943, 928, 937]  # OFFICIAL_EPISODES.md: queries repeat across episodes


@pytest.fixture(scope="module")
def real_labels(shared_data: Path) -> tuple[list[str], dict[str, dict[int, int]]]:
    val_ids = [line.split()[0].split("/")[-1][:-4] for line in (shared_data / "splits/pfenet/val.txt").open()]
    return val_ids, unique_counts(shared_data / "voc2012_segclassaug/SegmentationClassAug", val_ids)


@pytest.mark.slow
def test_real_pfenet_pascal_episodes(shared_data: Path, tmp_path_factory: pytest.TempPathFactory, real_labels) -> None:
    val_ids, labels = real_labels
    assert len(val_ids) == 1449
    lists, passes, below = [], [], []
    for fold in range(4):
        for shots in (1, 5):
            data = real_pascal(shared_data, tmp_path_factory, sampler="pfenet", fold=fold, shots=shots, episodes=5001)
            drawn = as_tuples(episodes.build_test_dataset(data, seed=321).episodes)
            reference, data_list, pools = pfenet_reference(labels, val_ids, pascal_fold(fold)[1], shots, 5001)
            assert drawn == reference
            if shots == 1:
                lists.append((len(data_list), sum(map(len, pools.values()))))
                passes.append(divmod(5001, len(data_list)))
                below.append(sum(q not in pools[c] for q, _, c in drawn))
            if fold == 0 and shots == 1:
                assert [(q, c, list(s)) for q, s, c in drawn[:6]] == SELF_CHECK["pfenet", 1]
    assert lists == [(364, 365), (445, 467), (592, 734), (336, 357)]  # images, pairs: OFFICIAL_EPISODES.md
    assert passes == [(13, 269), (11, 106), (8, 265), (14, 297)]
    assert below == [19, 63, 55, 112]  # 1-shot episodes whose (query, class) is not a pfenet pair

"""Writes a fold's test episodes (or its (image, class) pairs) as JSON, so several methods run on identical episodes.

    python tools/export_episodes.py configs/demo.yaml data.fold=1 data.seeds=[3] --out episodes_f1_s3.json
    python tools/test_fold.py configs/other.yaml data.fold=1 data.seeds=[3] data.episode_file=episodes_f1_s3.json ...
    python tools/export_episodes.py configs/pascal5i_prototype_resnet50.yaml data.fold=0 data.shots=5 --out hsnet.json

The episodes are drawn by data.sampler: with `hsnet` or `pfenet` the file holds HSNet's or PFENet's own test episodes
(seed 0 / 321 and 1,000 / 5,001 episodes give the published ones), for any codebase to evaluate on exactly them.
The episodes file is `{"protocol": {...}, "episodes": [{"query": id, "supports": [ids], "class_id": c}, ...]}` with
image ids as the dataset names them (VOC ids, COCO file stems, FSS-1000 `<class>/<n>`) and 1-based class ids (VOC /
COCO order: HSNet's 0-based index + 1; FSS-1000: the protocol's `hsnet_class_ids` maps them to HSNet's). Supports
are in draw order and repeat where HSNet's do. Loading it under a config with another protocol, or on other data
(its `pairs_sha256` fingerprints the fold's test pairs), is refused, and so is an episode the protocol could not
have drawn (sampler.check_episodes). With --pairs the file is `{"protocol": {...}, "pairs": [[image id, class id],
...]}`: every test pair of the configured split, fold, list convention and sampler; with --train-pairs, the pairs
the fold trains on (split trn, base classes, under data.lists and data.novel_in_train: the pools of PFENet, BAM or
HSNet). Pairs are sorted by (image id, class id), as HSNet's list files are. Bad input is reported in one line, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from episodes import evaluated, save_test_episodes
from episodes.lists import train_pairs
from episodes.official import fold_sampler
from episodes.sources import build_source
from fewshot.config import ConfigError, DataConfig, load_config
from fewshot.io import write_json
from fewshot.preflight import check_output_file
from fewshot.runs import setup_logging

log = logging.getLogger("export_episodes")
PAIR_FIELDS = ("dataset", "fold", "lists", "min_pixels", "novel_in_train", "train_list", "val_list", "list_dir")


def export_pairs(data: DataConfig, training: bool, path: str) -> int:
    """Writes the fold's test pairs (or, `training`, its training pairs) to `path`; returns their count. A cross-domain
    run's test pairs are its target's (episodes.evaluated)."""
    data = data if training else evaluated(data)
    source = build_source(data)
    pairs = train_pairs(source, data) if training else fold_sampler(source, data).pairs
    rows = sorted([image, c] for c, ids in pairs.items() for image in ids)
    protocol = {key: getattr(data, key) for key in PAIR_FIELDS}
    protocol |= {"split": "trn"} if training else {"split": data.split, "sampler": data.sampler}
    write_json(path, {"protocol": protocol, "pairs": rows})
    log.info("wrote %d %s pairs of fold %d (%s, lists %s) to %s", len(rows), "training" if training else "test",
             data.fold, protocol["split"], data.lists, path)  # fmt: skip
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (only its differences from the defaults)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.fold=1 data.seeds=[3]")
    parser.add_argument("--out", required=True, help="JSON file to write")
    pairs = parser.add_mutually_exclusive_group()
    pairs.add_argument("--pairs", action="store_true", help="write the split's (image, class) test pairs")
    pairs.add_argument("--train-pairs", action="store_true", help="write the (image, class) pairs the fold trains on")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        data = load_config(args.config, args.overrides).data
        check_output_file(args.out)
        if args.pairs or args.train_pairs:
            export_pairs(data, args.train_pairs, args.out)
            return 0
        if len(data.seeds) != 1:
            raise ValueError(
                f"data.seeds={data.seeds}: an episode file holds the episodes of one seed; export each with "
                "data.seeds=[S]"
            )
        if data.episode_file:
            log.warning("data.episode_file=%s is ignored: exporting freshly sampled episodes", data.episode_file)
            data = dataclasses.replace(data, episode_file="")
        (seed,) = data.seeds
        count = save_test_episodes(data, seed, args.out)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as err:
        log.error("%s", err)
        return 2
    log.info("wrote %d episodes of fold %d (seed %d, %d-shot, sampler %s) to %s", count, data.fold, seed, data.shots,
             data.sampler, args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

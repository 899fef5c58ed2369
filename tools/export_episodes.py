"""Writes a fold's test episodes (or its (image, class) pairs) as JSON, so several methods run on identical episodes.

    python tools/export_episodes.py configs/demo.yaml data.fold=1 data.seeds=[3] --out episodes_f1_s3.json
    python tools/test_fold.py configs/other.yaml data.fold=1 data.seeds=[3] data.episode_file=episodes_f1_s3.json ...

The episodes file is `{"protocol": {...}, "episodes": [{"query": id, "supports": [ids], "class_id": c}, ...]}`;
loading it under a config with another protocol, or on other data (its `pairs_sha256` fingerprints the fold's test
pairs), is refused, and so is an episode the protocol could not have drawn (sampler.check_episodes). With --pairs
the file is `{"pairs": [[image id, class id], ...]}`: every test pair of the configured split, fold and list
convention, sorted by (image id, class id) as HSNet's list files are. Bad input is reported in one line, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from episodes import evaluated, save_test_episodes
from episodes.lists import eval_pairs
from episodes.sources import build_source
from fewshot.config import ConfigError, load_config
from fewshot.io import write_json
from fewshot.preflight import check_output_file
from fewshot.runs import setup_logging

log = logging.getLogger("export_episodes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (only its differences from the defaults)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.fold=1 data.seeds=[3]")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--pairs", action="store_true", help="write the split's (image, class) pairs, not episodes")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        data = load_config(args.config, args.overrides).data
        check_output_file(args.out)
        if args.pairs:
            view = evaluated(data)  # a cross-domain run's pairs are its target's
            pairs = eval_pairs(build_source(view), view)
            rows = sorted([image, c] for c, ids in pairs.items() for image in ids)
            write_json(args.out, {"pairs": rows})
            log.info("wrote %d pairs of fold %d (%s, lists %s) to %s", len(rows), data.fold, data.split, data.lists,
                     args.out)  # fmt: skip
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
    log.info("wrote %d episodes of fold %d (seed %d, %d-shot) to %s", count, data.fold, seed, data.shots, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Writes a fold's test episodes (or its (image, class) pairs) as JSON, so several methods run on identical episodes.

    python tools/export_episodes.py configs/demo.yaml data.fold=1 data.seed=3 --out episodes_f1_s3.json
    python tools/test_fold.py configs/other.yaml data.fold=1 data.seed=3 data.episode_file=episodes_f1_s3.json ...

The episodes file is `{"protocol": {...}, "episodes": [{"query": id, "supports": [ids], "class_id": c}, ...]}`;
loading it under a config with another protocol is refused. With --pairs the file is
`{"pairs": [[image id, class id], ...]}`: every test pair of the configured split, fold and list convention,
sorted by (image id, class id) as HSNet's list files are.
"""

from __future__ import annotations

import argparse
import logging
import sys

from episodes import build_test_dataset, evaluated
from episodes.lists import test_pairs
from episodes.sampler import episode_protocol, save_episodes
from episodes.sources import build_source
from fewshot.config import load_config
from fewshot.io import write_json

log = logging.getLogger("export_episodes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (only its differences from the defaults)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.fold=1 data.seed=3")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--pairs", action="store_true", help="write the split's (image, class) pairs, not episodes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = load_config(args.config, args.overrides)
    data = cfg.data
    if args.pairs:
        view = evaluated(data)  # a cross-domain run's pairs are its target's
        pairs = test_pairs(build_source(view), view)
        rows = sorted([image, c] for c, ids in pairs.items() for image in ids)
        write_json(args.out, {"pairs": rows})
        log.info(
            "wrote %d pairs of fold %d (%s, lists %s) to %s", len(rows), data.fold, data.split, data.lists, args.out
        )
        return 0
    if data.episode_file:
        log.warning("data.episode_file=%s is ignored: exporting freshly sampled episodes", data.episode_file)
        data.episode_file = ""
    dataset = build_test_dataset(data)
    save_episodes(args.out, list(dataset.episodes), episode_protocol(data))
    log.info(
        "wrote %d episodes of fold %d (seed %d, %d-shot) to %s",
        len(dataset),
        data.fold,
        data.seed,
        data.shots,
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

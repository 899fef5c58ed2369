"""Zero-shot semantic segmentation on a whole benchmark, as the official code of each method runs it.

    python tools/zero_shot_benchmark.py --benchmark voc21 --root data/VOCdevkit/VOC2012 --method naclip --out runs/zs
        [--preset official|codebase] [--pamr on|off] [--set key=value ...] [--names FILE] [--limit N]
        [--config YAML] [zeroshot.backbone=... zeroshot.pretrained=... device=cuda]
    torchrun --nproc_per_node 4 tools/zero_shot_benchmark.py ...   (each process takes every 4th image)

Benchmarks: voc21 context60 coco_object voc20 context59 coco_stuff cityscapes ade20k, in their MMSegmentation layouts
(fewshot/zeroshot/benchmarks/datasets.py says which folders --root must hold). --preset official (the default) runs
the method's official settings on that benchmark (fewshot/zeroshot/benchmarks/presets.py: PRESETS["naclip/voc21"]);
--preset codebase runs the zeroshot.* settings of the config. --set changes one preset field (--set window=0
--set threshold=0.2), --pamr off sets pamr_steps=0. Writes OUT/results.json: mIoU and per-class IoU (intersection and
union summed over the dataset, void ignored) and the protocol (benchmark, preset with every setting, weights).
`make_table.py --zero-shot runs/` makes the eight-column table.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fewshot import distributed
from fewshot.backbones.weights import is_random
from fewshot.config import ConfigError, load_config
from fewshot.engine import resolve_device
from fewshot.io import write_json
from fewshot.runs import setup_logging
from fewshot.zeroshot.benchmarks import BenchmarkError, codebase_preset, get_benchmark, preset_for
from fewshot.zeroshot.benchmarks.run import run_benchmark
from fewshot.zeroshot.benchmarks.table import format_per_class
from fewshot.zeroshot.outputs import InputError, check_writable

log = logging.getLogger("zero_shot_benchmark")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True, help="voc21 | context60 | coco_object | voc20 | ...")
    parser.add_argument("--root", required=True, help="the benchmark's folder (e.g. .../VOCdevkit/VOC2012)")
    parser.add_argument("--out", required=True, help="output folder for results.json")
    parser.add_argument(
        "--method",
        default="sclip",
        help="sclip | naclip | clearclip | maskclip | proxyclip | maskclip_release (VOC20, PC59, Stuff)",
    )
    parser.add_argument("--preset", default="official", choices=["official", "codebase"])
    parser.add_argument("--pamr", choices=["on", "off"], help="NACLIP's PAMR: off sets pamr_steps=0, on 10 steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change a preset field")
    parser.add_argument("--names", help="a class-name file instead of the preset's (one class per line)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images (recorded in the protocol)")
    parser.add_argument("--config", help="YAML config for zeroshot.* and device")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: zeroshot.pretrained=none device=cpu")
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        name = get_benchmark(args.benchmark).name  # a table title (PC59, City) names its benchmark too
        if args.preset == "official":
            preset = preset_for(args.method, name)
        else:
            preset = codebase_preset(cfg.zeroshot, name)
        pamr = {"on": ["pamr_steps=10"], "off": ["pamr_steps=0"]}.get(args.pamr or "", [])
        preset = preset.with_overrides(pamr + args.set)
        out = Path(args.out)
        device = distributed.init_distributed(resolve_device(cfg.device))
        main_process = distributed.is_main()
        if main_process:
            check_writable(out)
        if is_random(cfg.zeroshot.pretrained):
            log.warning("zeroshot.pretrained=none: a randomly initialised CLIP, so the mIoU is meaningless")
        results = run_benchmark(
            name, args.root, preset, cfg.zeroshot.backbone, cfg.zeroshot.pretrained, device,
            limit=args.limit, names_file=args.names, seed=cfg.seed,
        )  # fmt: skip
    except (ConfigError, InputError, BenchmarkError, FileNotFoundError, ValueError, KeyError) as err:
        log.error("%s", err.args[0] if isinstance(err, KeyError) and err.args else err)
        return 2
    finally:
        distributed.cleanup()
    if main_process:
        write_json(out / "results.json", results)
        print(format_per_class(results))
        print(f"{preset.name}: mIoU {results['metrics']['miou']:.2f} ({out / 'results.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

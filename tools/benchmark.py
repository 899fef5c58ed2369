"""Speed on the machine it runs on: feature cache, evaluation overhead, mask index, zero-shot overhead.

    python tools/benchmark.py --out benchmark.json [--voc-masks DIR] [--device cpu|cuda] [--quick]
    python tools/benchmark.py --out gfsam_fold.json --gfsam-fold --device cuda [--gfsam KEY=VALUE ...]

One run writes JSON (atomically) with ratios, which hold on a noisy machine, and the times behind them:
- cache_speedup: head-training steps/s with a warm feature cache (steps built from memory, as the trainer's) over
  without (CLIP ViT-B/16 at 384 px, random weights, data.augment.views > 0 so the cache is exact);
- eval_overhead: a cached fold evaluation (`fewshot.evaluation.evaluate_fold`, every seed: each unique image encoded
  once, then the episodes from memory) over its floor, one backbone forward per unique image of its episodes;
- index_cold_s / index_warm_s: scanning the masks in DIR (SegmentationClassAug) with episodes.index.MaskIndex into
  an empty temporary cache, then loading it back; skipped with a note without DIR;
- zeroshot_overhead: dense zero-shot inference (DenseCLIP sclip, whole image) over a plain CLIP image forward at the
  same size;
- gfsam_cache_speedup: a GF-SAM fold with SAM embeddings and backbone maps cached (each unique image encoded once)
  over the same fold re-encoding every episode's images, with gfsam_episode_s (cached time per episode, encoders
  included) beside it. Its fold (fewshot.sam.speed.GFSAM_SETUPS["ratio"]) has a 1,000-episode PASCAL-5i fold's
  reuse, 40 1-shot episodes over 16 unique images (5 slots per image, gfsam_slots_per_image: what the cache can save
  at most, were encodes equally fast in both runs), and its encoders cost, per decoded prompt, what SAM ViT-H at 1024
  and DINOv2-L at 518 cost (the vith_ratio256 SAM and ViT-Tiny at 160; gfsam_sam_encoder_per_prompt,
  gfsam_backbone_per_prompt: FLOP ratios); gfsam_points_per_episode, gfsam_prompt_s and gfsam_encode_image_s say
  where its time goes; gfsam_5shot_cache_speedup: the same at 5 shots (GFSAM_SETUPS["ratio_5shot"], about 7
  slots per image); gfsam_tiny_cache_speedup: the 1-shot fold with the tiny256 SAM and ViT-Tiny at 224, whose
  encoders cost next to nothing;
- with --gfsam-fold, only one whole cached GF-SAM fold (GFSAM_SETUPS["vit_h"]: ViT-H SAM at 1024, DINOv2-L at
  518, random weights, 1,000 episodes over 411 unique synthetic images, about PASCAL's): gfsam_fold_s (the fold,
  encoders included), gfsam_fold_encode_s (encoding) and gfsam_fold_episode_s (the rest per episode), for a GPU;
- zs_benchmark_overhead: a whole VOC21 benchmark run (tools/zero_shot_benchmark.py's loop with SCLIP's preset,
  224/112 windows at short side 336, JPEG decoding and metric included) over a plain CLIP forward of the same
  windows, with images/s of both;
- peak memory (RSS, CUDA) and the machine.
Few-shot parts run on synthetic data generated in a temporary folder; --quick shrinks everything (a smoke test:
its ratios mean little).
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from fewshot.config import load_config
from fewshot.engine import place_model, resolve_device
from fewshot.io import write_json
from fewshot.model import build_model
from fewshot.runs import setup_logging
from fewshot.sam.speed import GFSAM_SETUPS, bench_gfsam, bench_gfsam_fold
from fewshot.speed import bench_cache, bench_eval, bench_index, bench_zeroshot, bench_zs_benchmark, machine

log = logging.getLogger("benchmark")

TARGETS = {"cache_speedup": (">=", 10.0), "eval_overhead": ("<=", 1.15), "index_cold_s": ("<=", 60.0),
           "index_warm_s": ("<=", 2.0), "zeroshot_overhead": ("<=", 1.3),
           "gfsam_cache_speedup": (">=", 5.0), "gfsam_5shot_cache_speedup": (">=", 5.0),
           "gfsam_tiny_cache_speedup": (">=", 5.0),
           "gfsam_fold_episode_s": ("<=", 0.3), "gfsam_fold_s": ("<=", 600.0),
           "zs_benchmark_overhead": ("<=", 1.3)}  # fmt: skip
SIZES = {  # defaults of the full run and of --quick
    "backbone": ("open_clip:ViT-B-16", "timm:vit_tiny_patch16_224"), "image_size": (384, 64),
    "batch_size": (2, 2), "steps": (2, 2), "episodes": (4, 4), "zs_model": ("ViT-B-16", "ViT-S-32"),
    "zs_size": (336, 64), "reps": (2, 1), "images": (240, 240), "zs_images": (8, 2),
}  # fmt: skip


def table(results: dict[str, Any]) -> str:
    width = max(map(len, TARGETS)) + 2
    lines = [f"{'measure':<{width}}{'value':>10}  target   result"]
    for key, (op, target) in TARGETS.items():
        value = results.get(key)
        if value is None:
            lines.append(f"{key:<{width}}{'-':>10}  {op} {target:<6} skipped")
            continue
        ok = value >= target if op == ">=" else value <= target
        lines.append(f"{key:<{width}}{value:>10.3f}  {op} {target:<6} {'pass' if ok else 'FAIL'}")
    lines.append(
        f"peak RSS {results['peak_rss_mb']:.0f} MB, CUDA {results['peak_cuda_mb']:.0f} MB; "
        f"{results['machine']['cpu']} x{results['machine']['cores']}, GPU {results['machine']['gpu']}"
    )
    return "\n".join(lines)


def gfsam_setup(name: str, changes: list[str]) -> dict[str, Any]:
    """GFSAM_SETUPS[name] with `KEY=VALUE` changes (--gfsam); a key it lacks is an error naming the valid ones."""
    setup = dict(GFSAM_SETUPS[name])
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep or key not in setup:
            raise SystemExit(f"--gfsam {change!r}: give KEY=VALUE with KEY one of {sorted(setup)}")
        setup[key] = type(setup[key])(value)
    return setup


def run_all(args: argparse.Namespace, sizes: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every measurement but --gfsam-fold's."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [
            "data.dataset=synthetic", f"data.root={tmp}/synthetic", f"data.synthetic.images={sizes['images']}",
            "data.synthetic.size=64", f"data.image_size={sizes['image_size']}", "data.min_pixels=64",
            f"data.episodes={sizes['episodes']}", "data.seeds=[0, 1]", "data.augment.views=2",
            f"data.num_workers={args.workers}", f"train.max_iters={sizes['steps']}",
            f"model.backbone.name={sizes['backbone']}", "model.backbone.pretrained=none",
            "model.backbone.layers=[-4, -3, -2, -1]", "optim.warmup_iters=0", "optim.grad_clip=0",
            f"train.batch_size={sizes['batch_size']}", f"eval.batch_size={sizes['batch_size']}",
            f"train.amp={args.amp}", f"eval.amp={args.amp}", f"cache.dir={tmp}/features",
        ] + (["model.backbone.layers=[0, 1]"] if args.quick else []))  # fmt: skip
        model = place_model(build_model(cfg.model), device, cfg.eval.amp)
        log.info("feature cache: %s at %d px on %s", cfg.model.backbone.name, cfg.data.image_size, device)
        results.update(bench_cache(cfg, model, device, sizes["reps"]))
        log.info("evaluation overhead")
        results.update(bench_eval(cfg, model, device, sizes["reps"]))
        for prefix, name in (("gfsam", "ratio"), ("gfsam_5shot", "ratio_5shot"), ("gfsam_tiny", "tiny")):
            quick = "quick_5shot" if name == "ratio_5shot" else "quick"
            setup = gfsam_setup(quick if args.quick else name, args.gfsam if name == "ratio" else [])
            log.info("GF-SAM fold (%s): %s", name, setup)
            results.update(bench_gfsam(tmp, setup, device, sizes["reps"], prefix))
    log.info("mask index")
    results.update(bench_index(args.voc_masks, args.index_limit))
    log.info("zero-shot overhead: %s at %d px", sizes["zs_model"], sizes["zs_size"])
    zs_reps = 25 if device.type == "cuda" else 2 * sizes["reps"] + 1  # milliseconds on a GPU: more samples
    results.update(bench_zeroshot(sizes["zs_model"], sizes["zs_size"], device, zs_reps))
    window = 224 if sizes["zs_size"] >= 224 else 64
    log.info("zero-shot VOC21 run: %s, %d images, windows %d", sizes["zs_model"], sizes["zs_images"], window)
    results.update(bench_zs_benchmark(sizes["zs_model"], sizes["zs_size"], window, sizes["zs_images"], device))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file of the results")
    parser.add_argument("--voc-masks", type=Path, help="SegmentationClassAug folder for the mask-index timing")
    parser.add_argument("--index-limit", type=int, default=0, help="scan only the first N masks (0 = all)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the whole run")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast (few-shot parts)")
    parser.add_argument("--gfsam-fold", action="store_true",
                        help="only one whole cached GF-SAM fold: ViT-H SAM at 1024, DINOv2-L at 518, 1,000 episodes "
                             "(random weights; the quick setup with --quick)")  # fmt: skip
    parser.add_argument("--gfsam", action="append", default=[], metavar="KEY=VALUE",
                        help="a change to --gfsam-fold's setup (else the ratio fold's): episodes=200")  # fmt: skip
    for key, (full, _) in SIZES.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(full), help=f"default {full}")
    args = parser.parse_args(argv)
    setup_logging()
    sizes = {key: getattr(args, key) or values[args.quick] for key, values in SIZES.items()}
    device = resolve_device(args.device)
    torch.manual_seed(0)
    results: dict[str, Any] = {"sizes": sizes, "machine": machine(device)}
    if args.gfsam_fold:
        setup = gfsam_setup("quick" if args.quick else "vit_h", args.gfsam)
        log.info("whole GF-SAM fold: %s on %s", setup, device)
        with tempfile.TemporaryDirectory() as tmp:
            results.update(bench_gfsam_fold(tmp, setup, device))
    else:
        results.update(run_all(args, sizes, device))
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    write_json(args.out, results)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

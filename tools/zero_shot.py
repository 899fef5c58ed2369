"""Zero-shot segmentation from text prompts, on your images or on a fold's test episodes.

    python tools/zero_shot.py --image photo.jpg photos/ --prompts "cat,sofa|couch,person" --out out/ [key=value ...]
    python tools/zero_shot.py --eval configs/zeroshot_pascal5i_sclip_b16.yaml [key=value ...] --out runs/zs_fold0

Images: for each image, <name>.png holds the labels at the input's size (0 = background, i = the i-th prompt, 1-based;
a palette PNG), <name>_overlay.png the image tinted by class, and <name>.json each class's area, all as the photo
displays (its EXIF orientation applied). Prompts are separated by commas; '|' separates synonyms of one class (scored
by their maximum); a word may name one class only, and at most 255 classes fit the label PNG. A folder gives all its
images.
--eval: the test episodes of data.fold with text instead of supports (the episode's class against background and the
fold's other classes) through fewshot.evaluation.evaluate_fold, written to DIR/results.json as test_fold does.
--refine sam (zeroshot.refine=sam): SAM refines each class's mask (fewshot.sam.refine), with zeroshot.sam.name /
.pretrained (an official .pth, a transformers folder, or none with zeroshot.sam.preset=tiny256).
Settings are the zeroshot.* keys (backbone, pretrained, method, background, ...) and device; see
fewshot/config/schema.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import torch

from fewshot.backbones.weights import is_random
from fewshot.config import Config, ConfigError, load_config
from fewshot.engine import resolve_device
from fewshot.io import write_json
from fewshot.runs import setup_logging
from fewshot.text import parse_classes
from fewshot.zeroshot import DenseCLIP, ZeroShotSegmenter
from fewshot.zeroshot.outputs import InputError, check_writable, list_images, read_image, save_prediction, unique_stems

log = logging.getLogger("zero_shot")

RANDOM_WARNING = "zeroshot.pretrained=none: a randomly initialised CLIP, so these masks are meaningless"
MAX_PROMPTS = 255  # labels 1..255 of an 8-bit label PNG


def parse_prompts(text: str) -> list[list[str]]:
    """'cat,sofa|couch' -> [['cat'], ['sofa', 'couch']]; no class, more than MAX_PROMPTS classes or a word given to
    two classes is an error, found before any model is built."""
    classes = [[s.strip() for s in part.split("|") if s.strip()] for part in text.split(",")]
    classes = [c for c in classes if c]
    if not classes:
        raise InputError(f"--prompts {text!r} names no class; give comma-separated names such as 'cat,dog,sofa|couch'")
    if len(classes) > MAX_PROMPTS:
        raise InputError(
            f"--prompts names {len(classes)} classes, but the label PNG holds at most {MAX_PROMPTS}; split them over "
            "several runs"
        )
    try:
        parse_classes(classes)
    except ValueError as err:
        raise InputError(f"--prompts: {err} ('|' joins synonyms)") from err
    return classes


def warnings_of(cfg: Config) -> list[str]:
    if is_random(cfg.zeroshot.pretrained):
        log.warning(RANDOM_WARNING)
        return [RANDOM_WARNING]
    return []


def run_images(cfg: Config, images: list[str], prompts: str, out: Path) -> None:
    classes = parse_prompts(prompts)
    paths = list_images(images)
    check_writable(out)
    device = resolve_device(cfg.device)
    dense = DenseCLIP.from_config(cfg.zeroshot).to(device)
    segmenter = ZeroShotSegmenter.from_config(cfg.zeroshot, classes, dense).to(device).eval()
    predict, identity, extra = segmenter.predict, segmenter.identity, {}
    if cfg.zeroshot.refine == "sam":
        from fewshot.sam import pick
        from fewshot.sam.refine import refine_labels, refiner_from_config

        sam, refine, extra = refiner_from_config(cfg.zeroshot, "zeroshot")
        sam, identity = sam.to(device), f"{identity}+refine:sam"

        def predict(images: torch.Tensor) -> torch.Tensor:
            scores, embeddings = segmenter(images), sam.embed(images)
            return torch.stack([refine_labels(sam, pick(embeddings, i), s, **refine) for i, s in enumerate(scores)])

    names = [",".join(c) for c in classes]
    meta = {
        "prompts": names,
        "pretrained": cfg.zeroshot.pretrained,
        "model": identity,
        **extra,
        "warnings": warnings_of(cfg),
    }
    for path, stem in zip(paths, unique_stems(paths), strict=True):
        image = read_image(path)  # (H, W, 3) uint8
        with torch.inference_mode():
            labels = predict(torch.from_numpy(image).permute(2, 0, 1)[None].to(device))[0]
        record = save_prediction(out, stem, image, labels.cpu().numpy(), names, {"image": str(path), **meta})
        found = [f"{k} {v['fraction']:.0%}" for k, v in record["areas"].items() if v["pixels"] and k != "background"]
        log.info("%s -> %s/%s.png: %s", path, out, stem, ", ".join(found) or "background only")


def run_eval(cfg: Config, out: Path) -> dict:
    from episodes import evaluated
    from episodes.sources import build_source
    from fewshot.evaluation import evaluate_fold, format_results
    from fewshot.zeroshot import TextEpisodeModel

    check_writable(out)
    cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, features="off"))  # no backbone features
    source = build_source(evaluated(cfg.data))  # a cross-domain run's target
    _, novel = source.fold_classes(cfg.data.fold)
    device = resolve_device(cfg.device)
    model = TextEpisodeModel.from_config(cfg, source.class_names, novel, device)
    if cfg.zeroshot.refine == "sam":
        from fewshot.sam.refine import RefinedTextModel, refiner_from_config

        sam, refine, record = refiner_from_config(cfg.zeroshot, "zeroshot")
        model = RefinedTextModel(model, sam.to(device), refine, record)
    results = evaluate_fold(cfg, model, device)  # the protocol's model fields come from the model itself
    results["method"] = f"{cfg.zeroshot.method}_{cfg.zeroshot.backbone.partition(':')[2]}"
    results["warnings"] = warnings_of(cfg)
    write_json(out / "results.json", results)
    print(f"zero-shot fold {cfg.data.fold} ({out / 'results.json'}):\n{format_results(results, source.class_names)}")
    return results


def split_overrides(images: list[str] | None, overrides: list[str]) -> tuple[list[str], list[str]]:
    """key=value words typed after --image PATH... belong to the overrides (unless such a file exists)."""
    images = images or []
    extra = [p for p in images if "=" in p and not Path(p).exists()]
    return [p for p in images if p not in extra], extra + overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--image", nargs="+", help="image files and/or folders of images")
    mode.add_argument("--eval", metavar="CONFIG", help="YAML config: run its fold's test episodes with text")
    parser.add_argument("--prompts", help="with --image: class names 'a,b,c'; 'sofa|couch' gives synonyms")
    parser.add_argument("--config", help="with --image: optional YAML config for the zeroshot.* keys")
    parser.add_argument("--refine", choices=("none", "sam"), help="SAM refinement of the masks (zeroshot.refine)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. zeroshot.method=clearclip device=cpu")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    setup_logging()
    images, overrides = split_overrides(args.image, args.overrides)
    if args.refine:
        overrides.append(f"zeroshot.refine={args.refine}")
    try:
        if args.eval:
            run_eval(load_config(args.eval, overrides), Path(args.out))
        else:
            if args.prompts is None:
                parser.error("--image needs --prompts 'a,b,c'")
            run_images(load_config(args.config, overrides), images, args.prompts, Path(args.out))
    except (ConfigError, InputError, FileNotFoundError, ValueError, KeyError) as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

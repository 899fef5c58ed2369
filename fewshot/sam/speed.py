"""How fast GF-SAM runs a fold, for tools/benchmark.py: random-weight folds on synthetic images whose costs and image
reuse stand for the published setup, timed cached against re-encoding, or whole.

`GFSAM_SETUPS` (random weights, 1-shot unless `shots` says otherwise, at most `points` prompts per episode):
- ratio: the vith_ratio256 SAM and ViT-Tiny at 160, whose FLOPs over one decoded prompt are SAM ViT-H's at 1024
  (1,655 vs 1,645) and DINOv2-L's at 518 (269 vs 280), on 40 episodes over 16 unique images: 5 image slots per
  unique image, the reuse of a 1,000-episode PASCAL-5i fold (2,000 slots over ~350-450 images); the cache's speedup
  cannot exceed the slots per image unless encodes run slower uncached;
- ratio_5shot: the ratio fold at 5 shots, 40 episodes over about 34 unique images (about 7 slots per image; a
  1,000-episode 5-shot PASCAL-5i fold has about 15): the 5-shot column of the same table;
- tiny: the 1-shot fold with the tiny256 SAM (ratio 23) and ViT-Tiny at 224 (ratio 563): the encoders cost next to
  nothing, so the cache saves little;
- vit_h: SAM ViT-H at 1024 and DINOv2-L at 518, 1,000 episodes over 411 unique images (a PASCAL fold has
  ~350-450), the whole-fold measurement for a GPU; quick: smoke-test sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

import episodes
from fewshot.config import Config, load_config
from fewshot.engine import place_model, timed, timed_call
from fewshot.evaluation import evaluate_fold
from fewshot.model import build_model

GFSAM_SETUPS: dict[str, dict[str, Any]] = {
    "ratio": {"sam_name": "vit_h", "sam_preset": "vith_ratio256", "sam_size": 256,
              "backbone": "timm:vit_tiny_patch16_224", "dino_size": 160, "episodes": 40, "images": 200, "points": 128},
    "ratio_5shot": {"sam_name": "vit_h", "sam_preset": "vith_ratio256", "sam_size": 256, "shots": 5,
                    "backbone": "timm:vit_tiny_patch16_224", "dino_size": 160, "episodes": 40, "images": 400,
                    "points": 128},
    "tiny": {"sam_name": "vit_h", "sam_preset": "tiny256", "sam_size": 256, "backbone": "timm:vit_tiny_patch16_224",
             "dino_size": 224, "episodes": 40, "images": 200, "points": 128},
    "vit_h": {"sam_name": "vit_h", "sam_preset": "", "sam_size": 1024, "backbone": "timm:vit_large_patch14_dinov2",
              "dino_size": 518, "episodes": 1000, "images": 5000, "points": 128},
    "quick": {"sam_name": "vit_h", "sam_preset": "tiny256", "sam_size": 256, "backbone": "timm:vit_tiny_patch16_224",
              "dino_size": 64, "episodes": 3, "images": 240, "points": 8},
    "quick_5shot": {"sam_name": "vit_h", "sam_preset": "tiny256", "sam_size": 256, "shots": 5,
                    "backbone": "timm:vit_tiny_patch16_224", "dino_size": 64, "episodes": 2, "images": 400,
                    "points": 8},
}  # fmt: skip


def gfsam_overrides(tmp: str, setup: dict[str, Any]) -> list[str]:
    """The config of a GF-SAM fold on synthetic data (random weights; 1-shot unless the setup says `shots`) from a
    setup of GFSAM_SETUPS' keys."""
    return [
        "data.dataset=synthetic", f"data.root={tmp}/synthetic{setup['images']}",
        f"data.synthetic.images={setup['images']}", "data.synthetic.size=64", f"data.image_size={setup['sam_size']}",
        "data.min_pixels=64", f"data.episodes={setup['episodes']}", "data.num_workers=0", "eval.amp=none",
        "eval.batch_size=4", "model.head=gfsam", f"model.backbone.name={setup['backbone']}",
        "model.backbone.pretrained=none", "model.backbone.layers=[-1]", f"model.sam.name={setup['sam_name']}",
        "model.sam.pretrained=none", f"model.sam.preset={setup['sam_preset']}",
        f"model.sam.image_size={setup['sam_size']}",
        f"model.gfsam.dino_size={setup['dino_size']}", f"model.gfsam.max_points={setup['points']}",
        f"data.shots={setup.get('shots', 1)}",
    ]  # fmt: skip


def fold_reuse(cfg: Config) -> dict[str, float]:
    """Episodes, unique images and image slots per unique image of the fold `cfg` tests: the last is the most a
    feature cache can save (every slot's encode but one per unique image)."""
    datasets = episodes.build_test_datasets(cfg.data, cfg.data.seeds)  # also builds the mask index before timing
    slots = [i for d in datasets for e in d.episodes for i in (e.query, *e.supports)]
    unique = len(set(slots))
    return {"episodes": sum(len(d) for d in datasets), "unique_images": unique, "slots_per_image": len(slots) / unique}


def cost_ratios(model: torch.nn.Module, dino_size: int, device: torch.device) -> dict[str, float]:
    """FLOPs (torch.utils.flop_counter) of one SAM image encode and of one feature-backbone forward, each over the
    FLOPs of one decoded single-mask prompt: SAM ViT-H at 1024 gives 1,645 and DINOv2-L at 518 280."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    def flops(fn: Callable[[], Any]) -> float:  # attention as matmuls: fused kernels go uncounted on some devices
        with FlopCounterMode(display=False) as counter, torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
            fn()
        return float(counter.get_total_flops())

    sam = model.backbone.sam
    side = sam.image_size
    image = torch.zeros(1, 3, side, side, device=device)
    embedding = sam.embed(image)
    prompts = 8
    points = torch.rand(1, prompts, 1, 2, generator=torch.Generator().manual_seed(0)).to(device) * side
    prompt = flops(lambda: sam.decode(embedding, (side, side), points, multimask=False)) / prompts
    backbone_image = torch.zeros(1, 3, dino_size, dino_size, device=device)
    return {"sam_encoder_per_prompt": flops(lambda: sam.embed(image)) / prompt,
            "backbone_per_prompt": flops(lambda: model.backbone.main(backbone_image)) / prompt}  # fmt: skip


@contextmanager
def gfsam_meters(model: torch.nn.Module, device: torch.device) -> Iterator[dict[str, float]]:
    """Counts, while open, the seconds `model.encode` takes (the device synchronised around each call) and the point
    prompts its SAM decodes: {"encode_s", "prompts"}. The fold's encoder and the GF-SAM head call these attributes."""
    sam, meters = model.backbone.sam, {"encode_s": 0.0, "prompts": 0.0}
    encode, predict = model.encode, sam.predict

    def timed_encode(images: torch.Tensor) -> list[torch.Tensor]:
        feats, seconds = timed_call(lambda: encode(images), device)
        meters["encode_s"] += seconds
        return feats

    def counted_predict(embeddings: Any, original_size: tuple[int, int], points: torch.Tensor | None = None, *args,
                        **kwargs) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        meters["prompts"] += 0 if points is None else points.shape[0] * points.shape[1]
        return predict(embeddings, original_size, points, *args, **kwargs)

    model.encode, sam.predict = timed_encode, counted_predict
    try:
        yield meters
    finally:
        del model.encode, sam.predict


def prompt_seconds(model: torch.nn.Module, side: int, device: torch.device, prompts: int = 128) -> float:
    """Seconds per point prompt of one GF-SAM decode of `prompts` single-mask prompts (chunked as the engine does),
    post-processed and thresholded at `side` x `side`: with gfsam_points_per_episode, what more points would cost."""
    sam = model.backbone.sam
    with torch.inference_mode():
        embedding = sam.embed(torch.zeros(1, 3, side, side, device=device))
        points = torch.rand(1, prompts, 1, 2, generator=torch.Generator().manual_seed(0)).to(device) * side

        def run() -> torch.Tensor:
            return sam.predict(embedding, (side, side), points, multimask=False)[0] > 0

        run()
        return min(timed(run, device) for _ in range(3)) / prompts


def bench_gfsam(tmp: str, setup: dict[str, Any], device: torch.device, reps: int, prefix: str) -> dict[str, Any]:
    """A GF-SAM fold (random weights) with the feature cache (each unique image encoded once, encoders included)
    against the same fold re-encoding every episode's images; the two alternate `reps` times and the best of each
    counts (others' load only slows things down). Keys `<prefix>_...`."""
    overrides = gfsam_overrides(tmp, setup)
    cfg, plain_cfg = load_config(None, overrides), load_config(None, [*overrides, "cache.features=off"])
    model = place_model(build_model(cfg.model), device, "none")
    reuse = fold_reuse(cfg)
    count = reuse["episodes"]
    with gfsam_meters(model, device) as meters:  # a first cached run: the prompts decoded, the encoders' time
        evaluate_fold(cfg, model, device)
    times: dict[str, list[float]] = {"cached": [], "plain": []}
    for _ in range(reps):
        times["cached"].append(timed(lambda: evaluate_fold(cfg, model, device), device))
        times["plain"].append(timed(lambda: evaluate_fold(plain_cfg, model, device), device))
    cached, plain = min(times["cached"]), min(times["plain"])
    ratios = cost_ratios(model, setup["dino_size"], device)
    return {f"{prefix}_cache_speedup": plain / cached, f"{prefix}_episode_s": cached / count,
            f"{prefix}_uncached_episode_s": plain / count, f"{prefix}_episodes": count,
            f"{prefix}_unique_images": reuse["unique_images"], f"{prefix}_slots_per_image": reuse["slots_per_image"],
            f"{prefix}_points_per_episode": meters["prompts"] / count,
            f"{prefix}_prompt_s": prompt_seconds(model, setup["sam_size"], device),
            f"{prefix}_encode_image_s": meters["encode_s"] / reuse["unique_images"],
            f"{prefix}_sam_encoder_per_prompt": ratios["sam_encoder_per_prompt"],
            f"{prefix}_backbone_per_prompt": ratios["backbone_per_prompt"], f"{prefix}_setup": setup}  # fmt: skip


def bench_gfsam_fold(tmp: str, setup: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One whole cached GF-SAM fold (random weights): its total time, encoders included, the time spent encoding
    (each unique image once, the device synchronised around every encoder batch) and the rest per episode."""
    cfg = load_config(None, gfsam_overrides(tmp, setup))
    model = place_model(build_model(cfg.model), device, "none")
    reuse = fold_reuse(cfg)
    with gfsam_meters(model, device) as meters:
        total = timed(lambda: evaluate_fold(cfg, model, device), device)
    count = reuse["episodes"]
    return {"gfsam_fold_s": total, "gfsam_fold_encode_s": meters["encode_s"],
            "gfsam_fold_episode_s": (total - meters["encode_s"]) / count, "gfsam_fold_episodes": count,
            "gfsam_fold_unique_images": reuse["unique_images"],
            "gfsam_fold_points_per_episode": meters["prompts"] / count, "gfsam_fold_setup": setup}  # fmt: skip

"""tools/benchmark.py end to end in its tiny --quick mode: every key written, the table printed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.config import load_config
from fewshot.sam import speed
from tools import benchmark

KEYS = {
    "cache_speedup", "train_step_s", "train_step_cached_s", "train_step_cached_cold_s", "train_cache_gb",
    "eval_overhead", "eval_s", "eval_floor_s", "eval_episodes",
    "eval_unique_images", "index_cold_s", "index_warm_s", "zeroshot_overhead", "zeroshot_s", "clip_forward_s",
    "zs_benchmark_overhead", "zs_benchmark_images_per_s", "zs_benchmark_floor_images_per_s",
    "peak_rss_mb", "peak_cuda_mb", "machine", "sizes", "gfsam_cache_speedup", "gfsam_episode_s",
    "gfsam_uncached_episode_s", "gfsam_unique_images", "gfsam_slots_per_image", "gfsam_sam_encoder_per_prompt",
    "gfsam_tiny_cache_speedup", "gfsam_tiny_episode_s", "gfsam_tiny_setup", "gfsam_points_per_episode",
    "gfsam_prompt_s", "gfsam_5shot_cache_speedup", "gfsam_5shot_slots_per_image", "gfsam_5shot_setup",
}  # fmt: skip


@pytest.mark.integration
def test_quick_benchmark_writes_every_key(tmp_path, capsys):
    masks = tmp_path / "SegmentationClassAug"
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        label = rng.choice(np.array([0, 3, 15, 255], np.uint8), size=(20, 30))
        Image.fromarray(label, mode="L").save(masks / f"2008_{i:06d}.png")
    out = tmp_path / "bench.json"
    argv = ["--quick", "--device", "cpu", "--workers", "0", "--voc-masks", str(masks), "--out", str(out)]
    assert benchmark.main(argv) == 0
    results = json.loads(out.read_text())
    assert KEYS <= set(results)
    assert results["index_masks"] == 5 and results["index_cold_s"] > 0 and results["index_warm_s"] > 0
    speedups = (
        "cache_speedup",
        "eval_overhead",
        "zeroshot_overhead",
        "gfsam_cache_speedup",
        "gfsam_tiny_cache_speedup",
        "gfsam_5shot_cache_speedup",
    )
    for key in speedups:
        assert results[key] > 0
    assert results["gfsam_5shot_setup"]["shots"] == 5 and "shots" not in results["gfsam_setup"]
    assert results["eval_unique_images"] >= 2 and results["machine"]["device"] == "cpu"
    printed = capsys.readouterr().out
    assert all(key in printed for key in benchmark.TARGETS)


def test_index_is_skipped_with_a_note_without_masks(tmp_path):
    assert benchmark.bench_index(None, 0)["index_cold_s"] is None
    missing = benchmark.bench_index(tmp_path / "nowhere", 0)
    assert missing["index_warm_s"] is None and "missing" in missing["index_note"]


def test_quick_gfsam_fold_times_the_encoders_apart(tmp_path, capsys):
    """--gfsam-fold (the GPU measurement) in its quick CPU form: only the whole cached fold, its encoder time inside
    its total, and the targets of the fold in the table."""
    out = tmp_path / "fold.json"
    argv = ["--gfsam-fold", "--quick", "--device", "cpu", "--gfsam", "episodes=4", "--out", str(out)]
    assert benchmark.main(argv) == 0
    results = json.loads(out.read_text())
    assert results["gfsam_fold_episodes"] == 4 and results["gfsam_fold_setup"]["episodes"] == 4
    assert 0 < results["gfsam_fold_encode_s"] < results["gfsam_fold_s"] and results["gfsam_fold_episode_s"] > 0
    assert 2 <= results["gfsam_fold_unique_images"] <= 8 and "cache_speedup" not in results
    assert 0 < results["gfsam_fold_points_per_episode"] <= 8  # the quick setup's model.gfsam.max_points
    printed = capsys.readouterr().out
    assert "gfsam_fold_s" in printed and "gfsam_fold_episode_s" in printed
    with pytest.raises(SystemExit, match="KEY one of"):
        benchmark.gfsam_setup("vit_h", ["episode=4"])
    full = load_config(None, speed.gfsam_overrides(str(tmp_path), benchmark.gfsam_setup("vit_h", [])))
    sam, backbone = full.model.sam, full.model.backbone
    assert (sam.name, sam.preset, sam.image_size, sam.pretrained) == ("vit_h", "", 1024, "none")
    assert backbone.name == "timm:vit_large_patch14_dinov2" and full.model.gfsam.dino_size == 518
    assert full.data.episodes == 1000 and full.data.image_size == 1024 and full.model.gfsam.max_points == 128


def test_ratio_preset_costs_what_vit_h_and_dinov2_l_cost_per_prompt():
    """The ratio fold's SAM encoder and backbone, in FLOPs of one decoded prompt, are SAM ViT-H's at 1024 (counted
    here on the meta device) and DINOv2-L's at 518 within 1 % and 5 %; the tiny preset is far from both."""
    import timm
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import SamModel

    from fewshot.model import build_model
    from fewshot.sam.weights import sam_config

    def flops(fn) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            fn()
        return float(counter.get_total_flops())

    with torch.device("meta"):
        vit_h = SamModel(sam_config("vit_h")).eval().requires_grad_(False)
    embedding = torch.zeros(1, 256, 64, 64, device="meta")
    prompt = flops(lambda: vit_h(image_embeddings=embedding, input_points=torch.zeros(1, 4, 1, 2, device="meta"),
                                 multimask_output=False)) / 4  # fmt: skip
    vit_h_ratio = flops(lambda: vit_h.get_image_embeddings(torch.zeros(1, 3, 1024, 1024, device="meta"))) / prompt
    assert 1600 < vit_h_ratio < 1700  # SAM_METHODS.md 1.7: 5,961 GFLOP vs 3.6 GFLOP
    with torch.device("meta"):
        dinov2_l = timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=518).eval()
    dino_ratio = flops(lambda: dinov2_l.forward_features(torch.zeros(1, 3, 518, 518, device="meta"))) / prompt
    ratios = {}
    for name in ("ratio", "tiny"):
        setup = speed.GFSAM_SETUPS[name]
        model = build_model(load_config(None, speed.gfsam_overrides("unused", setup)).model).eval()
        ratios[name] = speed.cost_ratios(model, setup["dino_size"], torch.device("cpu"))
    assert ratios["ratio"]["sam_encoder_per_prompt"] == pytest.approx(vit_h_ratio, rel=0.01)
    assert ratios["ratio"]["backbone_per_prompt"] == pytest.approx(dino_ratio, rel=0.05)  # 269 vs 280
    assert ratios["tiny"]["sam_encoder_per_prompt"] < 50 and ratios["tiny"]["backbone_per_prompt"] > 500


def test_five_shot_fold_is_the_ratio_fold_at_five_shots():
    """gfsam_5shot_cache_speedup times the ratio fold's model and sizes with 5 supports per episode."""
    one, five = (
        load_config(None, speed.gfsam_overrides("unused", speed.GFSAM_SETUPS[n])) for n in ("ratio", "ratio_5shot")
    )
    assert (one.data.shots, five.data.shots) == (1, 5)
    assert five.model == one.model and five.data.image_size == one.data.image_size
    assert five.data.episodes == one.data.episodes

"""tools/benchmark.py end to end in its tiny --quick mode: every key written, the table printed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tools import benchmark

KEYS = {
    "cache_speedup", "train_step_s", "train_step_cached_s", "train_step_cached_cold_s", "train_cache_gb",
    "eval_overhead", "eval_s", "eval_floor_s", "eval_episodes",
    "eval_unique_images", "index_cold_s", "index_warm_s", "zeroshot_overhead", "zeroshot_s", "clip_forward_s",
    "zs_benchmark_overhead", "zs_benchmark_images_per_s", "zs_benchmark_floor_images_per_s",
    "peak_rss_mb", "peak_cuda_mb", "machine", "sizes", "gfsam_cache_speedup", "gfsam_episode_s",
    "gfsam_uncached_episode_s",
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
    for key in ("cache_speedup", "eval_overhead", "zeroshot_overhead", "gfsam_cache_speedup"):
        assert results[key] > 0
    assert results["eval_unique_images"] >= 2 and results["machine"]["device"] == "cpu"
    printed = capsys.readouterr().out
    assert all(key in printed for key in benchmark.TARGETS)


def test_index_is_skipped_with_a_note_without_masks(tmp_path):
    assert benchmark.bench_index(None, 0)["index_cold_s"] is None
    missing = benchmark.bench_index(tmp_path / "nowhere", 0)
    assert missing["index_warm_s"] is None and "missing" in missing["index_note"]
